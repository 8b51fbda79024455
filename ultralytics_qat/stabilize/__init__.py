"""QAT stabilizers: the papers' remedies for oscillations, each a :class:`Stabilizer` driven by the controller."""

from __future__ import annotations

from ..config import QATConfig
from .base import Stabilizer, TrainState, cosine_ramp
from .bn import BatchNormStabilizer, batchnorms, reestimate_bn
from .scalegrad import ScaleGrad
from .schedule import BitSchedule

__all__ = [
    "BatchNormStabilizer",
    "BitSchedule",
    "ScaleGrad",
    "Stabilizer",
    "TrainState",
    "batchnorms",
    "build_stabilizers",
    "cosine_ramp",
    "reestimate_bn",
]


def build_stabilizers(cfg: QATConfig) -> list[Stabilizer]:
    """The stabilizers a config switches on, in hook order (post-QAT stages before the BN re-estimation)."""
    out: list[Stabilizer] = []
    sch = cfg.schedule
    if sch.milestones and (sch.weight_bits or sch.activation_bits):
        out.append(BitSchedule(sch.milestones, sch.weight_bits, sch.activation_bits, sch.rewarmup_epochs))
    if cfg.scalegrad.delta or cfg.scalegrad.k:
        out.append(ScaleGrad(cfg.scalegrad.delta, cfg.scalegrad.k))
    out.append(BatchNormStabilizer(cfg.bn.reestimate, cfg.bn.batches, cfg.bn.freeze_epoch))
    return out
