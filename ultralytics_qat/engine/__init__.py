"""Front doors into Ultralytics: trainer and validator subclasses."""

from .trainer import QATDetectionTrainer, split_qat_overrides
from .validator import QATDetectionValidator

__all__ = ["QATDetectionTrainer", "QATDetectionValidator", "split_qat_overrides"]
