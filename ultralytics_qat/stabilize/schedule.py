"""Staged bit widths (seed 000: W8 -> W6 -> W4 at epoch milestones), with an optional LR re-warm-up after a step.

At a step every scheduled quantizer (the layers at the default width; first/last layers and per-layer overrides keep
theirs) moves to the new width in place: weight scales are re-initialised from the current weights, activation grids
are rebuilt over the same float clip range. The Parameter objects stay the same, so optimizer and EMA pairing stay
valid; the scales' stale optimizer moments are dropped. The current stage lives in the quantizers' ``qrange``
buffers, so a resumed run continues in its stage.
"""

from __future__ import annotations

from bisect import bisect_right

from torch import nn

from ..quant import QConv2d
from ..utils import LOGGER
from .base import Stabilizer, TrainState


class BitSchedule(Stabilizer):
    """Switches scheduled quantizers between bit widths at epoch milestones.

    Args:
        milestones: Increasing epochs at which the next stage starts.
        weight_bits: Weight bits per stage (len(milestones) + 1), or empty to keep them.
        activation_bits: Activation bits per stage, or empty to keep them.
        rewarmup_epochs: Length of a linear LR ramp from 0 after each step, in epochs (0 = none).
    """

    name = "schedule"

    def __init__(self, milestones, weight_bits, activation_bits, rewarmup_epochs: float = 0.0):
        self.milestones, self.weight_bits, self.activation_bits = list(milestones), list(weight_bits), list(activation_bits)
        self.rewarmup_epochs = rewarmup_epochs
        self._rewarm_from = None  # epoch of the last step, while re-warming

    def stage(self, epoch: int) -> int:
        """0-based stage index at ``epoch``."""
        return bisect_right(self.milestones, epoch)

    def bits(self, stage: int) -> tuple[int | None, int | None]:
        """(weight bits, activation bits) of a stage; None where that side is not scheduled."""
        wb = self.weight_bits[stage] if self.weight_bits else None
        ab = self.activation_bits[stage] if self.activation_bits else None
        return wb, ab

    def apply(self, model: nn.Module, stage: int) -> bool:
        """Put the scheduled quantizers of ``model`` at ``stage``'s widths; True if anything changed."""
        wb, ab = self.bits(stage)
        changed = False
        for m in model.modules():
            if not isinstance(m, QConv2d):
                continue
            wq, aq = m.weight_fake_quant, m.input_fake_quant
            if wb is not None and wq.scheduled and wq.bits != wb:
                wq.set_bits(wb, m.weight)
                changed = True
            if ab is not None and aq is not None and aq.scheduled and aq.bits != ab:
                aq.set_bits(ab)
                changed = True
        return changed

    def attach(self, model: nn.Module) -> None:
        self.apply(model, 0)  # before calibration: only the grids change

    def on_epoch_start(self, state: TrainState) -> None:
        stage = self.stage(state.epoch)
        changed = self.apply(state.model, stage)
        if state.ema is not None:
            self.apply(state.ema, stage)
        if changed and state.epoch > 0:
            wb, ab = self.bits(stage)
            LOGGER.info(f"QAT: bit schedule stage {stage + 1}/{len(self.milestones) + 1} at epoch {state.epoch + 1}: "
                        f"weights {wb or 'unchanged'}, activations {ab or 'unchanged'}")
            if state.optimizer is not None:
                for m in state.model.modules():
                    if isinstance(m, QConv2d):
                        for q in (m.weight_fake_quant, m.input_fake_quant):
                            if q is not None and q.scheduled:
                                state.optimizer.state.pop(q.scale, None)
            if self.rewarmup_epochs > 0:
                self._rewarm_from = state.epoch
        state.log["qat/stage"] = float(stage)

    def on_batch_start(self, state: TrainState) -> None:
        if self._rewarm_from is None or state.optimizer is None or not state.base_lrs:
            return
        done = (state.epoch - self._rewarm_from) + state.batch / max(state.batches_per_epoch, 1)
        if done >= self.rewarmup_epochs:
            self._rewarm_from = None
            return
        factor = (done + 1 / max(state.batches_per_epoch, 1)) / self.rewarmup_epochs
        for group, base in zip(state.optimizer.param_groups, state.base_lrs):
            group["lr"] = base * min(factor, 1.0)
