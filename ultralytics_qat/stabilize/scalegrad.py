"""ScaleGrad (seed 002, IV-A): PulseSmooth scale gradients and distance-aware weight gradients.

Both act inside the LSQ backward (``ultralytics_qat.ops``); this stabilizer only switches them on in the quantizers:
``delta`` for every quantizer's scale gradient, ``k`` for the weight gradients.
"""

from __future__ import annotations

from torch import nn

from ..quant import LSQQuantizer
from .base import Stabilizer


class ScaleGrad(Stabilizer):
    """Sets PulseSmooth ``delta`` and distance factor ``k`` on all quantizers of the model."""

    name = "scalegrad"

    def __init__(self, delta: float = 0.0, k: float = 0.0):
        self.delta, self.k = delta, k

    def attach(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, LSQQuantizer):
                m.pulse_delta = self.delta
                m.dist_k = self.k if m.kind == "weight" else 0.0
