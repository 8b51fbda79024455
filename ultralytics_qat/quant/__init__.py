"""Quantizer modules, the quantized conv and the injection policy."""

from .inject import LayerPlan, candidate_convs, format_plan, plan_layers, quantize_model
from .qconv import QConv2d
from .quantizer import LSQQuantizer, signed_grid, unsigned_grid

__all__ = [
    "LSQQuantizer",
    "LayerPlan",
    "QConv2d",
    "candidate_convs",
    "format_plan",
    "plan_layers",
    "quantize_model",
    "signed_grid",
    "unsigned_grid",
]
