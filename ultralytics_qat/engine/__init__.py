"""Front doors into Ultralytics: trainer and validator subclasses."""

from .callbacks import add_qat_callbacks
from .run import QATRun
from .trainer import QATDetectionTrainer, split_qat_overrides
from .validator import QATDetectionValidator

__all__ = ["QATRun", "add_qat_callbacks", "QATDetectionTrainer", "QATDetectionValidator", "split_qat_overrides"]
