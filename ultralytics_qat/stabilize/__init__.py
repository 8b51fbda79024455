"""QAT stabilizers: the papers' remedies for oscillations, each a :class:`Stabilizer` driven by the controller."""

from __future__ import annotations

from ..config import QATConfig
from .afw import AFW, adaptive_finetune
from .base import Stabilizer, TrainState, cosine_ramp
from .collapse import CollapseGuard
from .bn import BatchNormStabilizer, batchnorms, reestimate_bn
from .ead import EMAAwareDistance
from .oscillation import OscillationStabilizer, OscillationTracker, oscillation_report
from .qc import QuantizationCorrection
from .scalegrad import ScaleGrad
from .schedule import BitSchedule

__all__ = [
    "AFW",
    "BatchNormStabilizer",
    "BitSchedule",
    "CollapseGuard",
    "EMAAwareDistance",
    "OscillationStabilizer",
    "OscillationTracker",
    "QuantizationCorrection",
    "ScaleGrad",
    "Stabilizer",
    "TrainState",
    "adaptive_finetune",
    "batchnorms",
    "build_stabilizers",
    "cosine_ramp",
    "oscillation_report",
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
    if cfg.ead.start is not None:
        out.append(EMAAwareDistance(k=cfg.ead.k, mu_init=cfg.ead.mu_init, start=cfg.ead.start))
    osc = cfg.oscillation  # after EAD: tracking sees the step's final weights; AFW before QC (weights, then outputs)
    if osc.track or osc.freeze_threshold is not None or osc.dampen_lambda or cfg.afw.enabled:
        out.append(OscillationStabilizer.from_config(cfg))
    if cfg.afw.enabled:
        a = cfg.afw
        out.append(AFW(a.epochs, a.gamma, a.lam, a.lr, a.min_frequency))
    if cfg.qc.enabled:  # post-QAT: after the other post-QAT stages, before the BN re-estimation
        out.append(QuantizationCorrection(cfg.qc.epochs, cfg.qc.lr, cfg.bn.batches if cfg.bn.reestimate else 0))
    # QC re-estimates BN itself before it learns its corrections; re-estimating after it would undo part of them
    out.append(BatchNormStabilizer(cfg.bn.reestimate, cfg.bn.batches, cfg.bn.freeze_epoch, skip_final=cfg.qc.enabled))
    c = cfg.collapse  # watches the validations that follow every hook above
    if c.enabled:
        out.append(CollapseGuard(c.drop, c.patience, c.min_epochs, c.action, c.lr_factor, cfg.bn.batches))
    return out
