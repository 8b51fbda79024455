"""Quantizer modules, the quantized conv and the injection policy."""

from .inject import LayerPlan, candidate_convs, class_count, format_plan, plan_layers, quantize_model
from .qconv import QConv2d
from .quantizer import LSQQuantizer, signed_grid, unsigned_grid

__all__ = [
    "LSQQuantizer",
    "LayerPlan",
    "QConv2d",
    "candidate_convs",
    "class_count",
    "format_plan",
    "plan_layers",
    "quantize_model",
    "signed_grid",
    "unsigned_grid",
]
