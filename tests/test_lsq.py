"""LSQ math (reference op) and the LSQQuantizer module: formulas checked against the builtin op and by hand."""

import math

import pytest
import torch

from ultralytics_qat.errors import QuantizerNotInitializedError
from ultralytics_qat.ops import lsq_fake_quantize
from ultralytics_qat.ops.reference import pulse_smooth
from ultralytics_qat.quant import LSQQuantizer, signed_grid, unsigned_grid


def _run(fn, x, s, go):
    x = x.clone().requires_grad_()
    s = s.clone().requires_grad_()
    y = fn(x, s)
    y.backward(go)
    return y.detach(), x.grad, s.grad


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, True), (4, False), (8, True), (8, False)])
def test_per_tensor_matches_builtin(bits, signed):
    torch.manual_seed(bits)
    qn, qp = signed_grid(bits) if signed else unsigned_grid(bits)
    x = torch.randn(2, 3, 7, 5) * 2
    s = torch.tensor([0.3])
    g = 1 / math.sqrt(x.numel() * qp)
    go = torch.randn_like(x)
    ref = _run(lambda a, b: torch._fake_quantize_learnable_per_tensor_affine(a, b, torch.zeros(1), qn, qp, g), x, s, go)
    out = _run(lambda a, b: lsq_fake_quantize(a, b, qn, qp, g), x, s, go)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6)


def test_per_channel_matches_builtin_with_per_channel_grad_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    s = torch.rand(6) * 0.2 + 0.05
    qn, qp = -7, 7
    g = 1 / math.sqrt(36 * qp)  # N = elements per channel, not per tensor
    go = torch.randn_like(w)
    ref = _run(lambda a, b: torch._fake_quantize_learnable_per_channel_affine(a, b, torch.zeros(6), 0, qn, qp, g), w, s, go)
    out = _run(lambda a, b: lsq_fake_quantize(a, b, qn, qp, g, ch_axis=0), w, s, go)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6)


def test_hand_computed_gradients_and_grid_edges():
    # s = 1, grid [-2, 1]: values below, on and above the ends, and a rounding tie (0.5 -> 0, half to even)
    x = torch.tensor([-3.0, -2.4, -2.0, 0.5, 0.7, 1.0, 1.4, 1.6, 2.0])
    s = torch.tensor([1.0])
    y, gx, gs = _run(lambda a, b: lsq_fake_quantize(a, b, -2, 1, 1.0), x, s, torch.ones_like(x))
    assert y.tolist() == [-2.0, -2.0, -2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # rounded mask: -2.4 rounds to -2 (inside), 1.4 rounds to 1 (inside), 1.6 rounds to 2 (outside)
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # grad_s terms: qn below, r - v inside, qp above
    terms = [-2.0, -2.0 + 2.4, 0.0, 0.0 - 0.5, 1.0 - 0.7, 0.0, 1.0 - 1.4, 1.0, 1.0]
    assert gs.item() == pytest.approx(sum(terms), abs=1e-6)


def test_values_landing_on_the_grid_ends_keep_their_gradient():
    # torch 2.14 clamp gives zero gradient exactly at min/max; the op must not
    x = torch.tensor([-8.0, 7.0]) * 0.1
    _, gx, _ = _run(lambda a, b: lsq_fake_quantize(a, b, -8, 7, 1.0), x, torch.tensor([0.1]), torch.ones(2))
    assert gx.tolist() == [1.0, 1.0]


def test_scale_stays_positive_and_keeps_learning():
    x = torch.randn(100)
    y, _, gs = _run(lambda a, b: lsq_fake_quantize(a, b, -8, 7, 0.1), x, torch.tensor([-0.5]), torch.ones(100))
    assert torch.isfinite(y).all() and torch.isfinite(gs).all() and gs.abs().item() > 0


def test_pulse_smooth_and_distance_scaling():
    d = torch.tensor([-0.5, -0.45, -0.4, 0.0, 0.3, 0.4, 0.45, 0.5])
    f = pulse_smooth(d, 0.1)  # c = 4: linear to 0 at +-0.5 inside delta of it, identity elsewhere
    torch.testing.assert_close(f, torch.tensor([0.0, -0.2, -0.4, 0.0, 0.3, 0.4, 0.2, 0.0]))
    x = torch.tensor([0.2, 0.5, 0.9])  # s = 1: |d| = 0.2, 0.5, 0.1
    _, gx, _ = _run(lambda a, b: lsq_fake_quantize(a, b, -8, 7, 1.0, dist_k=2.0), x, torch.tensor([1.0]), torch.ones(3))
    torch.testing.assert_close(gx, torch.exp(-2.0 * torch.tensor([0.2, 0.5, 0.1])))


def test_low_precision_input_computes_in_fp32_and_returns_its_dtype():
    x = torch.randn(64) * 3
    s = torch.tensor([0.37])
    y16 = lsq_fake_quantize(x.bfloat16(), s, -8, 7, 0.1)
    assert y16.dtype == torch.bfloat16
    expected = (torch.clamp(torch.round(x.bfloat16().float() / 0.37), -8, 7) * 0.37).bfloat16()
    assert torch.equal(y16, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = LSQQuantizer(4, "weight", 1)
        q.init_weight(x)
        assert q(x).dtype == torch.float32


def test_weight_init_lsq_per_channel_and_mse():
    w = torch.randn(5, 3, 3, 3)
    q = LSQQuantizer(4, "weight", 5, narrow_range=True)
    assert (q.qn, q.qp) == (-7, 7)
    q.init_weight(w)
    torch.testing.assert_close(q.scale.data, 2 * w.reshape(5, -1).abs().mean(1) / math.sqrt(7))
    m = LSQQuantizer(4, "weight", 5, init="mse")
    m.init_weight(w)
    mm = LSQQuantizer(4, "weight", 5, init="minmax")
    mm.init_weight(w)
    err = lambda qz: (qz(w) - w).pow(2).sum().item()  # noqa: E731
    assert err(m) <= err(mm) + 1e-9


def test_activation_grids_from_calibration():
    q = LSQQuantizer(4, "activation", grid="auto", init="minmax")
    q.init_activation(0.0, 6.0)
    assert (q.qn, q.qp) == (0, 15) and q.scale.item() == pytest.approx(0.4)
    q.init_activation(-0.278, 5.0)  # SiLU-like tail: integer zero point instead of half the grid wasted
    s = 5.278 / 15
    assert (q.qn, q.qp) == (-round(0.278 / s), 15 - round(0.278 / s)) and q.scale.item() == pytest.approx(s)
    q2 = LSQQuantizer(4, "activation", grid="signed", init="minmax")
    q2.init_activation(-1.0, 3.5)
    assert (q2.qn, q2.qp) == (-8, 7) and q2.scale.item() == pytest.approx(0.5)


def test_observer_mse_calibration_and_state_dict_round_trip():
    torch.manual_seed(0)
    q = LSQQuantizer(4, "activation", grid="auto", init="mse")
    with pytest.raises(QuantizerNotInitializedError, match="calibrate"):
        q(torch.randn(4))
    q.start_observing()
    x = torch.cat([torch.randn(10000).abs(), torch.tensor([40.0])])  # one outlier
    assert torch.equal(q(x), x)  # observing is pass-through
    q.finish_observing()
    assert q.qn == 0 and q.scale.item() < 40.0 / 15  # MSE clips the outlier
    fresh = LSQQuantizer(8, "activation")
    fresh.load_state_dict(q.state_dict())
    assert (fresh.bits, fresh.qn, fresh.qp, fresh._initialized) == (4, q.qn, q.qp, True)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("groups,stride", [(1, 1), (4, 2)])
def test_fused_conv_matches_unfused_and_saves_one_activation(groups, stride):
    from ultralytics_qat.ops import lsq_conv2d

    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9) * 2
    w = torch.randn(8, 8 // groups, 3, 3) * 0.2
    b = torch.randn(8)
    s = torch.tensor([0.3])
    go = torch.randn(2, 8, (9 + 2 - 3) // stride + 1, (9 + 2 - 3) // stride + 1)

    def grads(fused):
        xx, ww, bb, ss = (t.clone().requires_grad_() for t in (x, w, b, s))
        if fused:
            y = lsq_conv2d(xx, ss, -1, 14, 0.01, ww, bb, (stride, stride), (1, 1), (1, 1), groups)
        else:
            q = lsq_fake_quantize(xx, ss, -1, 14, 0.01)
            y = torch.nn.functional.conv2d(q, ww, bb, stride, 1, 1, groups)
        y.backward(go)
        return y.detach(), xx.grad, ww.grad, bb.grad, ss.grad

    for a, r in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        xx = x.clone().requires_grad_()
        lsq_conv2d(xx, s.clone().requires_grad_(), -1, 14, 0.01, w, b, (stride, stride), (1, 1), (1, 1), groups)
    assert sum(n == x.numel() for n in saved) == 1  # only x, not also its fake-quantized copy


@pytest.mark.parametrize("qn,qp,largest", [(-14, 1, 14), (-7, 7, 7), (-8, 7, 8), (0, 15, 15)])
def test_grad_scale_uses_the_largest_level(qn, qp, largest):
    """g = 1 / sqrt(N * max(qp, -qn, 1)): a zero-point grid [-14, 1] is scaled by 14, not by its qp of 1."""
    q = LSQQuantizer(4, "activation")
    q._set_grid(4, qn, qp)
    assert q.grad_scale(4 * 3000) == pytest.approx(1 / math.sqrt(4 * 3000 * largest), rel=1e-12)
    w = LSQQuantizer(4, "weight", channels=8, narrow_range=True)  # symmetric [-7, 7], N per channel
    assert w.grad_scale(8 * 36) == pytest.approx(1 / math.sqrt(36 * 7), rel=1e-12)


def test_grad_scale_docstrings_state_the_implemented_formula():
    from ultralytics_qat.ops import lsq_fake_quantize_reference, reference

    for doc in (LSQQuantizer.grad_scale.__doc__, lsq_fake_quantize.__doc__, lsq_fake_quantize_reference.__doc__,
                reference.__doc__):  # fmt: skip
        assert "max(qp, -qn, 1)" in doc and "sqrt(N * qp)" not in doc
