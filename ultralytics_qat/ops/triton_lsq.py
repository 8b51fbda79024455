"""Fused Triton kernels of LSQ fake quantization: one forward pass, one backward pass.

Imported only through :func:`ultralytics_qat.ops.backend.triton_kernels`, i.e. when a call actually runs Triton.

- Forward: ``y = clamp(rint(x / s), qn, qp) * s``, flat over the elements; a per-channel scale is gathered by
  ``offset // M`` (M = elements per channel), so depthwise 3x3 channels (M = 9) cost nothing extra.
- Backward: one pass reads (grad_out, x[, frozen]), writes grad_x and a per-program partial of ``sum(g * t)``; the
  partials are summed by ``torch.sum`` (deterministic, no atomics). Per tensor the programs tile the flat tensor; per
  channel they tile a [C, M] view with BLOCK_C x BLOCK_M tiles and reduce along M.
- Bytes per fp32 element: 8 forward, 12 backward (+1 with a frozen mask) versus ~36 for the builtin learnable op.

Numerics match the PyTorch twin: fp32 compute, ``tl.math.div_rn`` (a plain ``/`` is approximate on GPUs and would
move rounding ties), round-half-even written by hand (no ``rint`` in the interpreter), NaN propagated by the clamp like
``torch.clamp``. The scale is read from device memory, never from the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import triton_interpret
from .reference import SCALE_EPS

# One config only: the interpreter cannot autotune. 4096 fp32 = 16 KiB per program keeps the GPU's memory pipes busy
# with 4 warps; the interpreter pays ~1.2 ms per program, so it gets 64 Ki-element blocks instead.
_INTERPRET = triton_interpret()
BLOCK = 65536 if _INTERPRET else 4096
NUM_WARPS = 4
TILE = 65536 if _INTERPRET else 4096  # elements per per-channel backward tile (BLOCK_C * BLOCK_M)


@triton.jit
def rint(v):
    """Round half to even, exact for every fp32 (|v| >= 2^23 is already integral, so ``v - floor(v)`` is 0)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(0.5 * f)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _clamp(r, qn, qp):
    r = tl.maximum(r, qn, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(r, qp, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pulse_smooth(t, delta, c):
    hi = t >= 0.5 - delta
    lo = t <= -0.5 + delta
    return tl.where(hi, -c * (t - 0.5), tl.where(lo, -c * (t + 0.5), t))


@triton.jit
def _grad_terms(g, x, s, qn, qp, keep, pulse_delta, pulse_c, dist_k, HAS_PULSE: tl.constexpr, HAS_DIST: tl.constexpr):
    """(grad_x, g * t) per element; mirrors ``reference.lsq_backward_terms`` line by line."""
    v = tl.math.div_rn(x, s)
    r = rint(v)
    inside = (r >= qn) & (r <= qp)
    t = r - v
    gx = g
    if HAS_DIST:
        gx = g * tl.exp(-dist_k * tl.abs(t))
    gx = tl.where(inside & keep, gx, 0.0)
    if HAS_PULSE:
        t = _pulse_smooth(t, pulse_delta, pulse_c)
    t = tl.where(inside, t, _clamp(r, qn, qp))
    return gx, t * g


@triton.jit
def _lsq_fwd_kernel(x_ptr, s_ptr, y_ptr, N, M, qn, qp, eps, PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs // M, mask=mask, other=1.0).to(tl.float32)
    else:
        s = tl.load(s_ptr).to(tl.float32)
    s = tl.maximum(s, eps, propagate_nan=tl.PropagateNan.ALL)
    y = _clamp(rint(tl.math.div_rn(x, s)), qn, qp) * s
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_bwd_tensor_kernel(
    g_ptr, x_ptr, frz_ptr, s_ptr, gx_ptr, part_ptr, N, qn, qp, eps, pulse_delta, pulse_c, dist_k,
    HAS_FROZEN: tl.constexpr, HAS_PULSE: tl.constexpr, HAS_DIST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # g = 0 outside: no partial contribution
    if HAS_FROZEN:
        keep = tl.load(frz_ptr + offs, mask=mask, other=0) == 0
    else:
        keep = mask
    s = tl.maximum(tl.load(s_ptr).to(tl.float32), eps, propagate_nan=tl.PropagateNan.ALL)
    gx, prod = _grad_terms(g, x, s, qn, qp, keep, pulse_delta, pulse_c, dist_k, HAS_PULSE, HAS_DIST)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, prod, 0.0), axis=0))


@triton.jit
def _lsq_bwd_channel_kernel(
    g_ptr, x_ptr, frz_ptr, s_ptr, gx_ptr, part_ptr, C, M, n_mblocks, qn, qp, eps, pulse_delta, pulse_c, dist_k,
    HAS_FROZEN: tl.constexpr, HAS_PULSE: tl.constexpr, HAS_DIST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)  # axis 0 (up to 2^31 programs) along M; axis 1 (65535) along channels
    rows = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C
    mask = row_ok[:, None] & (cols < M)[None, :]
    offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_FROZEN:
        keep = tl.load(frz_ptr + offs, mask=mask, other=0) == 0
    else:
        keep = mask
    s = tl.load(s_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    s = tl.maximum(s, eps, propagate_nan=tl.PropagateNan.ALL)[:, None]
    gx, prod = _grad_terms(g, x, s, qn, qp, keep, pulse_delta, pulse_c, dist_k, HAS_PULSE, HAS_DIST)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + rows.to(tl.int64) * n_mblocks + pid_m, tl.sum(tl.where(mask, prod, 0.0), axis=1), mask=row_ok)


def _channel_tiles(C: int, M: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M) of about TILE elements: long channels get wide rows, tiny ones (M = 9) many rows."""
    block_m = min(triton.next_power_of_2(max(M, 1)), TILE)
    block_c = max(1, min(TILE // block_m, triton.next_power_of_2(max(C, 1))))
    return block_c, block_m


def _as_2d(t: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """[C, M] contiguous view (a copy only when ``ch_axis != 0`` or ``t`` is not contiguous)."""
    if ch_axis % t.dim() != 0:
        t = t.movedim(ch_axis, 0)
    return t.contiguous().view(t.shape[0], -1)


def _frozen_u8(frozen: torch.Tensor | None, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor | None:
    if frozen is None:
        return None
    if frozen.shape != x.shape:  # metadata only: no device sync
        raise ValueError(f"`frozen` must have the shape of x {tuple(x.shape)}, got {tuple(frozen.shape)}.")
    f = frozen.view(torch.uint8) if frozen.dtype == torch.bool else frozen
    return f.contiguous().view(-1) if ch_axis is None else _as_2d(f, ch_axis)


def lsq_forward(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, ch_axis: int | None) -> torch.Tensor:
    """Launch the forward kernel; returns a contiguous tensor shaped and typed like ``x``."""
    if ch_axis is None or x.dim() == 0:
        xf, m = x.contiguous().view(-1), 1
    else:
        xf = _as_2d(x, ch_axis)
        m = xf.shape[1]
    y = torch.empty_like(xf)
    n = xf.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        _lsq_fwd_kernel[grid](
            xf, scale.contiguous(), y, n, m, float(qn), float(qp), SCALE_EPS,
            PER_CHANNEL=ch_axis is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    if ch_axis is not None and x.dim() and ch_axis % x.dim() != 0:
        return y.view(x.movedim(ch_axis, 0).shape).movedim(0, ch_axis).contiguous()
    return y.view(x.shape)


def lsq_backward(grad_out, x, scale, qn, qp, grad_scale, ch_axis=None, pulse_delta=0.0, dist_k=0.0, frozen=None):
    """Launch the fused backward; returns ``(grad_x, grad_scale)`` like ``reference.lsq_backward``."""
    has_pulse, has_dist = bool(pulse_delta), bool(dist_k)
    pulse_c = (0.5 - pulse_delta) / pulse_delta if has_pulse else 0.0
    scalars = (float(qn), float(qp), SCALE_EPS, float(pulse_delta), float(pulse_c), float(dist_k))
    flags = dict(HAS_FROZEN=frozen is not None, HAS_PULSE=has_pulse, HAS_DIST=has_dist, num_warps=NUM_WARPS)
    frz = _frozen_u8(frozen, x, ch_axis if x.dim() else None)
    if ch_axis is None or x.dim() == 0:
        xf, gf = x.contiguous().view(-1), grad_out.contiguous().view(-1)
        n = xf.numel()
        gx = torch.empty_like(xf)
        nblocks = triton.cdiv(n, BLOCK)
        part = torch.empty(nblocks, dtype=torch.float32, device=x.device)
        if n:
            _lsq_bwd_tensor_kernel[(nblocks,)](
                gf, xf, frz if frz is not None else xf, scale.contiguous(), gx, part, n, *scalars, BLOCK=BLOCK, **flags
            )
        grad_s = part.sum().reshape(scale.shape)
        grad_x = gx.view(x.shape)
    else:
        xf, gf = _as_2d(x, ch_axis), _as_2d(grad_out, ch_axis)
        c, m = xf.shape
        gx = torch.empty_like(xf)
        block_c, block_m = _channel_tiles(c, m)
        n_mblocks = triton.cdiv(m, block_m)
        part = torch.zeros((c, n_mblocks), dtype=torch.float32, device=x.device)
        if xf.numel():
            grid = (n_mblocks, triton.cdiv(c, block_c))
            _lsq_bwd_channel_kernel[grid](
                gf, xf, frz if frz is not None else xf, scale.contiguous(), gx, part, c, m, n_mblocks, *scalars,
                BLOCK_C=block_c, BLOCK_M=block_m, **flags,
            )  # fmt: skip
        grad_s = part.sum(dim=1).reshape(scale.shape)
        grad_x = gx.view(x.movedim(ch_axis, 0).shape).movedim(0, ch_axis) if ch_axis % x.dim() else gx.view(x.shape)
    return grad_x.to(x.dtype), grad_s.mul_(grad_scale).to(scale.dtype)
