"""LSQ fake quantization in plain PyTorch: the CPU path and the oracle for every other backend.

Math (Esser et al., ICLR 2020, "Learned Step Size Quantization"), with v = x / s and r = round_half_even(v):

    forward   q = clamp(r, qn, qp) * s
    grad_x    g_q                    where qn <= r <= qp, else 0            (straight-through estimator)
    grad_s    sum(g_q * t) * grad_scale,  t = r - v inside, qn below, qp above

with the gradient scale ``grad_scale`` = 1 / sqrt(N * max(qp, -qn, 1)), N = elements per scale value, computed by
the caller (``LSQQuantizer.grad_scale``). The paper's qp is replaced by the largest |level| so that a zero-point grid
like [-14, 1] (qp = 1) gets a gradient comparable to that of a symmetric grid of the same width, not ~3x larger.

The in/out mask is the *rounded* one (out when r < qn or r > qp), the convention of PyTorch's
``torch._fake_quantize_learnable_*`` ops, so the forward and ``grad_x`` match that builtin bitwise. Masks are written
explicitly: since torch 2.14 ``clamp`` gives a zero gradient at exactly min/max, which would silently drop the
gradient of every value that lands on a grid end.

Two ScaleGrad options from the oscillation-aware QAT paper (seed 002) act on the in-range elements:
``pulse_delta`` replaces t = r - v by PulseSmooth F(t), which decays to 0 at the rounding transitions |t| -> 0.5, and
``dist_k`` scales grad_x by exp(-k |t|) so weights near a transition move less.

The scale is used through ``clamp_min(SCALE_EPS)`` in the forward only; its gradient passes unchanged, so a scale
pushed to zero by a large step can recover instead of sticking at a clamp with zero gradient.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8


def _broadcast_scale(scale: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """View ``scale`` ([1] or [C]) so it broadcasts against ``x`` along ``ch_axis``."""
    s = scale.float().clamp_min(SCALE_EPS)
    if ch_axis is None:
        return s.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return s.reshape(shape)


def pulse_smooth(t: torch.Tensor, delta) -> torch.Tensor:
    """PulseSmooth F(t) of seed 002: t inside, falling linearly to 0 at t = +-0.5 within ``delta`` of it.

    ``delta`` is a float or a 0-d tensor (the compiled CPU path passes tensors so one graph serves every value).
    """
    c = (0.5 - delta) / delta
    hi = t >= 0.5 - delta
    lo = t <= -0.5 + delta
    return torch.where(hi, -c * (t - 0.5), torch.where(lo, -c * (t + 0.5), t))


class LSQFakeQuant(torch.autograd.Function):
    """Autograd function of LSQ fake quantization; ``backward`` recomputes from ``x`` instead of storing masks."""

    @staticmethod
    def forward(ctx, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen=None):  # noqa: D102
        ctx.save_for_backward(x, scale, frozen)
        ctx.args = (qn, qp, grad_scale, ch_axis, pulse_delta, dist_k)
        return lsq_forward(x, scale, qn, qp, ch_axis)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, scale, frozen = ctx.saved_tensors
        qn, qp, grad_scale, ch_axis, pulse_delta, dist_k = ctx.args
        grad_x, grad_s = lsq_backward(grad_out, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen)
        return grad_x, grad_s, None, None, None, None, None, None, None


def lsq_forward(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, ch_axis: int | None = None) -> torch.Tensor:
    """Forward ``clamp(round(x / s), qn, qp) * s`` in fp32, returned in ``x.dtype`` (4 passes, 1 allocation)."""
    s = _broadcast_scale(scale, x, ch_axis)
    return torch.div(x.float(), s).round_().clamp_(qn, qp).mul_(s).to(x.dtype)


def lsq_backward_terms(g, x, s, qn, qp, pulse_delta, dist_k, frozen, has_pulse, has_dist: bool):
    """Per-element LSQ gradients in fp32: ``(grad_x, g * t)`` with t the per-element scale-gradient term.

    ``s`` is already clamped and broadcastable; ``qn``, ``qp``, ``pulse_delta`` and ``dist_k`` are numbers or 0-d
    tensors (the compiled CPU path passes tensors so one graph serves every bit width). The caller reduces ``g * t``.
    Written without ``masked_fill`` (slow on CPU) and with the clip as explicit masks (see module docstring).
    """
    g = g.float()
    v = x.float() / s
    r = torch.round(v)
    inside = (r >= qn) & (r <= qp)
    t = r - v  # rounding error in units of s, in [-0.5, 0.5]
    grad_x = g * torch.exp(-dist_k * t.abs()) if has_dist else g
    keep = inside if frozen is None else inside & (frozen == 0)
    grad_x = torch.where(keep, grad_x, 0.0)
    if isinstance(has_pulse, torch.Tensor):  # 0-d bool tensor: one compiled graph with and without PulseSmooth
        t = torch.where(has_pulse, pulse_smooth(t, pulse_delta), t)
    elif has_pulse:
        t = pulse_smooth(t, pulse_delta)
    t = torch.where(inside, t, r.clamp_(qn, qp))  # qn below the range, qp above
    return grad_x, t.mul_(g)


def lsq_backward(grad_out, x, scale, qn, qp, grad_scale, ch_axis=None, pulse_delta=0.0, dist_k=0.0, frozen=None):
    """Gradients (grad_x, grad_scale) of LSQ fake quantization, recomputed from the input ``x``.

    ``frozen`` (optional, same shape as ``x``, bool or integer) zeroes grad_x where nonzero; the scale gradient of
    frozen elements is kept.
    """
    s = _broadcast_scale(scale, x, ch_axis)
    grad_x, prod = lsq_backward_terms(
        grad_out, x, s, qn, qp, pulse_delta, dist_k, frozen, bool(pulse_delta), bool(dist_k)
    )
    if ch_axis is None:
        grad_s = prod.sum().reshape(scale.shape)
    else:
        dims = [d for d in range(x.dim()) if d != ch_axis % max(x.dim(), 1)]
        grad_s = prod.sum(dim=dims).reshape(scale.shape)
    grad_s.mul_(grad_scale)
    return grad_x.to(x.dtype), grad_s.to(scale.dtype)


def lsq_fake_quantize_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ch_axis: int | None = None,
    pulse_delta: float = 0.0,
    dist_k: float = 0.0,
    *,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to the grid ``s * [qn, qp]`` with the LSQ gradients (see module docstring).

    Args:
        x: Input, any float dtype; computed in fp32 and returned in ``x.dtype``.
        scale: Positive scale, shape [1] (per tensor) or [C] with C = x.shape[ch_axis] (per channel).
        qn: Lowest integer level (e.g. -8 for signed 4 bit, 0 for unsigned).
        qp: Highest integer level (e.g. 7 for signed 4 bit, 15 for unsigned).
        grad_scale: LSQ gradient scale g = 1 / sqrt(N * max(qp, -qn, 1)), N = elements per scale value.
        ch_axis: Channel axis of a per-channel scale, None for a per-tensor scale.
        pulse_delta: PulseSmooth width delta in (0, 0.5) for the scale gradient; 0 disables it.
        dist_k: Distance-aware weight-gradient factor k >= 0; 0 disables it.
        frozen: Optional mask, same shape as ``x`` (bool or integer): grad_x is zero where it is nonzero (weights
            frozen by oscillation tracking). The forward and the scale gradient are unchanged.

    Returns:
        The fake-quantized tensor, same shape and dtype as ``x``.
    """
    return LSQFakeQuant.apply(
        x, scale, int(qn), int(qp), float(grad_scale), ch_axis, float(pulse_delta), float(dist_k), frozen
    )
