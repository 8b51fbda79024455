"""BatchNorm under oscillating weights: re-estimation of running statistics, and freezing (ICML'22, Nagel et al.).

Running statistics collected during QAT average over weight states that oscillate between grid points, so they do
not match the weights the model is evaluated with. Re-estimation recomputes them, with the weights fixed, as a
plain average over a few training batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from .base import Stabilizer, TrainState


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers of a model."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: Iterable[torch.Tensor], batches: int, desc: str = "QAT: BN re-estimation") -> int:
    """Recompute BN running statistics as the cumulative average over ``batches`` batches of ``images``.

    The model runs in eval mode (quantizers and everything else as at inference) with only BN layers in train
    mode; momentum and mode are restored afterwards.

    Returns:
        The number of batches used.
    """
    from ultralytics.utils import TQDM

    bns = batchnorms(model)
    if not bns or batches < 1:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    seen = 0
    try:
        for img in TQDM(islice(images, batches), total=batches, desc=desc, leave=False):
            model(img)
            seen += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return seen


class BatchNormStabilizer(Stabilizer):
    """Re-estimates BN statistics of the validated (EMA) model before each validation; optionally freezes BN.

    Args:
        reestimate: Re-estimate before each validation (and so before every checkpoint is written).
        batches: Batches per re-estimation, capped at one pass over the training data.
        freeze_epoch: From this epoch on, BN layers of the training model stay in eval mode; None = never.
        skip_final: Skip the re-estimation after the post-QAT stages (QC re-estimates, then corrects BN itself).
    """

    name = "bn"

    def __init__(self, reestimate: bool = True, batches: int = 8, freeze_epoch: int | None = None, skip_final: bool = False):
        self.reestimate, self.batches, self.freeze_epoch, self.skip_final = reestimate, batches, freeze_epoch, skip_final

    def on_batch_start(self, state: TrainState) -> None:
        # Ultralytics calls model.train() after on_train_epoch_start, so freezing must happen per batch
        if self.freeze_epoch is not None and state.epoch >= self.freeze_epoch and state.batch == 0:
            for bn in batchnorms(state.model):
                bn.eval()

    def before_validation(self, state: TrainState) -> None:
        if not self.reestimate:
            return
        n = 0  # logged every epoch, 0 when skipped: results.csv keeps the columns of its first row
        if state.ema is not None and state.batches is not None and not (self.skip_final and state.final):
            n = reestimate_bn(state.ema, state.images(), min(self.batches, state.batches_per_epoch))
        state.log["qat/bn_reestimate_batches"] = float(n)
