"""Numerical kernels of ultralytics-qat. This package imports nothing else of ours."""

from .dispatch import lsq_fake_quantize
from .reference import SCALE_EPS, lsq_fake_quantize_reference

__all__ = ["SCALE_EPS", "lsq_fake_quantize", "lsq_fake_quantize_reference"]
