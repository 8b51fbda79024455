"""QATDetectionTrainer: Ultralytics' DetectionTrainer with LSQ fake quantization.

It only overrides hooks (``get_model``, ``get_validator``, ``build_optimizer``, ``save_model``,
``_load_checkpoint_state``) and delegates every QAT decision to :class:`QATController`.

The ``qat`` setting never enters Ultralytics' args (which reject unknown keys); it is popped in ``__init__`` and,
for a DDP launch, carried into the workers through the pickled args, where the worker's ``__init__`` pops it again.
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import copy

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK

from ..checkpoint import restore_exact
from ..config import QATConfig
from ..controller import CKPT_KEY, QATController, is_qat_model
from ..errors import QATCheckpointError
from .callbacks import QATCallbacks
from .validator import QATDetectionValidator


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
        self._qat_explicit = qat is not None or bool(dotted)
        self.qat = QATController(qat, dotted)
        if not self.qat.config.amp:
            if overrides.get("amp") not in (None, False):
                LOGGER.info("QAT: qat.amp=false switches Ultralytics AMP off (set qat.amp=true to keep it)")
            overrides["amp"] = False
        super().__init__(cfg, overrides, _callbacks)
        QATCallbacks(self.qat).register(self)

    # -- model -------------------------------------------------------------------------------------------------------
    def get_model(self, cfg=None, weights=None, verbose=True):
        """Build the detection model, insert quantizers, then load ``weights`` (float or QAT) into it."""
        if weights is not None and is_qat_model(weights):
            self._adopt_checkpoint_config(weights)
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        self.qat.prepare(model, verbose=verbose and RANK in {-1, 0})
        if weights is not None:
            model.load(weights)
            if is_qat_model(weights):
                restore_exact(model, weights)
        return model

    def _adopt_checkpoint_config(self, weights) -> None:
        saved = getattr(weights, "qat_config", None)
        if saved is None:
            return
        saved = QATConfig.from_dict(saved, source="checkpoint")
        if self._qat_explicit and saved != self.qat.config and not self.args.resume:
            raise QATCheckpointError(
                "the model is a QAT checkpoint trained with a different qat config; drop qat=... to continue with "
                "its own config, or start from the float model"
            )
        self.qat.set_config(saved)

    def get_validator(self):
        """A QAT-aware validator (loads QAT checkpoints exactly for the final evaluation)."""
        return QATDetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    # -- optimizer ---------------------------------------------------------------------------------------------------
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer, with the learned scales moved into their own group (no weight decay)."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        self.qat.add_scale_group(optimizer, model)
        return optimizer

    # -- checkpoints (the fp32 QAT entry is written by QATCallbacks.on_model_save) ----------------------------------
    def _load_checkpoint_state(self, ckpt):
        """Resume (and NaN recovery): Ultralytics' state, then the exact fp32 QAT state into model and EMA."""
        super()._load_checkpoint_state(ckpt)
        entry = ckpt.get(CKPT_KEY)
        if not isinstance(entry, dict):
            raise QATCheckpointError(
                f"'{self.args.model}' has no QAT state to resume from; resume it with 'yolo train resume "
                f"model={self.args.model}', or start QAT from it without resume"
            )
        QATController.restore(self.model, entry)
        QATController.restore(self.ema.ema, entry)

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
