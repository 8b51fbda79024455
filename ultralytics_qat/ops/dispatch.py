"""The one entry point of LSQ fake quantization and oscillation tracking used by every quantizer module.

Both are ``torch.library`` custom ops (namespace ``ultralytics_qat``) with fake (meta) implementations and, for LSQ,
a registered autograd formula, so they run under ``torch.compile(fullgraph=True)`` as single opaque nodes. The backend
is chosen inside the op per call (``backend.use_triton``): the Triton kernels for CUDA tensors, the PyTorch twin
otherwise (on CPU through the Inductor-compiled graphs of ``cpu_compile`` and ``cpu_compile_track`` where they apply;
``cpu_compile_paths()`` tells which path the calls took). Modules never choose a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .backend import triton_kernels, use_triton
from .cpu_compile import lsq_backward_compiled, lsq_forward_compiled
from .cpu_compile_track import track_compiled
from .oscillation import STATE_DTYPES, track_oscillations_reference


def _match_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` with the strides ``torch.empty_like(x)`` has, which is what the fake implementations promise."""
    like = torch.empty_like(x, dtype=y.dtype)
    return y if like.stride() == y.stride() else like.copy_(y)


# ---------------------------------------------------------------------------------------------------------- LSQ ops
@torch.library.custom_op("ultralytics_qat::lsq_fake_quant", mutates_args=())
def _lsq_op(
    x: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ch_axis: int | None,
    pulse_delta: float,
    dist_k: float,
    frozen: Tensor | None,
) -> Tensor:
    if use_triton(x):
        y = triton_kernels("triton_lsq").lsq_forward(x, scale, qn, qp, ch_axis)
    else:
        y = lsq_forward_compiled(x, scale, qn, qp, ch_axis)
        if y is None:
            y = reference.lsq_forward(x, scale, qn, qp, ch_axis)
    return _match_layout(y, x)


@_lsq_op.register_fake
def _(x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen):
    return torch.empty_like(x)


@torch.library.custom_op("ultralytics_qat::lsq_fake_quant_backward", mutates_args=())
def _lsq_backward_op(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ch_axis: int | None,
    pulse_delta: float,
    dist_k: float,
    frozen: Tensor | None,
) -> tuple[Tensor, Tensor]:
    args = (grad_out, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen)
    if use_triton(x):
        out = triton_kernels("triton_lsq").lsq_backward(*args)
    else:
        out = lsq_backward_compiled(*args) or reference.lsq_backward(*args)
    grad_x, grad_s = out
    return _match_layout(grad_x, x), grad_s


@_lsq_backward_op.register_fake
def _(grad_out, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen):
    return torch.empty_like(x), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen = inputs
    # a copy: the oscillation tracker updates the frozen buffer in place between this forward and its backward
    ctx.save_for_backward(x, scale, None if frozen is None else frozen.clone())
    ctx.args = (qn, qp, grad_scale, ch_axis, pulse_delta, dist_k)


def _backward(ctx, grad_out):
    x, scale, frozen = ctx.saved_tensors
    qn, qp, grad_scale, ch_axis, pulse_delta, dist_k = ctx.args
    grad_x, grad_s = _lsq_backward_op(grad_out, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen)
    return grad_x, grad_s, None, None, None, None, None, None, None


_lsq_op.register_autograd(_backward, setup_context=_setup_context)


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ch_axis: int | None = None,
    pulse_delta: float = 0.0,
    dist_k: float = 0.0,
    *,
    frozen: Tensor | None = None,
) -> Tensor:
    """LSQ fake quantization with the LSQ gradients; the math is :func:`ops.reference.lsq_fake_quantize_reference`.

    Args:
        x: Input, fp32/fp16/bf16, any shape and strides; computed in fp32, returned in ``x.dtype``.
        scale: Positive scale, [1] (per tensor) or [C] with C = x.shape[ch_axis] (per channel); read on the device.
        qn: Lowest integer level (e.g. -8 signed 4 bit, 0 unsigned, -1 for the asymmetric [-1, 14]).
        qp: Highest integer level.
        grad_scale: LSQ gradient scale g = 1 / sqrt(N * max(qp, -qn, 1)), N = elements per scale value.
        ch_axis: Channel axis of a per-channel scale (weights: 0), None for a per-tensor scale.
        pulse_delta: PulseSmooth width in (0, 0.5) for the scale gradient; 0 disables it.
        dist_k: Distance-aware factor: grad_x *= exp(-k |round(v) - v|) inside the range; 0 disables it.
        frozen: Optional mask shaped like ``x`` (bool/int8/uint8): grad_x is 0 where nonzero; forward and scale
            gradient unchanged. The mask as of this call is used by the backward (it is copied, so the tracker may
            update the buffer in place before ``backward``).

    Returns:
        The fake-quantized tensor, shape, strides and dtype of ``x``.

    Examples:
        >>> w = torch.randn(16, 8, 3, 3, requires_grad=True)
        >>> s = torch.full((16,), 0.1, requires_grad=True)
        >>> lsq_fake_quantize(w, s, -8, 7, (w[0].numel() * max(7, 8, 1)) ** -0.5, ch_axis=0).sum().backward()
    """
    if ch_axis is not None:
        ch_axis = ch_axis % max(x.dim(), 1)
    return _lsq_op(x, scale, int(qn), int(qp), float(grad_scale), ch_axis, float(pulse_delta), float(dist_k), frozen)


# -------------------------------------------------------------------------------------------- oscillation tracking
@torch.library.custom_op(
    "ultralytics_qat::track_oscillations",
    mutates_args=("prev_int", "prev_dir", "frozen", "frozen_int", "freq", "ema_int"),
)
def _track_op(
    w: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    prev_int: Tensor,
    prev_dir: Tensor,
    frozen: Tensor,
    frozen_int: Tensor,
    freq: Tensor,
    ema_int: Tensor,
    momentum: float,
    freeze_threshold: float,
    ch_axis: int | None,
) -> Tensor:
    args = (w, scale, qn, qp, prev_int, prev_dir, frozen, frozen_int, freq, ema_int, momentum, freeze_threshold, ch_axis)
    if use_triton(w):
        return triton_kernels("triton_oscillation").track_oscillations(*args)
    count = track_compiled(*args)
    return track_oscillations_reference(*args) if count is None else count


@_track_op.register_fake
def _(w, scale, qn, qp, prev_int, prev_dir, frozen, frozen_int, freq, ema_int, momentum, freeze_threshold, ch_axis):
    return w.new_empty((), dtype=torch.int64)


def _check_state(w: Tensor, state: dict[str, Tensor], qn: int, qp: int, momentum: float) -> None:
    """Metadata checks only (no device sync): shapes, dtypes, contiguity, range of the int8 state."""
    if not (-128 <= qn < qp <= 127):
        raise ValueError(f"Oscillation tracking stores integers in int8: need -128 <= qn < qp <= 127, got [{qn}, {qp}].")
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"`momentum` must be in (0, 1], got {momentum}.")
    for name, t in state.items():
        want = STATE_DTYPES[name]
        if t.shape != w.shape or t.dtype != want or not t.is_contiguous() or t.device != w.device:
            raise ValueError(
                f"Tracker state `{name}` must be a contiguous {want} tensor of shape {tuple(w.shape)} on {w.device}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()}); "
                "create it with `init_oscillation_state`."
            )


def track_oscillations(
    w: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    prev_int: Tensor,
    prev_dir: Tensor,
    frozen: Tensor,
    frozen_int: Tensor,
    freq: Tensor,
    ema_int: Tensor,
    momentum: float,
    freeze_threshold: float,
    ch_axis: int | None = None,
) -> Tensor:
    """One oscillation-tracking step: quantize ``w`` and update the six state tensors IN PLACE.

    Semantics in :mod:`ultralytics_qat.ops.oscillation`. One fused kernel on CUDA (Triton), the PyTorch twin elsewhere.
    Call it under ``torch.no_grad()`` on the latent weight (it never builds a graph).

    Args:
        w: Latent weight, fp32/fp16/bf16, any strides.
        scale: Its scale, [1] or [C] with C = w.shape[0] (per-channel along axis 0 only).
        qn: Lowest integer level, >= -128.
        qp: Highest integer level, <= 127.
        prev_int: int8, shape of ``w``, contiguous: the integers of the previous step.
        prev_dir: int8: the last direction of change (-1, 0, +1).
        frozen: int8 0/1: frozen flags.
        frozen_int: int8: the integer a frozen weight is held at.
        freq: fp32: EMA of the oscillation frequency.
        ema_int: fp32: EMA of the integers (the value a weight freezes to, rounded).
        momentum: EMA momentum m in (0, 1] (0.01 in oscillations-qat's class, 0.001 in its scripts).
        freeze_threshold: Freeze weights whose ``freq`` exceeds it; 0 disables freezing (tracking continues).
        ch_axis: None for a per-tensor scale, 0 for per-output-channel.

    Returns:
        The number of oscillations in this step: a 0-d int64 tensor on ``w.device`` (no host sync).

    Examples:
        >>> w, s = torch.randn(8, 4, 3, 3), torch.full((8,), 0.3)
        >>> state = init_oscillation_state(w, s, -8, 7, ch_axis=0)
        >>> n_osc = track_oscillations(w, s, -8, 7, *state, momentum=0.01, freeze_threshold=0.0, ch_axis=0)
    """
    qn, qp, momentum = int(qn), int(qp), float(momentum)
    state = dict(prev_int=prev_int, prev_dir=prev_dir, frozen=frozen, frozen_int=frozen_int, freq=freq, ema_int=ema_int)
    _check_state(w, state, qn, qp, momentum)
    if ch_axis is not None:
        ch_axis = ch_axis % max(w.dim(), 1)
        if ch_axis != 0:
            raise ValueError(f"Oscillation tracking supports per-channel scales along axis 0 only, got ch_axis={ch_axis}.")
    return _track_op(w.detach(), scale.detach(), qn, qp, *state.values(), momentum, float(freeze_threshold), ch_axis)
