"""The fast CPU path of oscillation tracking: the twin's update compiled once by TorchInductor.

Why: the eager twin runs ~15 elementwise kernels per tracked layer and step (about 45 ms per step for yolov8n's
2.8M tracked 4-bit weights on one thread, a third of QAT's overhead); one fused loop does the same work in a single
pass. Same policy as the LSQ backward (``cpu_compile``): ``ULTRALYTICS_QAT_CPU_COMPILE=async|sync|off``, compiled in
the background while the eager twin runs (on first use under deterministic training), inference-mode calls eager,
any failure means eager for the rest of the process. Scalars (qn, qp, momentum, threshold) are 0-d tensors and sizes
are dynamic, so one graph per layout (per tensor, per channel) serves every layer and bit width. The scale is clamped
to ``SCALE_EPS`` like the LSQ forward's, so a tracked integer is always the one the forward used.
"""

from __future__ import annotations

import torch

from .async_compile import AsyncCompiled, warm_randn
from .cpu_compile import compile_mode
from .reference import SCALE_EPS

MIN_NUMEL = 1 << 12  # smaller tensors: eager costs about the same


def _track_core(w, s, qn, qp, m, thr, prev_int, prev_dir, frozen, frozen_int, freq, ema_int):
    """The twin's update (``oscillation.track_oscillations_reference``) on flat or [rows, n] views, state in place."""
    keep = 1.0 - m
    fz = frozen != 0
    x_int = torch.where(fz, frozen_int.float(), torch.clamp(torch.round(w.float() / s), qn, qp))
    delta = prev_int.float() - x_int
    direction = torch.sign(delta)
    osc = (prev_dir.float() * direction) == -1
    new_freq = m * osc.float() + keep * freq
    new_dir = torch.where(delta != 0, direction, prev_dir.float())
    new = (new_freq > thr) & ~fz & (thr > 0)
    new_frozen_int = torch.where(new, torch.round(ema_int), frozen_int.float())
    new_ema = m * x_int + keep * ema_int
    # in-place writes into the caller's buffers: Inductor stores them from the same fused loop
    prev_int.copy_(x_int.to(torch.int8))
    prev_dir.copy_(new_dir.to(torch.int8))
    frozen.copy_((fz | new).to(torch.int8))
    frozen_int.copy_(new_frozen_int.to(torch.int8))
    freq.copy_(new_freq)
    ema_int.copy_(new_ema)
    return osc.sum()


def _warm(rows: int | None):
    """Warm-up on a [rows, n] (per channel) or flat (per tensor) weight, with that layout's scale."""

    def warm(fn) -> None:
        shape = (rows, MIN_NUMEL // 2) if rows else (2 * MIN_NUMEL,)
        w = warm_randn(*shape)
        z8 = torch.zeros(shape, dtype=torch.int8)
        zf = torch.zeros(shape)
        s = torch.full((rows, 1), 0.5) if rows else torch.tensor(0.5)
        fn(w, s, *(torch.tensor(v) for v in (-7.0, 7.0, 0.01, 0.1)), z8, z8.clone(), z8.clone(), z8.clone(), zf,
           zf.clone())  # fmt: skip

    return warm


# per tensor on flat views: a [1, n] view would specialise its size-1 dim and recompile against the per-channel graph
_COMPILED = {
    False: AsyncCompiled(_track_core, _warm(None), "oscillation tracking (per tensor)", "track_oscillations"),
    True: AsyncCompiled(_track_core, _warm(4), "oscillation tracking (per channel)", "track_oscillations"),
}


def track_compiled(w, scale, qn, qp, prev_int, prev_dir, frozen, frozen_int, freq, ema_int, momentum, threshold,
                   ch_axis=None):  # fmt: skip
    """One tracking step through the compiled graph, state updated in place; None when unavailable (run eager)."""
    if w.device.type != "cpu" or w.numel() < MIN_NUMEL or w.dim() == 0:
        return None
    per_channel = ch_axis is not None
    rows = w.shape[0]
    if per_channel and (rows < 2 or w.numel() // rows < 2):
        return None  # size-1 dims would specialise the dynamic graph
    view = (lambda t: t.reshape(rows, -1)) if per_channel else (lambda t: t.reshape(-1))
    s = scale.detach().float().clamp_min(SCALE_EPS)  # the forward's clamp: same integers as the LSQ forward
    s = s.reshape(-1, 1) if per_channel else s.reshape(())
    scal = [torch.tensor(float(v)) for v in (qn, qp, momentum, threshold)]
    state = [prev_int, prev_dir, frozen, frozen_int, freq, ema_int]  # contiguous (checked): views share storage
    w = view(w.detach()).contiguous()
    return _COMPILED[per_channel].run(compile_mode(), w, s, *scal, *(view(t) for t in state))
