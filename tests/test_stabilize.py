"""Staged bit schedules, BN re-estimation and freezing, EMA decay, and the drop-in callbacks front door."""

import csv

import pytest
import torch
from torch import nn
from ultralytics import YOLO

from qat_test_utils import TRAIN_ARGS
from ultralytics_qat import QATDetectionTrainer, add_qat_callbacks
from ultralytics_qat.checkpoint import CKPT_KEY
from ultralytics_qat.controller import quantizers
from ultralytics_qat.quant import LSQQuantizer
from ultralytics_qat.stabilize import BitSchedule, cosine_ramp, reestimate_bn


def test_set_bits_keeps_the_parameter_and_reinitialises():
    w = torch.randn(8, 4, 3, 3)
    q = LSQQuantizer(8, "weight", 8, narrow_range=True)
    q.init_weight(w)
    param = q.scale
    q.set_bits(4, w)
    assert q.scale is param and (q.bits, q.qn, q.qp) == (4, -7, 7)
    ref = LSQQuantizer(4, "weight", 8, narrow_range=True)
    ref.init_weight(w)
    assert torch.equal(q.scale, ref.scale)  # re-initialised from the weights, as a fresh 4-bit quantizer
    a = LSQQuantizer(8, "activation", grid="auto", init="minmax")
    a.init_activation(-0.5, 7.5)
    lo, hi = a.qn * a.scale.item(), a.qp * a.scale.item()
    a.set_bits(4)
    assert a.bits == 4 and a.qp - a.qn == 15
    s4 = a.scale.item()  # same float range, 15 steps; the integer zero point moves the ends by < 1 step
    assert (a.qp - a.qn) * s4 == pytest.approx(hi - lo, rel=1e-5) and abs(a.qn * s4 - lo) < s4


def test_schedule_stages_and_cosine_ramp():
    sch = BitSchedule([2, 4], [8, 6, 4], [])
    assert [sch.stage(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert sch.bits(1) == (6, None)
    assert cosine_ramp(0.1, 0.25, 0.0, 1.0) == 0.0
    assert cosine_ramp(1.0, 0.25, 0.0, 1.0) == pytest.approx(1.0)
    assert cosine_ramp(0.625, 0.25, 0.0, 1.0) == pytest.approx(0.5)


def test_bn_reestimation_is_the_plain_average_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(2, 3, 8, 8) + i for i in range(3)]
    assert reestimate_bn(model, iter(batches), batches=3, desc="t") == 3
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.1 and model.training  # momentum and mode restored


@pytest.mark.slow
def test_staged_bits_run_end_to_end(coco8, tmp_path):
    model = YOLO("yolov8n.yaml")
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), name="s",
                **{**TRAIN_ARGS, "epochs": 3},
                **{"qat.schedule.milestones": [1, 2], "qat.schedule.weight_bits": [8, 6, 4],
                   "qat.schedule.activation_bits": [8, 8, 4], "qat.bn.freeze_epoch": 2})
    save_dir = model.trainer.save_dir
    rows = list(csv.DictReader(open(save_dir / "results.csv")))
    assert [float(r["qat/stage"]) for r in rows] == [0.0, 1.0, 2.0]
    # every validation in training is preceded by a BN re-estimation; QC (after training) re-estimates by itself
    assert [float(r["qat/bn_reestimate_batches"]) for r in rows] == [1.0, 1.0, 1.0]
    state = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)[CKPT_KEY]["state"]
    assert state["model.1.conv.weight_fake_quant.qrange"].tolist() == [4, -7, 7]
    assert state["model.0.conv.weight_fake_quant.qrange"].tolist() == [8, -127, 127]  # first layer not scheduled
    assert state["model.1.conv.input_fake_quant.qrange"][0].item() == 4


@pytest.mark.slow
def test_dropin_callbacks_match_the_trainer_subclass(coco8, tmp_path):
    """Both front doors quantize the same layers and reach the same QAT state on a short run."""
    args = {**TRAIN_ARGS, "epochs": 1, "val": False}
    a = YOLO("yolov8n.yaml")
    a.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), name="a", **args)
    b = YOLO("yolov8n.yaml")
    ctl = add_qat_callbacks(b, qat="qat.yaml")
    b.train(data=str(coco8), project=str(tmp_path), name="b", **args)
    qa = dict(quantizers(a.trainer.ema.ema))
    qb = dict(quantizers(b.trainer.ema.ema))
    assert set(qa) == set(qb) and len(qa) == 114
    assert [p.name for p in a.trainer.qat.plans] == [p.name for p in ctl.plans]
    for name in qa:
        assert qa[name].qrange.tolist() == qb[name].qrange.tolist(), name
        torch.testing.assert_close(qa[name].scale, qb[name].scale, rtol=1e-4, atol=1e-6), name
    ckpt = torch.load(b.trainer.last, map_location="cpu", weights_only=False)
    assert ckpt[CKPT_KEY]["config"] == ctl.config.to_dict() and ckpt[CKPT_KEY]["kind"] == "deploy"
    groups = [g.get("param_group") for g in b.trainer.optimizer.param_groups]
    assert "qat_scale" in groups
