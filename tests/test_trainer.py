"""End-to-end QAT with the real Ultralytics trainer on real COCO images: checkpoints, resume, val, predict."""

import csv

import numpy as np
import pytest
import torch
from ultralytics import YOLO

from qat_test_utils import TRAIN_ARGS, assert_some_image_agrees, train_stopped_after_first_epoch
from ultralytics_qat import QATDetectionTrainer
from ultralytics_qat.checkpoint import load_qat_model
from ultralytics_qat.cli import main
from ultralytics_qat.checkpoint import CKPT_KEY
from ultralytics_qat.controller import quantizers
from ultralytics_qat.quant import QConv2d

pytestmark = pytest.mark.slow


def _scales(model):
    return {n: q.scale.detach().clone() for n, q in quantizers(model)}


_NO_PLUGIN = """
import sys, torch
sys.modules["ultralytics_qat"] = None  # as on a machine without the plugin: no import, no auto-install
from ultralytics import YOLO
m = YOLO(sys.argv[1]).model.float().eval()
with torch.no_grad():
    print(float(m(torch.zeros(1, 3, 64, 64))[0].abs().sum()))
"""


def test_finished_checkpoints_are_plain_ultralytics_models_that_load_exactly(qat_run):
    import subprocess
    import sys
    import zipfile

    for name in ("best.pt", "last.pt"):
        path = qat_run / "weights" / name
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        entry = ckpt[CKPT_KEY]
        assert entry["config"]["weight"]["bits"] == 4 and entry["kind"] == "deploy"  # a finished run's files
        with zipfile.ZipFile(path) as z:  # no class of ours in the pickle: plain Ultralytics never looks for us
            assert not any(b"ultralytics_qat" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
        scales = {k: v for k, v in entry["state"].items() if k.endswith(".scale")}
        assert len(scales) == 57 + 57 and all(v.dtype == torch.float32 for v in scales.values())
        exact, _ = load_qat_model(path)  # quantizers re-inserted from the entry
        assert len([m for m in exact.modules() if isinstance(m, QConv2d)]) == 57
        for k, v in scales.items():
            assert torch.equal(exact.state_dict()[k], v), k
        for m in exact.modules():  # the fp16 weights give back integer codes exactly (no code off its grid point)
            if isinstance(m, QConv2d):
                q = m.weight_fake_quant
                s = q.scale.detach().view(-1, 1, 1, 1) if q.per_channel else q.scale.detach()
                err = (m.weight.float() / s - q.quantized_int(m.weight)).abs().max()
                assert err < 0.07, (err, q)
    out = subprocess.run([sys.executable, "-c", _NO_PLUGIN, str(qat_run / "weights" / "best.pt")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "AutoInstall" not in out.stdout + out.stderr, out.stderr[-2000:]


def test_plain_yolo_export_of_a_resumable_qat_checkpoint_writes_qdq(qat_run, tmp_path):
    import onnx
    import onnxruntime as ort

    from ultralytics_qat.checkpoint import resume_entry, resume_pickle

    model, ckpt = load_qat_model(qat_run / "weights" / "best.pt")
    path = tmp_path / "mid_run.pt"  # a resumable file pickles the quantized model itself
    torch.save({**ckpt, "model": None, "ema": resume_pickle(model), CKPT_KEY: resume_entry(model, ckpt[CKPT_KEY]["config"])},
               path)
    f = YOLO(str(path)).export(format="onnx", imgsz=64)  # Ultralytics' own exporter, not yolo-qat export
    ops = [n.op_type for n in onnx.load(f).graph.node]
    assert ops.count("DequantizeLinear") >= len(quantizers(model)) - 2  # onnxslim may merge shared input Q/DQ
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = YOLO(str(path)).model.float().eval()  # the model Ultralytics exported: the symbolic must match it
    with torch.no_grad():
        ref = plain(x)[0].numpy()
    sess = ort.InferenceSession(f)
    out = np.concatenate([sess.run(None, {"images": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    assert_some_image_agrees(out, ref)  # 4-bit code flips may cascade in some images; a wrong grid moves all


def test_scales_have_their_own_param_group_without_decay(coco8, tmp_path):
    seen = {}

    def grab(trainer):
        seen["groups"] = [(g.get("param_group"), g["weight_decay"], len(g["params"])) for g in trainer.optimizer.param_groups]
        seen["n_scales"] = len(quantizers(trainer.model))
        seen["ema_equal"] = all(
            torch.equal(a, b) for a, b in zip(_scales(trainer.model).values(), _scales(trainer.ema.ema).values())
        )
        raise KeyboardInterrupt  # setup is all this test needs

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_pretrain_routine_end", grab)
    with pytest.raises(KeyboardInterrupt):
        model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), weight_decay=0.05,
                    **{**TRAIN_ARGS, "epochs": 1}, **{"qat.optim.scale_lr_mult": 0.5})
    scale_group = [g for g in seen["groups"] if g[0] == "qat_scale"]
    assert scale_group == [("qat_scale", 0.0, seen["n_scales"])]
    assert seen["ema_equal"]  # EMA re-synced after calibration


def test_resume_is_bitwise_exact_for_scales(coco8, tmp_path):
    last = train_stopped_after_first_epoch(coco8, tmp_path, "r", **{**TRAIN_ARGS, "epochs": 3})
    saved = torch.load(last, map_location="cpu", weights_only=False)[CKPT_KEY]["state"]
    saved_scales = {k[: -len(".scale")]: v for k, v in saved.items() if k.endswith(".scale")}

    seen = {}

    def capture(trainer):
        seen["model"] = _scales(trainer.model)
        seen["ema"] = _scales(trainer.ema.ema)
        seen["start"] = trainer.start_epoch

    resumed = YOLO(str(last))
    resumed.add_callback("on_pretrain_routine_end", capture)
    resumed.train(trainer=QATDetectionTrainer, resume=True)
    assert seen["start"] == 1
    assert set(seen["model"]) == set(saved_scales)
    for name, value in saved_scales.items():
        assert torch.equal(seen["model"][name], value), name
        assert torch.equal(seen["ema"][name], value), name
    rows = list(csv.DictReader(open(last.parent.parent / "results.csv")))
    assert len(rows) == 3


def test_cli_val_and_predict_on_best(qat_run, coco8, capsys, tmp_path):
    best = qat_run / "weights" / "best.pt"
    assert main(["val", f"model={best}", f"data={coco8}", "imgsz=64", "plots=False", f"project={tmp_path}"]) == 0
    img = next((coco8.parent / "images" / "val").iterdir())
    assert main(["predict", f"model={best}", f"source={img}", "imgsz=64", "save=False", f"project={tmp_path}"]) == 0
    model, _ = load_qat_model(best)
    assert any(isinstance(m, QConv2d) for m in model.modules())
    results = YOLO(str(best)).predict(str(img), imgsz=64, verbose=False)
    assert results[0].boxes is not None


def test_float_checkpoint_where_qat_is_needed(tmp_path, capsys):
    from ultralytics.nn.tasks import DetectionModel

    f = tmp_path / "float.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=80, verbose=False).half(), "train_args": {}}, f)
    assert main(["val", f"model={f}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "float Ultralytics checkpoint" in err and "yolo val" in err
    assert main(["val", f"model={tmp_path / 'missing.pt'}"]) == 2
    assert "not found" in capsys.readouterr().err
