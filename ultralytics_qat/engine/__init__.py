"""Front doors into Ultralytics: trainer and validator subclasses."""

from .callbacks import QATCallbacks, add_qat_callbacks
from .trainer import QATDetectionTrainer, split_qat_overrides
from .validator import QATDetectionValidator

__all__ = ["QATCallbacks", "add_qat_callbacks", "QATDetectionTrainer", "QATDetectionValidator", "split_qat_overrides"]
