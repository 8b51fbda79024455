"""Quantization Correction (WACV'24): exact BN fold, no structural trace, lower loss, and an end-to-end QAT run."""

import copy
import csv
import math

import pytest
import torch
from torch import nn

from qat_test_utils import TRAIN_ARGS
from ultralytics_qat.controller import QATController
from ultralytics_qat.quant import LSQQuantizer, QConv2d
from ultralytics_qat.stabilize import QuantizationCorrection, build_stabilizers, reestimate_bn
from ultralytics_qat.stabilize.qc import QCorrector, fold_into_bn, qc_sites, quantization_correction


def _quantized_conv_block(c1=3, c2=8, k=3):
    """An Ultralytics Conv (conv + bn + SiLU) whose conv is a calibrated 4-bit QConv2d, with non-trivial BN state."""
    from ultralytics.nn.modules import Conv

    torch.manual_seed(0)
    block = Conv(c1, c2, k)
    wq = LSQQuantizer(4, "weight", c2)
    wq.init_weight(block.conv.weight)
    aq = LSQQuantizer(4, "activation", 1, grid="signed")
    aq.init_activation(-2.0, 2.0)
    block.conv = QConv2d.from_conv(block.conv, wq, aq)
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.01, 2.0)  # small variances: eps matters
        block.bn.weight.uniform_(-1.5, 1.5)
        block.bn.bias.uniform_(-1, 1)
    block.bn.eps = 1e-3
    return nn.Sequential(block).eval()


def test_fold_is_exact_including_negative_gammas():
    model = _quantized_conv_block()
    x = torch.randn(2, 3, 16, 16)
    qc = QCorrector(model)
    assert len(qc.sites) == 1
    with torch.no_grad():
        qc.gammas[0].copy_(torch.tensor([1.3, -0.7, 0.0, 2.0, -1.9, 0.5, 1.0, -0.05]))
        qc.betas[0].copy_(torch.linspace(-0.8, 0.9, 8))
    qc.attach()
    with torch.no_grad():
        with_hooks = model(x)
        # the hook is really applied: a different output than without it
        qc.detach()
        plain = model(x)
        qc.attach()
    assert (with_hooks - plain).abs().max() > 0.1
    stats = [b.clone() for b in (model[0].bn.running_mean, model[0].bn.running_var)]
    qc.fold()
    assert not model[0].conv._forward_hooks
    with torch.no_grad():
        folded = model(x)
    torch.testing.assert_close(folded, with_hooks, atol=1e-5, rtol=0)
    assert torch.equal(model[0].bn.running_mean, stats[0]) and torch.equal(model[0].bn.running_var, stats[1])


def test_fold_formula_against_bn_directly():
    bn = nn.BatchNorm2d(5, eps=0.5).eval()  # a large eps: a fold that forgets it is visibly wrong
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5))
        bn.running_var.copy_(torch.rand(5) * 0.1)
        bn.weight.copy_(torch.randn(5))
        bn.bias.copy_(torch.randn(5))
    z = torch.randn(3, 5, 4, 4)
    g, b = torch.tensor([-2.0, -0.5, 0.3, 1.0, 4.0]), torch.randn(5)
    with torch.no_grad():
        ref = bn(z * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
        fold_into_bn(bn, g, b)
        torch.testing.assert_close(bn(z), ref, atol=1e-5, rtol=0)


def _tiny_detector(bits=8):
    """A calibrated yolov8n (64 px, untrained) with hyperparameters for its loss, and one fixed labelled batch.

    At 4 bits an untrained model's loss on a batch jumps with every activation rounding flip; at 8 bits it is smooth
    enough for a few QC steps to show a monotone trend.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    qat = QATController(None, {"weight.bits": bits, "activation.bits": bits})
    qat.prepare(model, verbose=False)
    img = torch.rand(4, 3, 64, 64)
    qat.calibrate(model, [img], batches=1)
    reestimate_bn(model, [img], 1)
    batch = {
        "img": img,
        "cls": torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]]),
        "bboxes": torch.tensor(
            [[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.4, 0.6, 0.5],
             [0.2, 0.8, 0.2, 0.2]]
        ),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]),
    }
    return model.eval(), batch


def test_qc_lowers_the_loss_and_leaves_no_structural_trace(monkeypatch):
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "off")  # a few steps: no background compile on a busy CPU
    model, batch = _tiny_detector()
    keys = list(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n_sites = len(qc_sites(model))
    assert n_sites == 57  # every quantized Conv block of yolov8n (the head's final 1x1 convs have no BN)

    result = quantization_correction(model, lambda: [batch] * 5, model.init_criterion(), epochs=2, lr=1e-3)

    assert result["layers"] == n_sites and result["steps"] == 10
    assert result["loss_end"] < 0.8 * result["loss_start"], result
    # only BN weight/bias changed; statistics, conv weights, scales untouched; same keys, no hooks, same flags
    after = model.state_dict()
    assert list(after) == keys
    changed = {k for k in keys if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".bn.weight", ".bn.bias")) for k in changed)
    assert not any(m._forward_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training and not model.model[-1].training
    # the reported end loss is the folded model's own loss on that batch
    with torch.no_grad():
        model.model[-1].training = True
        loss, _ = model.init_criterion()(model(batch["img"]), batch)
        model.model[-1].training = False
    assert math.isclose(float(loss.sum()) / 4, result["loss_end"], rel_tol=1e-5)


def test_build_stabilizers_puts_qc_before_bn_reestimation():
    from ultralytics_qat.config import QATConfig
    from ultralytics_qat.stabilize import BatchNormStabilizer

    names = [type(s) for s in build_stabilizers(QATConfig.load(None, {"qc.enabled": True}))]
    assert names.index(QuantizationCorrection) < names.index(BatchNormStabilizer)
    assert QuantizationCorrection not in [type(s) for s in build_stabilizers(QATConfig())]  # schema default: off


@pytest.mark.slow
def test_qat_run_with_qc_and_ead_end_to_end(coco8, tmp_path):
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer
    from ultralytics_qat.checkpoint import load_qat_model

    model = YOLO("yolov8n.yaml")
    model.train(
        trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path),
        **{**TRAIN_ARGS, "epochs": 3}, **{"qat.qc.enabled": True, "qat.ead.start": 0.34},
    )
    save_dir = model.trainer.save_dir
    rows = list(csv.DictReader(open(save_dir / "results.csv")))
    assert len(rows) == 3
    rows = [{k.strip(): v for k, v in r.items()} for r in rows]
    assert not any(k.startswith("qat/qc") for k in rows[0])  # post-QAT results are not per-epoch columns
    loaded, ckpt = load_qat_model(save_dir / "weights" / "best.pt")
    post = ckpt["qat"]["post_qat"]  # QC ran once after the last epoch, and its model was validated
    assert post["epoch"] == 2 and math.isfinite(post["qat/qc_loss_end"]) and math.isfinite(post["qat/qc_loss_start"])
    alphas = [float(r["qat/ead_alpha_mean"]) for r in rows]
    assert alphas[0] == 0.0 and all(0.0 < a < 0.999 for a in alphas[1:])
    assert any(isinstance(m, QConv2d) for m in loaded.modules())
    assert set(ckpt["qat"]["state"]) <= set(loaded.state_dict())
