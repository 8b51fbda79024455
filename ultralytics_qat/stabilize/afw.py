"""Adaptive Finetuning Weight, AFW (seed 002, section IV-C): learned +-1 offsets for oscillating weights after QAT.

For the weights that are frozen or oscillate (tracker frequency > ``min_frequency``), with c the current integer code
(``frozen_int`` for frozen weights, else clamp(round(W / s), qn, qp)) and a learned ``theta`` per selected weight:

    F(W, theta) = s * clip(c + g(theta), qn, qp),   g = clip(gamma * tanh(theta), -1, 1)
    loss        = task + lam * sum R(g),            R = g^2 (1 - g^2)^2      (0 at g in {-1, 0, 1})

theta starts at 0 (g = 0: the QAT codes) and is trained with Adam for ``epochs`` epochs of training batches;
weights, scales and BN statistics stay fixed (model in train mode so the head returns its training outputs and the
detection loss applies, BN layers in eval mode). The soft ``F`` replaces the weight quantizer's output through a
forward hook, so the model's structure is never touched. At the end g is rounded into the integers: the selected
latent weights become ``clip(c + round(g), qn, qp) * s`` (frozen ones also get the new ``frozen_int``), so the
standard fake quantizer (and export) reproduce the new codes, and theta is discarded.

AFW runs on the EMA, the model that is validated, saved and exported: its codes are the ones that ship, and offsets
learned on the training model's codes would not transfer to the EMA's (different latent weights). The selection uses
the tracker state, which the oscillation stabilizer copies exactly into the EMA at the epoch end. The new tracker
integers are mirrored into the training model, so the controller's model->EMA integer sync keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..ops.reference import SCALE_EPS
from ..utils import LOGGER
from .base import Stabilizer, TrainState
from .oscillation import _scale_view, copy_tracker_state, tracked_layers


def afw_offset(theta: torch.Tensor, gamma: float) -> torch.Tensor:
    """g = clip(gamma * tanh(theta), -1, 1), with the gradient passing at exactly +-1 (explicit mask, not clamp)."""
    g = gamma * torch.tanh(theta)
    return torch.where(g.abs() <= 1, g, torch.sign(g).detach())


def afw_regularizer(g: torch.Tensor) -> torch.Tensor:
    """R = g^2 (1 - g^2)^2, summed: zero at g in {-1, 0, 1}."""
    return (g.pow(2) * (1 - g.pow(2)).pow(2)).sum()


def _clip_codes(v: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """clip(v, qn, qp) with gradient 1 inside [qn, qp] including the ends (torch.clamp gives 0 at the ends)."""
    inside = (v >= qn) & (v <= qp)
    return torch.where(inside, v, v.detach().clamp(qn, qp))


class _AFWLayer:
    """One layer under AFW: fixed codes, the selected positions and their theta; its forward hook gives F."""

    def __init__(self, name, conv, q, tracker, min_frequency: float):
        self.name, self.conv, self.q, self.tracker = name, conv, q, tracker
        with torch.no_grad():
            w = conv.weight
            self.codes = tracker.codes(w, q).reshape(-1)
            sel = (tracker.frozen != 0) | (tracker.freq > min_frequency)
            self.index = sel.reshape(-1).nonzero().squeeze(1)
            self.scale = _scale_view(q.scale.detach().float().clamp_min(SCALE_EPS), q, w.dim())
        self.theta = nn.Parameter(torch.zeros(self.index.numel(), device=w.device))
        self.gamma = 1.0

    def offsets(self) -> torch.Tensor:
        return afw_offset(self.theta, self.gamma)

    def soft_weight(self) -> torch.Tensor:
        """F(W, theta): the codes with g added at the selected positions, clipped, times s."""
        v = self.codes.index_add(0, self.index, self.offsets())
        v = _clip_codes(v, self.q.qn, self.q.qp)
        return v.view(self.conv.weight.shape) * self.scale

    def hook(self, module, args, output):
        return self.soft_weight().to(output.dtype)

    @torch.no_grad()
    def commit(self) -> int:
        """Round g into the codes; write them into the latent weight (and frozen_int); return the codes changed."""
        q, t, w = self.q, self.tracker, self.conv.weight
        new = torch.clamp(self.codes[self.index] + torch.round(self.offsets()), q.qn, q.qp)
        changed = int((new != self.codes[self.index]).sum())
        codes = self.codes.clone()
        codes[self.index] = new
        codes = codes.view(w.shape)
        sel = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        sel[self.index] = True
        sel = sel.view(w.shape)
        w.copy_(torch.where(sel, codes * self.scale, w.float()).to(w.dtype))
        fz = t.frozen.view(w.shape) != 0
        fi = t.frozen_int.view(w.shape)
        fi.copy_(torch.where(fz & sel, codes, fi.float()).to(torch.int8))
        return changed


def adaptive_finetune(
    model: nn.Module,
    batches: Callable[[], Iterable[dict]],
    epochs: int = 1,
    gamma: float = 1.1,
    lam: float = 0.1,
    lr: float = 1e-3,
    min_frequency: float = 0.005,
    total: int | None = None,
) -> int:
    """Run AFW on ``model`` (a QAT detection model with oscillation trackers) in place.

    Args:
        model: The model to finetune (the EMA in training); needs ``model.loss(batch)`` (Ultralytics).
        batches: Returns a fresh iterator of preprocessed training batches per call (one call per epoch).
        epochs: Passes over ``batches()``.
        gamma: Offset scale of g = clip(gamma * tanh(theta), -1, 1).
        lam: Weight of the regulariser sum R.
        lr: Adam learning rate of theta.
        min_frequency: Weights with a tracked frequency above this, or frozen, are finetuned.
        total: Batches per epoch, for the progress bar.

    Returns:
        The number of integer codes changed (each by exactly 1).
    """
    from ultralytics.utils import TQDM

    layers = [_AFWLayer(n, m, q, t, min_frequency) for n, m, q, t in tracked_layers(model) if bool(t.initialized)]
    layers = [layer for layer in layers if layer.index.numel()]
    if not layers:
        LOGGER.info("QAT: AFW found no frozen or oscillating weights; nothing to finetune")
        return 0
    for layer in layers:
        layer.gamma = gamma
    n_sel = sum(layer.index.numel() for layer in layers)
    LOGGER.info(f"QAT: AFW on {n_sel} weights in {len(layers)} layers, {epochs} epoch(s)")

    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    had_criterion = "criterion" in vars(model)
    criterion = vars(model).get("criterion")
    handles = [layer.q.register_forward_hook(layer.hook) for layer in layers]
    optimizer = torch.optim.Adam([layer.theta for layer in layers], lr=lr)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if hasattr(model, "init_criterion"):  # fresh: one built during validation holds inference tensors
            model.criterion = model.init_criterion()
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "OscillationTracker":
                m.eval()  # fixed BN statistics; trackers neither track nor substitute (the hook gives F)
        for epoch in range(epochs):
            for batch in TQDM(batches(), total=total, desc=f"QAT: AFW {epoch + 1}/{epochs}", leave=False):
                loss, _ = model.loss(batch)
                reg = sum(afw_regularizer(layer.offsets()) for layer in layers)
                (loss.sum() + lam * reg).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        changed = sum(layer.commit() for layer in layers)
    finally:
        for h in handles:
            h.remove()
        for p, r in grads.items():
            p.requires_grad_(r)
        for m, mode in modes.items():
            m.training = mode
        if had_criterion:
            model.criterion = criterion
        elif "criterion" in vars(model):
            del model.criterion
    return changed


class AFW(Stabilizer):
    """Runs :func:`adaptive_finetune` on the EMA after the last QAT epoch; logs ``qat/afw_changed``.

    Args:
        epochs, gamma, lam, lr, min_frequency: See :func:`adaptive_finetune` (``qat.afw.*``).
    """

    name = "afw"

    def __init__(self, epochs=1, gamma=1.1, lam=0.1, lr=1e-3, min_frequency=0.005):
        self.epochs, self.gamma, self.lam, self.lr, self.min_frequency = epochs, gamma, lam, lr, min_frequency

    def post_qat(self, state: TrainState) -> None:
        if state.batches is None:
            return
        target = state.ema if state.ema is not None else state.model
        if not tracked_layers(target):
            LOGGER.warning("QAT: AFW needs oscillation tracking (qat.oscillation.max_bits covers no layer); skipped")
            return
        n = adaptive_finetune(target, state.batches, self.epochs, self.gamma, self.lam, self.lr, self.min_frequency,
                              total=state.batches_per_epoch)
        if target is not state.model:
            copy_tracker_state(target, state.model)  # keep the new frozen_int through the model->EMA integer sync
        state.log["qat/afw_changed"] = float(n)
        LOGGER.info(f"QAT: AFW changed {n} integer codes")
