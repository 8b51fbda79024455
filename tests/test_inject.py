"""Injection policy on real YOLOv8/v10/11/26 detection models, the layer table, and BN fusion of QConv2d."""

import pytest
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from ultralytics_qat.config import QATConfig
from ultralytics_qat.controller import QATController, quantizers
from ultralytics_qat.errors import QATConfigError
from ultralytics_qat.quant import QConv2d, format_plan, quantize_model

# quantized convs: every Conv.conv (DWConv included); v10 leaves its RepVGGDW branches (2 convs) in float
CENSUS = {"yolov8n.yaml": 57, "yolov10n.yaml": 93, "yolo11n.yaml": 81, "yolo26n.yaml": 114}


def _model(yaml="yolov8n.yaml", nc=80):
    return DetectionModel(yaml, nc=nc, verbose=False)


@pytest.mark.parametrize("yaml", list(CENSUS))
def test_census_and_float_head_outputs(yaml):
    model = _model(yaml)
    plans = quantize_model(model, QATConfig())
    assert len(plans) == CENSUS[yaml] == sum(isinstance(m, QConv2d) for m in model.modules())
    head = model.model[-1]
    for attr in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        for branch in getattr(head, attr, []):
            assert type(branch[-1]) is nn.Conv2d  # bare final 1x1 stays float
    if hasattr(head, "dfl") and hasattr(head.dfl, "conv"):
        assert type(head.dfl.conv) is nn.Conv2d
    roles = [p.role for p in plans]
    assert roles[0] == "first" and plans[0].weight_bits == 8 and plans[0].activation_bits == 8
    n_last = len([a for a in ("cv2", "cv3", "one2one_cv2", "one2one_cv3") if hasattr(head, a)]) * 3
    assert roles.count("last") == n_last
    assert all(p.weight_bits == 4 for p in plans if not p.role)


def test_globs_overrides_exclude_and_float_activations():
    cfg = QATConfig.from_dict(
        {
            "activation": {"bits": None},
            "exclude": ["model.9*"],
            "overrides": {"model.1": {"weight_bits": 6}, "model.2.cv1.conv": {"weight_bits": 3}},
            "last_layer_bits": None,
        }
    )
    model = _model()
    plans = {p.name: p for p in quantize_model(model, cfg)}
    assert "model.9.cv1.conv" not in plans and isinstance(model.model[9].cv1.conv, nn.Conv2d)
    assert plans["model.1.conv"].weight_bits == 6 and plans["model.2.cv1.conv"].weight_bits == 3
    assert all(p.activation_bits is None for n, p in plans.items() if n != "model.0.conv")
    assert model.model[1].conv.input_fake_quant is None
    table = format_plan(list(plans.values()), 64)
    assert "quantized" in table and "of 64 convs" in table and "W3" in table


def test_glob_matching_nothing_is_an_error():
    with pytest.raises(QATConfigError, match="'model.99.\\*' matches no quantizable conv"):
        quantize_model(_model(), QATConfig.from_dict({"exclude": ["model.99.*"]}))
    model = _model()
    quantize_model(model, QATConfig())
    with pytest.raises(QATConfigError, match="already quantized"):
        quantize_model(model, QATConfig())


def test_weights_are_shared_not_copied():
    model = _model()
    w = model.model[1].conv.weight
    quantize_model(model, QATConfig())
    assert model.model[1].conv.weight is w


def test_fuse_folds_bn_into_per_channel_scales_keeping_codes():
    torch.manual_seed(0)
    model = _model(nc=4)
    ctl = QATController(QATConfig.from_dict({"weight": {"granularity": "tensor"}}))
    ctl.prepare(model, verbose=False)
    for m in model.modules():  # non-trivial BN statistics, some negative gammas
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    ctl.calibrate(model, [x], batches=1)
    model.eval()
    conv = model.model[3].conv
    codes = torch.round(conv.weight / conv.weight_fake_quant.scale.view(-1, 1, 1, 1)).clamp(-7, 7)
    bn = model.model[3].bn
    sign = torch.sign(bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
    with torch.no_grad():
        y_ref = model(x)[0]
        model.fuse(verbose=False)
        y_fused = model(x)[0]
    assert not hasattr(model.model[3], "bn") and model.model[3].conv.weight_fake_quant.scale.numel() == conv.out_channels
    fused = model.model[3].conv
    new_codes = torch.round(fused.weight / fused.weight_fake_quant.scale.view(-1, 1, 1, 1)).clamp(-7, 7)
    assert (new_codes != codes * sign).float().mean() < 1e-4  # codes survive (up to float rounding of ties)
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-3, atol=1e-3)


def test_calibration_initialises_everything_and_restores_bn():
    model = _model(nc=4)
    ctl = QATController()
    ctl.prepare(model, verbose=False)
    bn_before = model.model[2].cv1.bn.running_mean.clone()
    assert ctl.needs_calibration(model)
    n = ctl.calibrate(model, [torch.rand(2, 3, 64, 64) for _ in range(3)], batches=2)
    assert n == len(quantizers(model)) and not ctl.needs_calibration(model)
    assert torch.equal(model.model[2].cv1.bn.running_mean, bn_before)
    first = model.model[0].conv.input_fake_quant
    assert first.qn == 0 and first.qp == 255  # image input: unsigned 8 bit
    assert ctl.calibrate(model, [torch.rand(2, 3, 64, 64)]) == 0  # learned scales are never re-initialised


def test_excluding_every_conv_is_refused_at_surgery():
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_qat.controller import QATController
    from ultralytics_qat.errors import QATConfigError

    with pytest.raises(QATConfigError, match="leaves every conv in float"):
        QATController(None, {"exclude": ["model.*"]}).prepare(DetectionModel("yolov8n.yaml", verbose=False), verbose=False)
