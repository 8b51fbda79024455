"""QATDetectionTrainer: Ultralytics' DetectionTrainer with LSQ fake quantization (the subclass front door).

Every overridden method delegates to :class:`QATRun`, which ``add_qat_callbacks`` binds onto a vanilla trainer the
same way; nothing QAT-specific is decided here.

The ``qat`` setting never enters Ultralytics' args (which reject unknown keys); it is popped in ``__init__`` and,
for a DDP launch, carried into the workers through the pickled args, where the worker's ``__init__`` pops it again.
"""

from __future__ import annotations

from contextlib import contextmanager

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG

from .run import QATRun


def split_qat_overrides(overrides: dict) -> tuple[object, dict, dict]:
    """Split ``qat=...`` and dotted ``qat.x.y=...`` keys off Ultralytics overrides: (qat, qat_overrides, rest)."""
    rest = dict(overrides or {})
    qat = rest.pop("qat", None)
    dotted = {k[4:]: rest.pop(k) for k in list(rest) if isinstance(k, str) and k.startswith("qat.")}
    return qat, dotted, rest


class QATDetectionTrainer(DetectionTrainer):
    """Detection trainer that quantizes the model with LSQ fake quantizers and trains it (QAT).

    Args:
        cfg: Ultralytics default config (dict or path).
        overrides: Ultralytics args plus ``qat`` (qat.yaml path, recipe name, dict or QATConfig) and dotted
            ``qat.<key>`` overrides.
        _callbacks: Ultralytics callbacks.

    Examples:
        >>> from ultralytics import YOLO
        >>> YOLO("yolov8n.yaml").train(trainer=QATDetectionTrainer, qat="qat.yaml", data="coco8.yaml", epochs=3)
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        qat, dotted, overrides = split_qat_overrides(overrides)
        self.qat_run = QATRun(qat, dotted)
        self.qat_run.apply_arg_policy(overrides, set(overrides))  # the keys given are the user's
        super().__init__(cfg, overrides, _callbacks)
        self.qat_run.register(self)

    @property
    def qat(self):
        """The run's :class:`QATController` (config, quantizers, stabilizers)."""
        return self.qat_run.qat

    def check_resume(self, overrides):
        super().check_resume(overrides)
        self.qat_run.check_resume(self)

    def get_model(self, cfg=None, weights=None, verbose=True):
        return self.qat_run.get_model(self, super().get_model, cfg, weights, verbose)

    def get_validator(self):
        return self.qat_run.get_validator(self)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        return self.qat_run.build_optimizer(self, super().build_optimizer, model, name, lr, momentum, decay, iterations)

    def _load_checkpoint_state(self, ckpt):
        return self.qat_run.load_checkpoint_state(self, super()._load_checkpoint_state, ckpt)

    def save_model(self):
        return self.qat_run.save_model(self)

    def final_eval(self):
        return self.qat_run.final_eval(self)

    def plot_metrics(self):
        return self.qat_run.plot_metrics(self)

    # -- DDP ---------------------------------------------------------------------------------------------------------
    def train(self):
        """Train; for a DDP launch the qat config rides in the pickled args to the workers."""
        if not self.ddp:
            return super().train()
        with self.qat_in_args():
            return super().train()

    @contextmanager
    def qat_in_args(self):
        """Put the qat config into ``self.args`` while Ultralytics pickles them for DDP workers (see ``__init__``)."""
        self.args.qat = self.qat.config.to_dict()
        try:
            yield self.args
        finally:
            del self.args.qat
