"""The collapse guard: detect low-bit QAT's peak-then-drop of validation fitness and act on it.

Rule (``collapse.*`` keys). After each validation the run hands the guard the epoch's fitness (Ultralytics':
0.1 * mAP50 + 0.9 * mAP50-95). A new best fitness is remembered with a copy of the validated EMA state. From epoch
``min_epochs`` (1-based) on, a validation whose fitness is below ``(1 - drop) * best`` counts as a drop; ``patience``
drops in a row are a collapse. One line is logged (fitness, best and its epoch, the oscillating fraction and the mean
weight scale now and at the best epoch, what was done), and the run appends it to ``qat_events.jsonl``. The count
starts again after each event, so a run that keeps falling fires again ``patience`` validations later.

Actions:
    warn     only the line.
    restore  load the best EMA state (latent weights, scales, BN, tracker state) into the training model and the EMA,
             clear the optimizer's moments, re-estimate the EMA's BN statistics, and multiply every learning rate
             (scheduler base rates included, so warm-up and the schedule keep it) by ``lr_factor``.
    freeze   load the best EMA state, then freeze every quantized weight's integer codes for the rest of training:
             the latent weights and weight scales of all quantized convs stop training (BN, biases and activation
             scales keep training).

Divergence: an epoch that ends with NaN or inf learned scales (and a finite loss, which Ultralytics' own NaN
recovery does not see) is handed to :meth:`CollapseGuard.recover`: ``restore`` and ``freeze`` load the best EMA state
and lower the learning rates as above (``freeze`` also freezes the codes), and the run goes on; with ``warn``, under
DDP, or before any validation has set a best state, the run stops with one line (last.pt holds the last good epoch).

The oscillating fraction and scale drift are reported, not part of the rule: in normal runs they rise too
(BENCHMARKS.md), so they do not tell a collapse from progress. The guard keeps its small host state in the resume
checkpoint (:meth:`state_dict`); its copy of the best state lives in memory, and after a resume the run gives it a
loader of best.pt (:attr:`load_best`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..quant import QConv2d
from ..utils import LOGGER
from .base import Stabilizer, TrainState
from .bn import reestimate_bn
from .oscillation import tracked_layers

ACTIONS = ("warn", "restore", "freeze")


class CollapseGuard(Stabilizer):
    """Watches validation fitness for peak-then-drop; warns, restores the best EMA state, or freezes codes.

    Args:
        drop: Relative drop below the best fitness that counts (0.1 = 10% below the best).
        patience: Consecutive dropped validations that make a collapse.
        min_epochs: First epoch (1-based) whose validation may count as a drop; earlier ones only set the best.
        action: ``warn``, ``restore`` or ``freeze`` (see the module docstring).
        lr_factor: ``restore`` multiplies every learning rate by this.
        bn_batches: Batches of the BN re-estimation after a restore (0 = none).
    """

    name = "collapse"

    def __init__(self, drop=0.1, patience=2, min_epochs=2, action="restore", lr_factor=0.1, bn_batches=8):
        if action not in ACTIONS:
            raise ValueError(f"collapse action must be one of {ACTIONS}, got {action!r}")
        self.drop, self.patience, self.min_epochs = drop, patience, min_epochs
        self.action, self.lr_factor, self.bn_batches = action, lr_factor, bn_batches
        self.can_act = True  # False under DDP: only rank 0 validates, a restore there would desync the ranks
        self.load_best: Callable[[], dict | None] | None = None  # set by the run: best.pt's state (after a resume)
        self.best_state: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch = 0
        self.best_signals: dict = {}
        self.bad = 0
        self.last_epoch = 0  # last 1-based epoch observed (observe is idempotent per epoch)
        self.lr_scale = 1.0
        self.frozen = False
        self.events = 0

    # -- checkpointed host state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        keys = ("best", "best_epoch", "best_signals", "bad", "last_epoch", "lr_scale", "frozen", "events")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, v)
        self.best_state = None  # the in-memory copy belongs to another process; load_best reads best.pt

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_train_start(self, state: TrainState) -> None:
        """After a resume: the scheduler's base rates follow the (lowered) rates in the optimizer; codes stay frozen."""
        if self.lr_scale != 1.0 and state.optimizer is not None and state.scheduler is not None:
            state.scheduler.base_lrs = [g["initial_lr"] for g in state.optimizer.param_groups]
        if self.frozen:
            _freeze_codes(state.model)

    def observe(self, state: TrainState, fitness) -> dict | None:
        """Take the validation fitness of epoch ``state.epoch``; returns the event dict if a collapse fired."""
        epoch = state.epoch + 1
        if epoch <= self.last_epoch or fitness is None or not math.isfinite(float(fitness)):
            return None
        self.last_epoch = epoch
        fitness = float(fitness)
        signals = {k: state.log[k] for k in ("qat/osc_frac", "qat/weight_scale_mean") if k in state.log}
        if self.best is None or fitness > self.best:
            self.best, self.best_epoch, self.best_signals, self.bad = fitness, epoch, signals, 0
            if self.action != "warn" and state.ema is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.ema.state_dict().items()}
            return None
        if epoch < self.min_epochs:
            return None
        self.bad = self.bad + 1 if fitness < (1 - self.drop) * self.best else 0
        if self.bad < self.patience:
            return None
        self.bad = 0
        self.events += 1
        action = self.action if self.can_act else "warn"
        done = {"warn": "warned only", "restore": "", "freeze": ""}[action]
        if action != "warn":
            done = self._act(state, lower_lr=action == "restore")
            if done is None:
                action, done = "warn", "no best state to restore (best.pt missing), warned only"
        if self.action != "warn" and not self.can_act:
            done += f" (action {self.action} needs a single process; under DDP the guard warns only)"
        message = (f"QAT: collapse at epoch {epoch}: fitness {fitness:.4f} is {100 * (1 - fitness / self.best):.0f}% "
                   f"below the best {self.best:.4f} (epoch {self.best_epoch}) for {self.patience} validation{'s' if self.patience > 1 else ''} in a row"
                   f"{_signals(signals, self.best_signals)}; {done}")
        LOGGER.warning(message)
        return {"epoch": epoch, "source": self.name, "action": action, "message": message}

    def recover(self, state: TrainState, why: str) -> dict | None:
        """A diverged epoch (``why``: its non-finite scales): with ``restore`` or ``freeze``, load the best EMA state
        and lower the learning rates (what diverged was the step size); returns the event, or None when the guard may
        not act (``warn``, DDP) or has no best state yet, and the run must stop."""
        if self.action == "warn" or not self.can_act:
            return None
        done = self._act(state, lower_lr=True)
        if done is None:
            return None
        self.bad = 0
        self.events += 1
        epoch = state.epoch + 1
        message = f"QAT: diverged in epoch {epoch}: {why}; {done}"
        LOGGER.warning(message)
        return {"epoch": epoch, "source": "diverged", "action": self.action, "message": message}

    # -- actions -----------------------------------------------------------------------------------------------------
    def _act(self, state: TrainState, lower_lr: bool) -> str | None:
        """The configured action: best EMA state back, then the learning rates lowered and/or (``freeze``) the codes
        frozen; what was done, or None when there is no best state."""
        done = self._restore(state)
        if done is None:
            return None
        if lower_lr:
            done += self._lower_lr(state)
        if self.action == "freeze":
            _freeze_codes(state.model)
            self.frozen = True
            done += "; integer codes of all quantized weights frozen (weights and weight scales stop training)"
        return done

    def _restore(self, state: TrainState) -> str | None:
        """The best EMA state into model and EMA; None if there is none."""
        exact = self.best_state is not None
        sd = self.best_state if exact else (self.load_best() if self.load_best else None)
        if sd is None:
            return None
        for m in (state.model, state.ema):
            if m is None:
                continue
            own = m.state_dict()
            with torch.no_grad():
                for k, v in sd.items():
                    if k in own and own[k].shape == v.shape:
                        own[k].copy_(v.to(own[k].dtype))
            _refresh_host_mirrors(m, reset_trackers=not exact)
        if state.optimizer is not None:
            state.optimizer.state.clear()  # moments of the collapsed trajectory
        what = f"restored the best EMA state (epoch {self.best_epoch}{'' if exact else ', from best.pt'})"
        if self.bn_batches and state.ema is not None and state.batches is not None:
            n = reestimate_bn(state.ema, state.images(), min(self.bn_batches, state.batches_per_epoch),
                              desc="QAT: BN re-estimation after restore")
            what += f", BN re-estimated on {n} batches"
        return what

    def _lower_lr(self, state: TrainState) -> str:
        f = self.lr_factor
        self.lr_scale *= f
        if state.optimizer is not None:
            for g in state.optimizer.param_groups:
                g["lr"] *= f
                if "initial_lr" in g:
                    g["initial_lr"] *= f
        if state.scheduler is not None and hasattr(state.scheduler, "base_lrs"):
            state.scheduler.base_lrs = [lr * f for lr in state.scheduler.base_lrs]
        return f", learning rates x{f:g} (now x{self.lr_scale:g} of the original)"


def _freeze_codes(model: nn.Module) -> None:
    """Latent weights and weight scales of every quantized conv stop training: their integer codes are fixed."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.weight.requires_grad_(False)
            m.weight.grad = None
            m.weight_fake_quant.scale.requires_grad_(False)
            m.weight_fake_quant.scale.grad = None


def _refresh_host_mirrors(model: nn.Module, reset_trackers: bool) -> None:
    """After copying tensors in place: quantizers' host copies of their grids, trackers' freezing switch."""
    from ..quant import LSQQuantizer

    for m in model.modules():
        if isinstance(m, LSQQuantizer):
            m.bits, m.qn, m.qp = (int(v) for v in m.qrange.tolist())
            m._initialized = bool(m.initialized)
    for _, conv, q, t in tracked_layers(model):
        if reset_trackers and bool(t.initialized):  # best.pt has no tracker state: start it at the restored codes
            t.reset(conv.weight, q)
        t.freezing = bool(t.initialized) and bool(t.frozen.any())


def _signals(now: dict, best: dict) -> str:
    parts = []
    if "qat/osc_frac" in now:
        was = best.get("qat/osc_frac")
        parts.append(f"oscillating {100 * now['qat/osc_frac']:.1f}%" + (f" (best epoch {100 * was:.1f}%)" if was is not None else ""))
    if "qat/weight_scale_mean" in now and best.get("qat/weight_scale_mean"):
        parts.append(f"mean weight scale x{now['qat/weight_scale_mean'] / best['qat/weight_scale_mean']:.2f} of the best epoch's")
    return f" ({', '.join(parts)})" if parts else ""
