"""LSQ fake quantization: the PyTorch twin against torch's builtin oracle and a float64 spec, Triton against the twin."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_ops import RANGES, assert_lsq_close, grad_s_tol, run

from ultralytics_qat.ops import lsq_fake_quantize, lsq_fake_quantize_reference

LAYOUTS = {  # name: (shape, ch_axis)
    "tensor": ((1000,), None),
    "tensor-odd": ((3, 37), None),
    "channel-K1": ((5, 1), 0),
    "channel-K9": ((7, 1, 3, 3), 0),
    "channel-dw": ((16, 9), 0),
    "channel-axis1": ((3, 5, 4), 1),
}


def _inputs(shape, ch_axis, qn, qp, dtype=torch.float32):
    """Inputs spread over the whole grid and beyond it, random per-channel scales, a random upstream gradient."""
    c = 1 if ch_axis is None else shape[ch_axis]
    scale = torch.rand(c) * 0.4 + 0.05
    view = [1] * len(shape)
    if ch_axis is not None:
        view[ch_axis] = c
    x = (torch.rand(shape) * (qp - qn + 4) + qn - 2) * scale.view(view if ch_axis is not None else [])
    return x.to(dtype), scale, torch.randn(shape).to(dtype)


def _gscale(x, ch_axis, qp):
    n = x.numel() if ch_axis is None else x.numel() // max(x.shape[ch_axis], 1)
    return 1.0 / math.sqrt(max(n, 1) * qp)


def _spec(x, scale, go, qn, qp, grad_scale, ch_axis, pulse_delta=0.0, dist_k=0.0):
    """Float64 transcription of docs/qat-methods.md (LSQ, PulseSmooth, distance-aware scaling), rounded mask."""
    x, go = x.double(), go.double()
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    s = scale.double().clamp_min(1e-8).reshape(shape if ch_axis is not None else [])
    v = x / s
    r = torch.round(v)
    inside = (r >= qn) & (r <= qp)
    d = r - v
    grad_x = torch.where(inside, go * (torch.exp(-dist_k * d.abs()) if dist_k else 1.0), 0.0)
    if pulse_delta:
        c = (0.5 - pulse_delta) / pulse_delta
        d = torch.where(d >= 0.5 - pulse_delta, -c * (d - 0.5), torch.where(d <= -0.5 + pulse_delta, -c * (d + 0.5), d))
    t = torch.where(inside, d, torch.where(r < qn, float(qn), float(qp)))
    dims = [i for i in range(x.dim()) if i != ch_axis] if ch_axis is not None else list(range(x.dim()))
    grad_s = (t * go).sum(dim=dims).reshape(scale.shape) * grad_scale
    return r.clamp(qn, qp) * s, grad_x, grad_s


@pytest.mark.parametrize("qn,qp", RANGES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_reference_matches_builtin_oracle(qn, qp, per_channel):
    """Forward and grad_x bitwise equal to torch._fake_quantize_learnable_*, grad_s close (grad_factor = g)."""
    shape, ch_axis = ((6, 2, 3, 3), 0) if per_channel else ((4, 250), None)
    x, scale, go = _inputs(shape, ch_axis, qn, qp)
    g = _gscale(x, ch_axis, qp)
    zp = torch.zeros_like(scale)
    if per_channel:
        builtin = lambda x, s: torch._fake_quantize_learnable_per_channel_affine(x, s, zp, 0, qn, qp, g)  # noqa: E731
    else:
        builtin = lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, qn, qp, g)  # noqa: E731
    ours = run(lsq_fake_quantize_reference, x, scale, go, qn, qp, g, ch_axis)
    assert_lsq_close(ours, run(builtin, x, scale, go), grad_s_tol(x, scale, go, g))


@pytest.mark.parametrize("pulse_delta,dist_k", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.7), (0.2, 1.5)])
@pytest.mark.parametrize("layout", ["tensor", "channel-K9", "channel-axis1"])
def test_reference_matches_float64_spec(layout, pulse_delta, dist_k):
    shape, ch_axis = LAYOUTS[layout]
    x, scale, go = _inputs(shape, ch_axis, -8, 7)
    y, gx, gs = run(lsq_fake_quantize_reference, x, scale, go, -8, 7, 0.05, ch_axis, pulse_delta, dist_k)
    sy, sgx, sgs = _spec(x, scale, go, -8, 7, 0.05, ch_axis, pulse_delta, dist_k)
    assert torch.equal(y, sy.float())  # every grid value times s is exact in fp32 and fp64 alike
    torch.testing.assert_close(gx.double(), sgx, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs.double(), sgs, rtol=1e-5, atol=grad_s_tol(x, scale, go, 0.05))


def test_pulse_smooth_vanishes_at_transitions():
    """PulseSmooth (delta 0.1, c = 4) on hand-computed points: d inside, -c(d -+ 0.5) near and 0 at the transitions."""
    x = torch.tensor([0.5, 0.55, 0.75, 1.499, 0.0, 2.5])  # d = r - v: -0.5 (tie to 0), 0.45, 0.25, -0.499, 0, -0.5
    want = [0.0, 0.2, 0.25, -0.004, 0.0, 0.0]  # tie 2.5 rounds to 2: d = -0.5 -> F = 0
    for xi, wi in zip(x, want):
        _, _, gs = run(lsq_fake_quantize_reference, xi.reshape(1), torch.tensor([1.0]), torch.ones(1), -8, 7, 1.0, None, 0.1)
        assert gs.item() == pytest.approx(wi, abs=1e-5), float(xi)


@pytest.mark.parametrize("qn,qp", RANGES)
@pytest.mark.parametrize("layout", ["tensor", "channel-K9"])
def test_triton_every_grid(triton_backend, layout, qn, qp):
    shape, ch_axis = LAYOUTS[layout]
    x, scale, go = _inputs(shape, ch_axis, qn, qp)
    g = _gscale(x, ch_axis, qp)
    args = (qn, qp, g, ch_axis)
    ref = run(lsq_fake_quantize_reference, x, scale, go, *args)
    assert_lsq_close(run(lsq_fake_quantize, x, scale, go, *args), ref, grad_s_tol(x, scale, go, g))


@pytest.mark.parametrize("qn,qp", [(-8, 7), (-1, 14), (0, 3)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_layouts(triton_backend, layout, qn, qp):
    shape, ch_axis = LAYOUTS[layout]
    x, scale, go = _inputs(shape, ch_axis, qn, qp)
    ref = run(lsq_fake_quantize_reference, x, scale, go, qn, qp, 0.1, ch_axis)
    assert_lsq_close(run(lsq_fake_quantize, x, scale, go, qn, qp, 0.1, ch_axis), ref, grad_s_tol(x, scale, go, 0.1))


@pytest.mark.parametrize("pulse_delta,dist_k", [(0.1, 0.0), (0.0, 0.7), (0.25, 2.0)])
@pytest.mark.parametrize("layout", ["tensor-odd", "channel-dw"])
def test_triton_scalegrad_options(triton_backend, layout, pulse_delta, dist_k):
    shape, ch_axis = LAYOUTS[layout]
    x, scale, go = _inputs(shape, ch_axis, -4, 3)
    args = (-4, 3, 0.1, ch_axis, pulse_delta, dist_k)
    ref = run(lsq_fake_quantize_reference, x, scale, go, *args)
    tol = grad_s_tol(x, scale, go, 0.1)
    assert_lsq_close(run(lsq_fake_quantize, x, scale, go, *args), ref, tol, exact_grad_x=not dist_k)


@pytest.mark.parametrize("scale_value", [0.25, 0.1, 3.0])
@pytest.mark.parametrize("qn,qp", [(-8, 7), (-7, 8), (0, 15), (-1, 14)])
def test_ties_and_range_edges(triton_backend, qn, qp, scale_value):
    """Values at .5 multiples round half to even; qn-1/qn/qp/qp+1 and the tie beyond each edge follow the rounded mask."""
    s = torch.tensor([scale_value])
    v = torch.cat([torch.arange(qn - 3, qp + 3, 0.5), torch.tensor([qn - 0.5, qp + 0.5, qn - 1, qp + 1, qn, qp])])
    x = v * scale_value
    go = torch.linspace(0.5, 2.0, x.numel())
    ref = run(lsq_fake_quantize_reference, x, s, go, qn, qp, 0.1)
    assert_lsq_close(run(lsq_fake_quantize, x, s, go, qn, qp, 0.1), ref, grad_s_tol(x, s, go, 0.1))
    if scale_value == 0.25:  # x / s is exactly v: check the convention itself
        r = torch.round(v)  # half to even
        assert torch.equal(ref[0], r.clamp(qn, qp) * scale_value)
        inside = (r >= qn) & (r <= qp)
        assert torch.equal(ref[1], torch.where(inside, go, 0.0))
        assert inside[v == qn].all() and inside[v == qp].all() and not inside[v == qn - 1].any()
        assert not inside[v == qp + 1].any()
        assert bool(inside[v == qn - 0.5].all()) == (qn % 2 == 0)  # qn - 0.5 rounds to qn only when qn is even
        assert bool(inside[v == qp + 0.5].all()) == (qp % 2 == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["tensor-odd", "channel-K9"])
def test_triton_half_dtypes(triton_backend, layout, dtype):
    shape, ch_axis = LAYOUTS[layout]
    x, scale, go = _inputs(shape, ch_axis, -8, 7, dtype)
    ref = run(lsq_fake_quantize_reference, x, scale, go, -8, 7, 0.1, ch_axis)
    out = run(lsq_fake_quantize, x, scale, go, -8, 7, 0.1, ch_axis)
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == torch.float32
    if dtype == torch.float16:
        assert_lsq_close(out, ref, grad_s_tol(x, scale, go, 0.1))
    else:  # the interpreter truncates fp32 -> bf16 casts: 1 bf16 ulp
        torch.testing.assert_close(out[0], ref[0], rtol=2**-7, atol=0)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)  # grad_x is g or 0: no rounding
        torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=grad_s_tol(x, scale, go, 0.1))


@pytest.mark.parametrize("kind", ["transposed", "strided", "channels_last"])
def test_triton_non_contiguous(triton_backend, kind):
    base = torch.randn(6, 8, 5, 5)
    views = {"transposed": lambda b: b.transpose(0, 1), "strided": lambda b: b[:, ::2],
             "channels_last": lambda b: b.to(memory_format=torch.channels_last)}  # fmt: skip
    x = views[kind](base)
    ch_axis = 0
    scale = torch.rand(x.shape[0]) * 0.3 + 0.05
    go = torch.randn(x.shape)
    ref = run(lsq_fake_quantize_reference, x, scale, go, -8, 7, 0.1, ch_axis)
    out = run(lsq_fake_quantize, x, scale, go, -8, 7, 0.1, ch_axis)
    assert_lsq_close(out, ref, grad_s_tol(x, scale, go, 0.1))
    assert out[0].stride() == torch.empty_like(x).stride()
    per_tensor = run(lsq_fake_quantize, x, scale[:1], go, -8, 7, 0.1)
    assert_lsq_close(per_tensor, run(lsq_fake_quantize_reference, x, scale[:1], go, -8, 7, 0.1), 1e-4)


@pytest.mark.parametrize("shape,ch_axis", [((0,), None), ((4, 0), 0), ((0, 3), None)])
def test_triton_empty(triton_backend, shape, ch_axis):
    c = 1 if ch_axis is None else shape[ch_axis]
    x, scale, go = torch.empty(shape), torch.full((c,), 0.1), torch.empty(shape)
    y, gx, gs = run(lsq_fake_quantize, x, scale, go, -8, 7, 0.1, ch_axis)
    assert y.shape == shape and gx.shape == shape and torch.equal(gs, torch.zeros(c))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_mask_zeroes_grad_x_only(monkeypatch, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ULTRALYTICS_QAT_BACKEND", backend)
    x, scale, go = _inputs((8, 2, 3, 3), 0, -4, 3)
    frozen = torch.rand(x.shape) < 0.3
    plain = run(lsq_fake_quantize, x, scale, go, -4, 3, 0.1, 0)
    for mask in (frozen, frozen.to(torch.int8)):
        y, gx, gs = run(lsq_fake_quantize, x, scale, go, -4, 3, 0.1, 0, frozen=mask)
        assert torch.equal(y, plain[0]) and torch.equal(gs, plain[2])
        assert torch.equal(gx, torch.where(frozen, 0.0, plain[1]))
        assert (plain[1][frozen] != 0).any()  # the mask really removed something


def test_triton_scale_clamp_and_nan(triton_backend):
    """Scales <= 0 are used as 1e-8 in the forward with the gradient passed on; NaN inputs stay NaN (like torch)."""
    x = torch.tensor([1e-9, -3e-8, 2e-8, float("nan"), 0.5])
    go = torch.ones(5)
    for s in (torch.tensor([0.0]), torch.tensor([-1.0])):
        ref = run(lsq_fake_quantize_reference, x, s, go, -8, 7, 0.1)
        out = run(lsq_fake_quantize, x, s, go, -8, 7, 0.1)
        torch.testing.assert_close(out[0], ref[0], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(out[1], ref[1], equal_nan=True, rtol=0, atol=0)
        assert torch.isnan(out[0][3]) and torch.isnan(out[2]).all() == torch.isnan(ref[2]).all()
