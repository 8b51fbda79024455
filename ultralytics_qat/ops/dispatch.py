"""The one entry point of LSQ fake quantization used by every quantizer module.

Backends are chosen per call here and nowhere else, so faster kernels replace the math without touching the modules.
"""

from __future__ import annotations

import torch

from .reference import lsq_fake_quantize_reference


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    ch_axis: int | None = None,
    pulse_delta: float = 0.0,
    dist_k: float = 0.0,
) -> torch.Tensor:
    """LSQ fake quantization; see :func:`ultralytics_qat.ops.reference.lsq_fake_quantize_reference` for the math."""
    return lsq_fake_quantize_reference(x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k)
