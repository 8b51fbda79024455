"""Datasets for ultralytics-qat: the bundled coco8 subset and a synthetic shapes generator."""

from .bundled import bundled_coco8
from .shapes import make_shapes_dataset

__all__ = ["bundled_coco8", "make_shapes_dataset"]
