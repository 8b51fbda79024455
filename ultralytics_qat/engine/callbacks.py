"""The drop-in front door: QAT on a vanilla Ultralytics trainer through its callbacks.

    >>> from ultralytics import YOLO
    >>> model = YOLO("yolov8n.pt")
    >>> add_qat_callbacks(model, qat="qat.yaml")
    >>> model.train(data="coco8.yaml", epochs=20)

At ``on_pretrain_routine_start`` (in the trainer's ``__init__``, before any model exists) the :class:`QATRun` binds
the same trainer methods ``QATDetectionTrainer`` overrides, so both doors run the same code in the same order.
"""

from __future__ import annotations

from ..controller import QATController
from .run import QATRun


def add_qat_callbacks(model, qat=None, **overrides) -> QATController:
    """Make a vanilla Ultralytics ``model.train(...)`` run QAT: quantizers, calibration, stabilizers, checkpoints.

    Args:
        model: An Ultralytics ``YOLO`` object or a trainer (anything with ``add_callback``/``callbacks``).
        qat: qat.yaml path, bundled recipe name, dict or QATConfig; None = the bundled default.
        **overrides: Dotted qat overrides, e.g. ``**{"weight.bits": 3}``.

    Returns:
        The controller, for inspection after training.
    """
    run = QATRun(qat, overrides, dropin=True)
    run.register(model)
    return run.qat
