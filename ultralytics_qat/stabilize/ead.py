"""EMA-aware distance, EAD (seed 002, IV-B, eq. 11-12): distance-weighted smoothing of latent weights and scales.

From epoch ``tau`` on, every optimizer step is followed by

    W_t = a * W_{t-1} + (1 - a) * W_t,   a = clamp(k * |W_t / s - round(W_t / s)|, 0, 0.999)      (eq. 11)
    s_t = (1 - mu) * s_{t-1} + mu * s_t, mu = (1 - (t - tau) / (T - tau)) * mu_init                 (eq. 12)

for the weights of every quantized conv and for its weight and input scales. ``W_{t-1}``/``s_{t-1}`` are the values
before this step's update (after the previous step's smoothing), ``t`` is the epoch including its fraction, ``T`` the
number of epochs.

Choices, documented:

- The paper's distance ``|W - Q(W)|`` is in weight units, which for low-bit layers is ~1e-3 and would make ``a``
  vanish; it is measured here in grid steps, ``|W/s - round(W/s)|`` in [0, 0.5], so ``k`` in [0, 2] spans the whole
  range of ``a``. It is taken against the scale the next forward will use (after the scale smoothing) and without
  clamping to the grid ends (clipped weights do not oscillate between levels). ``a`` is clamped to [0, 0.999].
- Eq. 12 is implemented exactly as printed: ``mu`` is the weight of the NEW scale and ``1 - mu`` that of the old one,
  so with ``mu_init = 0.1`` only a tenth of each scale update is kept at ``tau``, and none at the last step
  (``mu = 0``): the scales are progressively frozen.
- Steps are detected, not assumed: Ultralytics steps the optimizer only every ``accumulate`` batches. While EAD is
  active the stabilizer keeps one copy of the latent weights and scales of the quantized convs (only those; freed
  after the last epoch), refreshed in place at every batch start, and applies eq. 11-12 at the batch end only when
  any of them changed during the batch — one device sync per batch. Refreshing per batch means changes made between
  batches by others (a bit-schedule step re-initialising scales, freezing) are never smoothed away. The update is
  written as ``W + a * (W_prev - W)``, exactly ``W`` where nothing moved.
- The training model is smoothed after the optimizer step and after Ultralytics' EMA update of that step (which runs
  inside ``optimizer_step``); the EMA sees the smoothed weights from the next step on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import QConv2d
from .base import Stabilizer, TrainState

ALPHA_MAX = 0.999


def ead_alpha(weight: torch.Tensor, scale: torch.Tensor, k: float) -> torch.Tensor:
    """Per-element smoothing factor ``clamp(k * |w/s - round(w/s)|, 0, ALPHA_MAX)`` (distance in grid steps).

    Args:
        weight: Conv weight [C_out, ...].
        scale: Weight scale, [C_out] (per channel) or [1] (per tensor).
        k: Gain of the distance.
    """
    s = scale.detach().float().clamp_min(1e-8).reshape(-1, *([1] * (weight.dim() - 1)))
    v = weight.detach().float() / s
    return (k * (v - torch.round(v)).abs()).clamp_(0.0, ALPHA_MAX)


def ead_mu(t: float, tau: float, epochs: float, mu_init: float) -> float:
    """Scale smoothing ``mu = (1 - (t - tau) / (T - tau)) * mu_init``, clamped to [0, mu_init]; 0 when T <= tau."""
    if epochs <= tau:
        return 0.0
    return min(max((1.0 - (t - tau) / (epochs - tau)) * mu_init, 0.0), mu_init)


class EMAAwareDistance(Stabilizer):
    """EAD on the training model's quantized convs from epoch ``start_epoch`` on (see module docstring).

    Args:
        start_epoch: Epoch tau (0-based) from which EAD runs; None = never (unless ``start`` is given).
        k: Gain of the distance in ``a = k * |w/s - round(w/s)|``.
        mu_init: Scale smoothing mu at tau, annealed linearly to 0 at the end of training.
        start: Alternatively, tau as a fraction of training (qat.yaml's ``ead.start``; the paper runs EAD for the
            last 20 of 100 epochs: 0.8), resolved to an epoch once the number of epochs is known.
    """

    name = "ead"

    def __init__(self, start_epoch: int | None = None, k: float = 1.0, mu_init: float = 0.1, start: float | None = None):
        self.start_epoch, self.k, self.mu_init, self.start = start_epoch, float(k), float(mu_init), start
        self._convs: list[QConv2d] = []
        self._prev_w: list[torch.Tensor] = []
        self._scales: list[nn.Parameter] = []
        self._prev_s: list[torch.Tensor] = []
        self._model_id: int | None = None
        self._alpha_sum: torch.Tensor | None = None
        self._alpha_count = 0
        self.steps = 0  # EAD updates applied this epoch
        self.last_mu = 0.0

    def on_train_start(self, state: TrainState) -> None:
        if self.start is not None:
            self.start_epoch = min(int(round(self.start * state.epochs)), state.epochs - 1)

    def active(self, state: TrainState) -> bool:
        """True from epoch ``start_epoch`` on (and only if that epoch is part of training)."""
        return self.start_epoch is not None and self.start_epoch <= state.epoch < state.epochs

    # -- snapshot ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        """Copy the latent weights and scales of ``model``'s quantized convs (``W_{t-1}``, ``s_{t-1}`` of eq. 11-12)."""
        self._convs = [m for m in model.modules() if isinstance(m, QConv2d)]
        self._prev_w = [m.weight.detach().clone() for m in self._convs]
        quants = [q for m in self._convs for q in (m.weight_fake_quant, m.input_fake_quant) if q is not None]
        self._scales = [q.scale for q in quants]
        self._prev_s = [s.detach().clone() for s in self._scales]
        self._model_id = id(model)

    def release(self) -> None:
        """Drop the copies (EAD over, or the model changed)."""
        self._convs, self._prev_w, self._scales, self._prev_s, self._model_id = [], [], [], [], None

    def _changed(self) -> bool:
        flags = [(p != c).any() for p, c in zip(self._prev_w, (m.weight for m in self._convs))]
        flags += [(p != c).any() for p, c in zip(self._prev_s, self._scales)]
        return bool(torch.stack(flags).any()) if flags else False  # one device sync

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_epoch_start(self, state: TrainState) -> None:
        self._alpha_sum, self._alpha_count, self.steps = None, 0, 0

    def on_batch_start(self, state: TrainState) -> None:
        if not self.active(state):
            if self._model_id is not None:
                self.release()
            return
        if self._model_id != id(state.model):  # first active batch (also after a resume or a model rebuild)
            self.snapshot(state.model)
            return
        with torch.no_grad():  # W_{t-1}, s_{t-1}: the values before this batch's (possible) optimizer step
            for prev, m in zip(self._prev_w, self._convs):
                prev.copy_(m.weight)
            for prev, s in zip(self._prev_s, self._scales):
                prev.copy_(s)

    @torch.no_grad()
    def on_batch_end(self, state: TrainState) -> None:
        if not self.active(state) or self._model_id != id(state.model) or not self._changed():
            return
        t = state.epoch + (state.batch + 1) / max(state.batches_per_epoch, 1)  # epochs done after this step
        mu = ead_mu(t, float(self.start_epoch), float(state.epochs), self.mu_init)
        for s, prev in zip(self._scales, self._prev_s):  # eq. 12: s <- (1 - mu) * s_prev + mu * s
            s.add_((1.0 - mu) * (prev - s))
        for m, prev in zip(self._convs, self._prev_w):  # eq. 11: w <- a * w_prev + (1 - a) * w
            w = m.weight
            a = ead_alpha(w, m.weight_fake_quant.scale, self.k)
            w.add_(a.to(w.dtype) * (prev - w))
            total = a.sum()
            self._alpha_sum = total if self._alpha_sum is None else self._alpha_sum + total
            self._alpha_count += a.numel()
        self.steps += 1
        self.last_mu = mu

    def on_epoch_end(self, state: TrainState) -> None:
        # logged every epoch (0 before tau, the paper's alpha there): results.csv takes its columns from the first row
        state.log["qat/ead_alpha_mean"] = float(self._alpha_sum) / self._alpha_count if self._alpha_count else 0.0
        state.log["qat/ead_mu"] = self.last_mu if self._alpha_count else 0.0
        if state.epoch + 1 >= state.epochs:
            self.release()
