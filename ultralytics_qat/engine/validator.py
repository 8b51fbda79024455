"""QATDetectionValidator: DetectionValidator that loads QAT checkpoints with their exact fp32 state."""

from __future__ import annotations

from pathlib import Path

from ultralytics.models.yolo.detect import DetectionValidator

from ..checkpoint import load_qat_model


class QATDetectionValidator(DetectionValidator):
    """Validates QAT models: during training the EMA (as upstream), standalone a QAT checkpoint loaded exactly.

    A float checkpoint passed here raises :class:`QATCheckpointError` pointing to ``yolo val``.
    """

    def get_model(self, model, trainer=None):
        """The training EMA, a deep copy of a given module, or a QAT ``.pt`` loaded with its fp32 state."""
        if trainer is None and (model is None or isinstance(model, (str, Path))):
            path = model or self.args.model
            if str(path).endswith(".pt"):
                return load_qat_model(path)[0]
        return super().get_model(model, trainer)
