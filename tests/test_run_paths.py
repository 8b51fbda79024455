"""The paths real runs take: early stop, resume through either door, learning rates, checkpoints, determinism."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ultralytics import YOLO

from qat_test_utils import TRAIN_ARGS, train_stopped_after_first_epoch
from ultralytics_qat import QATDetectionTrainer, add_qat_callbacks
from ultralytics_qat.checkpoint import CKPT_KEY, atomic_save, load_qat_model
from ultralytics_qat.cli import main
from ultralytics_qat.controller import quantizers
from ultralytics_qat.engine.run import _ema_decay

pytestmark = pytest.mark.slow


def _scales(model):
    return {n: q.scale.detach().clone() for n, q in quantizers(model)}


def _rows(save_dir):
    with open(save_dir / "results.csv") as f:
        return [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]


def test_patience_stop_runs_post_qat_once_and_best_is_the_post_qat_model(coco8, tmp_path):
    def never_better(trainer):  # the stopper's own logic then stops after `patience` epochs without improvement
        trainer.stopper.best_fitness = 1.0

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_pretrain_routine_end", never_better)
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), patience=2,
                **{**TRAIN_ARGS, "epochs": 6}, **{"qat.qc.enabled": True})
    assert len(_rows(model.trainer.save_dir)) == 2  # stopped early, far from epoch 6
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(model.trainer.wdir / name, map_location="cpu", weights_only=False)
        post = ckpt[CKPT_KEY]["post_qat"]
        assert post["epoch"] == 1 and math.isfinite(post["qat/qc_loss_end"]) and post["in_best"], name
        assert ckpt["epoch"] == -1 and ckpt[CKPT_KEY]["kind"] == "deploy"


def test_stop_request_mid_run_also_finalizes(coco8, tmp_path):
    def stop(trainer):
        trainer.stop = True  # e.g. a platform cancellation between batches

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_batch_end", stop)
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), **{**TRAIN_ARGS, "epochs": 4},
                **{"qat.qc.enabled": True})
    ckpt = torch.load(model.trainer.best, map_location="cpu", weights_only=False)
    assert ckpt[CKPT_KEY]["post_qat"]["epoch"] == 0


def test_scale_group_lr_is_weight_group_lr_times_multiplier_every_batch(coco8, tmp_path):
    seen = []

    def check(trainer):
        groups = {g.get("param_group"): g for g in trainer.optimizer.param_groups}
        seen.append((groups["weight"]["lr"], groups["qat_scale"]["lr"], groups["weight"]["momentum"],
                     groups["qat_scale"]["momentum"]))

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_batch_end", check)
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), optimizer="SGD", lr0=0.02,
                warmup_epochs=1, **{**TRAIN_ARGS, "epochs": 3, "val": False}, **{"qat.optim.scale_lr_mult": 0.5})
    assert len(seen) == 3 and len({w for w, *_ in seen}) == 3  # warm-up and the scheduler moved the lr
    for w, s, mw, ms in seen:
        assert math.isclose(s, 0.5 * w, rel_tol=1e-12) and mw == ms
    assert seen[-1][0] < 0.02 * 1.0001  # the user's lr0, not torch's default or auto's pick


def test_optimizer_auto_says_when_it_ignores_lr0(coco8, tmp_path, caplog):
    def stop(trainer):
        raise KeyboardInterrupt

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_pretrain_routine_end", stop)
    with pytest.raises(KeyboardInterrupt):
        model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), lr0=1e-4,
                    **{**TRAIN_ARGS, "epochs": 1})
    assert any("optimizer=auto ignores lr0=0.0001" in r.getMessage() and "optimizer=AdamW" in r.getMessage()
               for r in caplog.records)


def test_dropin_door_does_what_the_subclass_does_including_resume(coco8, tmp_path):
    seen = {}

    def grab(trainer):
        seen["amp"] = trainer.args.amp
        seen["betas"] = [g.get("betas") for g in trainer.optimizer.param_groups]
        seen["decay"] = getattr(trainer.ema.decay, "func", None)
        seen["model"], seen["ema"] = _scales(trainer.model), _scales(trainer.ema.ema)
        seen["start"] = trainer.start_epoch

    args = {**TRAIN_ARGS, "epochs": 3, "amp": True}
    last = train_stopped_after_first_epoch(coco8, tmp_path, "sub", **args)
    sub_betas = [g.get("betas") for g in torch.load(last, weights_only=False)["optimizer"]["param_groups"]]

    model = YOLO("yolov8n.yaml")
    add_qat_callbacks(model)

    def stop(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=str(coco8), project=str(tmp_path), name="drop", **args)
    dlast = model.trainer.last
    assert "amp: false" in (dlast.parent.parent / "args.yaml").read_text()
    ckpt = torch.load(dlast, map_location="cpu", weights_only=False)
    assert ckpt[CKPT_KEY]["kind"] == "resume"
    assert [g.get("betas") for g in ckpt["optimizer"]["param_groups"]] == sub_betas  # same optimizer as the subclass
    saved = {k[: -len(".scale")]: v for k, v in ckpt[CKPT_KEY]["state"].items() if k.endswith(".scale")}

    resumed = YOLO(str(dlast))
    add_qat_callbacks(resumed)
    resumed.add_callback("on_pretrain_routine_end", grab)
    resumed.train(resume=True)
    assert seen["start"] == 1 and seen["amp"] is False and seen["decay"] is _ema_decay
    for name, value in saved.items():  # exact fp32 state, not the fp16 pickle
        assert torch.equal(seen["model"][name], value) and torch.equal(seen["ema"][name], value), name
    assert len(_rows(resumed.trainer.save_dir)) == 3


def test_finished_run_resume_says_nothing_to_resume_in_one_line(qat_run, capsys):
    assert main(["train", "resume", f"model={qat_run / 'weights' / 'last.pt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to resume" in err, err


def test_best_pt_at_most_twice_the_float_checkpoint(qat_run, tmp_path):
    from copy import deepcopy

    float_model = YOLO("yolov8n.yaml").model  # what a float run's best.pt pickles: the fp16 model
    torch.save({"model": deepcopy(float_model).half(), "train_args": {}}, tmp_path / "float.pt")
    float_size = os.path.getsize(tmp_path / "float.pt")
    for name in ("best.pt", "last.pt"):
        size = os.path.getsize(qat_run / "weights" / name)
        assert size <= 2 * float_size, (name, size, float_size)


def test_nan_recovery_keeps_the_qat_ema_decay_and_exact_state(coco8, tmp_path):
    seen = {"poisoned": False}

    def poison(trainer):
        if trainer.epoch == 1 and not seen["poisoned"]:
            seen["poisoned"] = True
            trainer.loss = torch.tensor(float("nan"))

    def after(trainer):
        if seen["poisoned"] and "decay" not in seen:
            seen["decay"] = getattr(trainer.ema.decay, "func", None)

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_epoch_end", poison)
    model.add_callback("on_train_epoch_start", after)
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), **{**TRAIN_ARGS, "epochs": 3})
    assert seen["poisoned"] and seen["decay"] is _ema_decay


def _train_losses_and_scales(coco8, project, name, **qat):
    model = YOLO("yolov8n.yaml")
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(project), name=name,
                **{**TRAIN_ARGS, "epochs": 2}, **qat)
    rows = _rows(model.trainer.save_dir)
    return rows, _scales(model.trainer.ema.ema)


def test_auxiliary_passes_never_touch_training_batches_and_runs_are_bitwise_repeatable(coco8, tmp_path):
    from ultralytics_qat.ops import cpu_compile_paths, reset_cpu_compile_paths

    reset_cpu_compile_paths()
    rows_a, scales_a = _train_losses_and_scales(coco8, tmp_path, "a")
    paths = cpu_compile_paths()  # validation and BN re-estimation ran between training epochs
    assert paths["lsq_forward"].inference > 0
    for op in ("lsq_forward", "lsq_backward", "track_oscillations"):
        assert paths[op].last == "compiled" and paths[op].fallback is None, (op, paths[op])
    rows_b, scales_b = _train_losses_and_scales(coco8, tmp_path, "b")
    assert all(torch.equal(scales_a[k], scales_b[k]) for k in scales_a)  # same seed: bitwise the same run
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in (*rows_a, *rows_b)]
    assert drop_time[:2] == drop_time[2:]
    # BN re-estimation only touches the EMA: without it the training model sees the same batches and losses
    rows_c, _ = _train_losses_and_scales(coco8, tmp_path, "c", **{"qat.bn.reestimate": False})
    train_cols = [k for k in rows_a[0] if k.startswith("train/")]
    assert [[r[k] for k in train_cols] for r in rows_a] == [[r[k] for k in train_cols] for r in rows_c]


_WRITER = """
import sys, torch
from ultralytics_qat.checkpoint import atomic_save
big = {"w": torch.arange(4_000_000, dtype=torch.float32)}
i = 0
while True:
    big["i"] = i
    atomic_save(big, sys.argv[1])
    i += 1
"""


def test_atomic_save_leaves_a_loadable_file_after_kill_and_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_save({"w": torch.zeros(3), "i": -1}, target)
    for delay in (0.3, 0.55, 0.8):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)])
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert "w" in torch.load(target, weights_only=False)  # the old or the new file, never a torn one

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    before = target.read_bytes()
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_save({"w": torch.ones(3)}, target)
    assert target.read_bytes() == before and not list(tmp_path.glob(".last.pt.*"))


def test_checkpoint_from_before_the_compact_format_still_loads(tmp_path):
    from copy import deepcopy

    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_qat.controller import QATController

    ctl = QATController()
    model = ctl.prepare(DetectionModel("yolov8n.yaml", verbose=False), verbose=False)
    ctl.calibrate(model, [torch.rand(1, 3, 64, 64)], batches=1)
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    f = tmp_path / "old.pt"  # format 1: fp16 pickle with trackers, one fp32 copy of the whole state
    torch.save({"model": deepcopy(model).half(), "train_args": {}, "epoch": -1,
                CKPT_KEY: {"format": 1, "config": ctl.config.to_dict(), "state": state}}, f)
    loaded, _ = load_qat_model(f)
    assert all(torch.equal(loaded.state_dict()[k], v.to(loaded.state_dict()[k].dtype)) for k, v in state.items())


def test_nan_scales_in_a_checkpoint_are_refused_in_one_line(qat_run, tmp_path, capsys):
    ckpt = torch.load(qat_run / "weights" / "best.pt", map_location="cpu", weights_only=False)
    key = next(k for k in ckpt[CKPT_KEY]["state"] if k.endswith(".scale"))
    ckpt[CKPT_KEY]["state"][key][:] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    assert main(["val", f"model={tmp_path / 'nan.pt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or inf" in err, err


_TRAIN = """
import sys
from ultralytics_qat.utils import make_hermetic
make_hermetic()
from ultralytics import YOLO
from ultralytics_qat import QATDetectionTrainer
YOLO("yolov8n.yaml").train(trainer=QATDetectionTrainer, data=sys.argv[1], project=sys.argv[2], name="k", exist_ok=True,
                           epochs=4, imgsz=64, batch=4, nbs=4, workers=0, plots=False, seed=0, val=False)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_training_killed_during_a_checkpoint_write_resumes_from_disk(coco8, tmp_path, delay):
    wdir = tmp_path / "k" / "weights"
    p = subprocess.Popen([sys.executable, "-c", _TRAIN, str(coco8), str(tmp_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # wait for the second epoch's write of last.pt to begin (a previous last.pt exists), then kill -9
        deadline = time.time() + 300
        while time.time() < deadline and not ((wdir / "last.pt").exists() and list(wdir.glob(".last.pt.*.tmp"))):
            assert p.poll() is None, "training ended before the kill"
            time.sleep(0.002)
        time.sleep(delay)
        p.kill()
    finally:
        p.wait()
    ckpt = torch.load(wdir / "last.pt", map_location="cpu", weights_only=False)  # the previous epoch, whole
    assert ckpt[CKPT_KEY]["kind"] == "resume" and ckpt["epoch"] >= 0
    resumed = YOLO(str(wdir / "last.pt"))
    resumed.train(trainer=QATDetectionTrainer, resume=True)
    assert len(_rows(tmp_path / "k")) == 4 and resumed.trainer.start_epoch == ckpt["epoch"] + 1


def test_a_qat_checkpoint_that_lost_its_entry_is_named_as_such(qat_run, tmp_path, capsys):
    ckpt = torch.load(qat_run / "weights" / "best.pt", map_location="cpu", weights_only=False)
    del ckpt[CKPT_KEY]
    torch.save(ckpt, tmp_path / "no_entry.pt")
    assert main(["val", f"model={tmp_path / 'no_entry.pt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lost its QAT entry" in err, err


def test_finetune_to_a_new_class_count_quantizes_the_class_branch_too(coco8, qat_run, tmp_path, capsys):
    """The common path: a COCO-shaped float .pt (80 classes) fine-tuned on a 4-class dataset. Ultralytics' load then
    rebuilds the class branch (its width follows nc); quantizers inserted before that load were silently dropped."""
    from ultralytics_qat.data import make_shapes_dataset
    from ultralytics_qat.quant import QConv2d

    data = make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, imgsz=64, seed=0)
    float_pt = tmp_path / "coco-shaped.pt"
    YOLO("yolov8n.yaml").save(float_pt)
    for door in ("subclass", "dropin"):  # both doors bind the same get_model; each must quantize the new branch
        model = YOLO(str(float_pt))
        controller = add_qat_callbacks(model) if door == "dropin" else None
        model.train(trainer=QATDetectionTrainer if door == "subclass" else None, data=str(data),
                    project=str(tmp_path), name=f"nc4-{door}", **{**TRAIN_ARGS, "epochs": 1})
        trained = dict(model.trainer.model.named_modules())
        planned = [p.name for p in (controller or model.trainer.qat_run.qat).plans]
        assert any(".cv3." in n for n in planned), door
        assert all(isinstance(trained[n], QConv2d) for n in planned), door
        best, _ = load_qat_model(model.trainer.best)  # the final validation and export load it this way
        assert all(q._initialized for _, q in quantizers(best)), door
        assert {n.rsplit(".", 1)[0] for n, _ in quantizers(best)} == set(planned), door

    # a QAT checkpoint of another class count cannot continue here: one line, not a half-quantized model
    capsys.readouterr()
    assert main(["train", f"model={qat_run / 'weights' / 'best.pt'}", f"data={data}", "epochs=1", "imgsz=64",
                 "batch=4", "workers=0", f"project={tmp_path}", "name=wrong-nc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "QAT checkpoint for 80 classes and this dataset has 4" in err, err
