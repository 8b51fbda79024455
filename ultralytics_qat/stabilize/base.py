"""The stabilizer protocol: QAT methods that act at fixed moments of training.

Each method of the papers (bit schedule, BN re-estimation, oscillation tracking, EAD, QC, AFW) is a
:class:`Stabilizer`. The controller calls the hooks; the front doors (trainer subclass, drop-in callbacks) only build a
:class:`TrainState` and say when. Stabilizers keep their state in module buffers, so checkpoints, EMA copies and DDP
carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TrainState:
    """What a stabilizer may see and touch at a hook.

    Attributes:
        model: The training model (unwrapped from DDP).
        ema: The model that is validated, saved and exported (the EMA), or None.
        optimizer: The training optimizer, or None outside training.
        epoch: Current epoch, 0-based.
        epochs: Total epochs.
        batch: Index of the batch within the epoch (valid in batch hooks).
        batches_per_epoch: Batches per epoch.
        batches: Callable returning a fresh iterator of preprocessed training batches (dicts with ``img``).
        log: Scalars to record for this epoch; keys ``qat/...`` land in results.csv and TensorBoard.
        base_lrs: Learning rates the scheduler set for this epoch, one per optimizer group.
        final: True after training has stopped (any reason), while the post-QAT stages and their validation run.
        scheduler: The learning-rate scheduler (``base_lrs`` per group), or None.
    """

    model: nn.Module
    ema: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    epoch: int = 0
    epochs: int = 1
    batch: int = 0
    batches_per_epoch: int = 1
    batches: Callable[[], Iterator[dict]] | None = None
    log: dict = field(default_factory=dict)
    base_lrs: list = field(default_factory=list)
    final: bool = False
    scheduler: object | None = None

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min((self.epoch + self.batch / max(self.batches_per_epoch, 1)) / max(self.epochs, 1), 1.0)

    def images(self) -> Iterator[torch.Tensor]:
        """Preprocessed training images, batch by batch."""
        for b in self.batches():
            yield b["img"]


class Stabilizer:
    """Base class: every hook is a no-op. Subclasses override what they need."""

    name = "stabilizer"

    def attach(self, model: nn.Module) -> None:
        """After quantizer insertion, before optimizer and EMA exist: register buffers, set quantizer options."""

    def on_train_start(self, state: TrainState) -> None:
        """After calibration, before the first batch (also after a resume)."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Before the epoch's first batch."""

    def on_batch_start(self, state: TrainState) -> None:
        """Before each batch's forward pass."""

    def on_batch_end(self, state: TrainState) -> None:
        """After each batch's backward pass and optimizer step (if one was taken)."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After the epoch's last batch, before validation; record scalars in ``state.log``."""

    def post_qat(self, state: TrainState) -> None:
        """After training stopped (last epoch, patience, ``time=``, a stop request): post-QAT stages (QC, AFW)."""

    def before_validation(self, state: TrainState) -> None:
        """Right before the EMA model is validated (and then saved); once more after the post-QAT stages."""

    def state_dict(self) -> dict:
        """Host-side state to keep in resume checkpoints (tensor state lives in module buffers instead)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on resume and NaN recovery)."""


def cosine_ramp(progress: float, start: float, begin: float, end: float) -> float:
    """Cosine interpolation from ``begin`` (at ``start``) to ``end`` (at progress 1); ``begin`` before ``start``."""
    import math

    if progress <= start:
        return begin
    t = min((progress - start) / max(1.0 - start, 1e-12), 1.0)
    return end + (begin - end) * 0.5 * (1 + math.cos(math.pi * t))
