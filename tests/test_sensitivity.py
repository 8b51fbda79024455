"""Layer sensitivity: one layer quantized at a time; a stable ranking; table, plot and machine-readable files."""

import csv
import json

import pytest
import torch

from ultralytics_qat.config import QATConfig

from ultralytics_qat.quant.sensitivity import fake_quantized_weight, layer_sensitivity, ranking, split_batches

# A tiny detector (4 backbone convs, one detection level) so that a full pass is a few hundred small forwards.
TOY = {"nc": 80, "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]],
                             [-1, 1, "Conv", [32, 3, 2]]],
       "head": [[[3], 1, "Detect", ["nc"]]]}


def toy_model(images):
    """The toy with random weights and BN statistics of ``images`` (so every layer's output reaches the head)."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    torch.manual_seed(0)
    m = DetectionModel(dict(TOY), verbose=False)
    m.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.momentum = None
        bn.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(images)
    return m.eval()


def _spearman(a, b):
    ra = {n: i for i, n in enumerate(a)}
    d = sum((ra[n] - i) ** 2 for i, n in enumerate(b))
    n = len(a)
    return 1 - 6 * d / (n * (n * n - 1))


def test_fake_quantized_weight_is_on_the_grid():
    w = torch.randn(8, 4, 3, 3)
    for bits in (2, 3, 4):
        q = fake_quantized_weight(w, bits, QATConfig())
        per_channel_levels = [len(torch.unique(q[c])) for c in range(8)]
        assert max(per_channel_levels) <= 2 ** bits - 1 and not torch.equal(q, w)


def test_batches_come_from_the_split_asked_for(coco8):
    from ultralytics_qat.errors import QATConfigError

    val, train = (split_batches(str(coco8), 64, 4, 1, 0, 32, "cpu", split)[0] for split in ("val", "train"))
    assert all("/val/" in f for f in val["im_file"]) and all("/train/" in f for f in train["im_file"])
    with pytest.raises(QATConfigError, match="split='test'.*no such split"):
        split_batches(str(coco8), 64, 4, 1, 0, 32, "cpu", "test")


def test_ranking_is_stable_across_seeds_and_the_model_is_left_unchanged(coco8):
    batches = {s: split_batches(str(coco8), 64, 2, 1, s, 32, "cpu") for s in (0, 1)}
    assert not torch.equal(batches[0][0]["img"], batches[1][0]["img"])  # the seeds pick different images
    model = toy_model(torch.cat([batches[0][0]["img"], batches[1][0]["img"]]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = {s: layer_sensitivity(model, batches[s], (2, 3, 4)) for s in (0, 1)}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    r0, r1 = results[0], results[1]
    assert len(r0["layers"]) == 8  # 4 backbone + 4 head convs (the bare output convs stay float)
    # at 2 bits the toy's layers differ well beyond the noise of 2 images (at 3-4 bits its random weights barely
    # notice quantization: the deltas there are noise, and so is their order)
    a, b = ranking(r0, 2), ranking(r1, 2)
    assert a[0] == b[0] and _spearman(a, b) >= 0.8, (a, b)
    for row in r0["layers"]:  # fewer bits, more damage (on the layers that matter)
        if row["delta"]["2"] > 1e-3:
            assert row["delta"]["2"] >= row["delta"]["4"], row


@pytest.mark.slow
def test_cli_writes_table_plot_csv_and_json(coco8, tmp_path, capsys):
    from ultralytics_qat.cli import main

    imgs = split_batches(str(coco8), 64, 4, 1, 0, 32, "cpu")[0]["img"]
    model = toy_model(imgs)
    path = tmp_path / "toy.pt"
    torch.save({"model": model, "train_args": {}}, path)
    rc = main(["sensitivity", f"model={path}", f"data={coco8}", "imgsz=64", "batch=2", "batches=1", "bits=[2,4]",
               f"project={tmp_path}", "name=sens"])
    assert rc == 0
    out = tmp_path / "sens"
    assert {p.name for p in out.iterdir()} >= {"sensitivity.json", "sensitivity.csv", "sensitivity.png"}
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["bits"] == [2, 4] and len(data["layers"]) == 8
    with open(out / "sensitivity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == [r["name"] for r in data["layers"]]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr()
    assert "dLoss W2" in text.out + text.err and "sensitivity.json" in text.out


def test_cli_needs_a_float_model(capsys):
    from ultralytics_qat.cli import main

    assert main(["sensitivity", "data=x.yaml"]) == 2
    assert "sensitivity needs model=" in capsys.readouterr().err
