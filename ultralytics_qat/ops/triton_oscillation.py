"""Fused Triton kernel of oscillation tracking: quantize the weights and update the tracker state in one pass.

Imported only through :func:`ultralytics_qat.ops.backend.triton_kernels`. Semantics: ``oscillation.py``. Per fp32
weight the pass moves 4 (w) + 4 x 1 (int8 state, read and written) + 2 x 4 (fp32 state, read and written) bytes:
~40 B/element versus ~240 B for the eager twin's ~30 kernels. Per-program oscillation counts are summed by
``torch.sum`` (deterministic, no host sync).

FMA contraction is switched off (``enable_fp_fusion=False``) so the two EMAs round exactly like the eager twin's
separate multiply and add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SCALE_EPS
from .triton_lsq import BLOCK, NUM_WARPS, _clamp, rint


@triton.jit
def _track_kernel(
    w_ptr, s_ptr, prev_int_ptr, prev_dir_ptr, frozen_ptr, frozen_int_ptr, freq_ptr, ema_ptr, count_ptr,
    N, M, qn, qp, eps, m, keep, thr,
    PER_CHANNEL: tl.constexpr, FREEZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs // M, mask=mask, other=1.0).to(tl.float32)
    else:
        s = tl.load(s_ptr).to(tl.float32)
    s = tl.maximum(s, eps, propagate_nan=tl.PropagateNan.ALL)
    fz = tl.load(frozen_ptr + offs, mask=mask, other=0) != 0
    frozen_int = tl.load(frozen_int_ptr + offs, mask=mask, other=0).to(tl.float32)
    x_int = tl.where(fz, frozen_int, _clamp(rint(tl.math.div_rn(w, s)), qn, qp))
    prev_int = tl.load(prev_int_ptr + offs, mask=mask, other=0).to(tl.float32)
    prev_dir = tl.load(prev_dir_ptr + offs, mask=mask, other=0).to(tl.float32)
    delta = prev_int - x_int
    direction = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
    osc = (prev_dir * direction) == -1.0
    freq = tl.load(freq_ptr + offs, mask=mask, other=0.0)
    freq = tl.where(osc, m, 0.0) + keep * freq  # m * osc is exactly m or 0
    ema = tl.load(ema_ptr + offs, mask=mask, other=0.0)
    tl.store(freq_ptr + offs, freq, mask=mask)
    tl.store(prev_dir_ptr + offs, tl.where(delta != 0, direction, prev_dir).to(tl.int8), mask=mask)
    tl.store(prev_int_ptr + offs, x_int.to(tl.int8), mask=mask)
    if FREEZE:
        new = (freq > thr) & (fz == 0)
        tl.store(frozen_int_ptr + offs, tl.where(new, rint(ema), frozen_int).to(tl.int8), mask=mask)
        tl.store(frozen_ptr + offs, (fz | new).to(tl.int8), mask=mask)
    tl.store(ema_ptr + offs, m * x_int + keep * ema, mask=mask)
    tl.store(count_ptr + pid, tl.sum((osc & mask).to(tl.int32), axis=0))


def track_oscillations(w, scale, qn, qp, prev_int, prev_dir, frozen, frozen_int, freq, ema_int, momentum,
                       freeze_threshold, ch_axis=None) -> torch.Tensor:  # fmt: skip
    """Launch the tracking kernel (state already validated by the dispatcher); returns the 0-d int64 count."""
    if ch_axis is not None and w.dim() and ch_axis % w.dim() != 0:
        raise ValueError(f"Oscillation tracking supports per-channel scales along axis 0 only, got ch_axis={ch_axis}.")
    wf = w.detach().contiguous().view(-1)
    n = wf.numel()
    nblocks = triton.cdiv(n, BLOCK)
    counts = torch.zeros(nblocks, dtype=torch.int32, device=w.device)
    if n:
        per_channel = ch_axis is not None and w.dim() > 0
        _track_kernel[(nblocks,)](
            wf, scale.detach().contiguous(), prev_int, prev_dir, frozen, frozen_int, freq, ema_int, counts,
            n, n // w.shape[0] if per_channel else 1, float(qn), float(qp), SCALE_EPS,
            float(momentum), 1.0 - float(momentum), float(freeze_threshold),
            PER_CHANNEL=per_channel, FREEZE=freeze_threshold > 0, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip
    return counts.sum()
