"""Oscillation tracking and iterative freezing of quantized weights, in plain PyTorch (the CPU path and the oracle).

Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022 (reference code:
Qualcomm-AI-research/oscillations-qat). Per weight, on every tracked forward:

    x_int   = clamp(round_half_even(w / s), qn, qp);  frozen weights use frozen_int instead
    delta   = prev_int - x_int;  dir = sign(delta)
    osc     = prev_dir * dir == -1                     (the integer reversed its direction of change)
    freq    = m * osc + (1 - m) * freq                 (EMA of the oscillation frequency)
    prev_dir <- dir where delta != 0;  prev_int <- x_int
    if freeze_threshold > 0: weights not yet frozen with freq > thr freeze to frozen_int = round(ema_int),
                             with ema_int taken BEFORE this step's update
    ema_int = m * x_int + (1 - m) * ema_int            (every call, so it is meaningful when freezing starts)

Two choices differ from the reference code and are deliberate: the integer EMA is updated on every call (the
reference updates it only while the threshold is positive), and a frozen weight keeps its integer (the reference
re-assigns ``round(ema_int)`` to every weight above the threshold on every step, frozen or not).

State is compact and lives in caller-owned tensors (module buffers), all with the shape of ``w`` and contiguous:
int8 ``prev_int``, ``prev_dir``, ``frozen`` (0/1) and ``frozen_int``; fp32 ``freq`` and ``ema_int``. int8 limits the
integer range to [-128, 127], i.e. signed grids of up to 8 bits and unsigned grids of up to 7 bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import _broadcast_scale

STATE_DTYPES = {
    "prev_int": torch.int8,
    "prev_dir": torch.int8,
    "frozen": torch.int8,
    "frozen_int": torch.int8,
    "freq": torch.float32,
    "ema_int": torch.float32,
}


class OscillationState(NamedTuple):
    """The six tracker tensors, in the order :func:`track_oscillations` takes them."""

    prev_int: torch.Tensor
    prev_dir: torch.Tensor
    frozen: torch.Tensor
    frozen_int: torch.Tensor
    freq: torch.Tensor
    ema_int: torch.Tensor


def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, ch_axis: int | None = None) -> torch.Tensor:
    """``clamp(round(w / s), qn, qp)`` as fp32 integers (same rounding and scale clamp as the LSQ forward)."""
    s = _broadcast_scale(scale, w, ch_axis)
    return torch.div(w.float(), s).round_().clamp_(qn, qp)


def init_oscillation_state(
    w: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, ch_axis: int | None = None
) -> OscillationState:
    """Fresh tracker state for ``w``: prev_int and ema_int at the current integers, no history, nothing frozen.

    Register the six tensors as buffers (so they are checkpointed and follow ``.to()``) and pass them to
    :func:`track_oscillations` in this order.
    """
    x_int = quantize_to_int(w.detach(), scale.detach(), qn, qp, ch_axis)
    zeros8 = torch.zeros(w.shape, dtype=torch.int8, device=w.device)
    return OscillationState(
        prev_int=x_int.to(torch.int8),
        prev_dir=zeros8.clone(),
        frozen=zeros8.clone(),
        frozen_int=zeros8,
        freq=torch.zeros(w.shape, dtype=torch.float32, device=w.device),
        ema_int=x_int.contiguous(),
    )


@torch.no_grad()
def track_oscillations_reference(
    w: torch.Tensor,
    scale: torch.Tensor,
    qn: int,
    qp: int,
    prev_int: torch.Tensor,
    prev_dir: torch.Tensor,
    frozen: torch.Tensor,
    frozen_int: torch.Tensor,
    freq: torch.Tensor,
    ema_int: torch.Tensor,
    momentum: float,
    freeze_threshold: float,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """One tracking step in PyTorch; updates the six state tensors in place (see the module docstring).

    Returns:
        The number of oscillations in this step, a 0-d int64 tensor on ``w.device`` (no host sync).
    """
    m, keep = float(momentum), 1.0 - float(momentum)
    fz = frozen != 0
    x_int = torch.where(fz, frozen_int.float(), quantize_to_int(w, scale, qn, qp, ch_axis))
    delta = prev_int.float() - x_int
    direction = torch.sign(delta)
    osc = (prev_dir.float() * direction) == -1
    freq.copy_(m * osc + keep * freq)
    prev_dir.copy_(torch.where(delta != 0, direction, prev_dir.float()))
    prev_int.copy_(x_int)
    if freeze_threshold > 0:
        new = (freq > freeze_threshold) & ~fz
        frozen_int.copy_(torch.where(new, torch.round(ema_int), frozen_int.float()))
        frozen.copy_(fz | new)
    ema_int.copy_(m * x_int + keep * ema_int)
    return osc.sum()
