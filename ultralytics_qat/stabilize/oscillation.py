"""Weight oscillations in QAT: tracking, dampening and iterative freezing (Nagel et al., ICML 2022).

Formulas are in ``ultralytics_qat.ops.oscillation`` (tracking, freezing) and below (dampening). What this module adds
is where the state lives and when it moves:

State. Every tracked weight quantizer gets an :class:`OscillationTracker` submodule (``weight_fake_quant.tracker``)
at :meth:`OscillationStabilizer.attach`, i.e. before the optimizer and the EMA exist, so its state is made of buffers
that ``state_dict``, the EMA copy, the QAT checkpoint entry and resume all carry (the reference code keeps it in
Python attributes and loses it on resume). The buffers are registered with their final size at attach and filled in
place later (the EMA pairs tensors once, by object): the six tensors of ``init_oscillation_state`` stored as
[out_channels, rest] (2-D, so ``model.to(memory_format=channels_last)``, Ultralytics' default on CUDA, leaves them
contiguous), ``grid`` (bits, qn, qp the state was built for) and ``initialized``. They are filled at
``on_train_start`` from the calibrated scale; a resumed or loaded state (``initialized``) is never re-initialised.
A bit-schedule step changes the quantizer's grid: the tracker then starts afresh on the new grid (nothing frozen).

When. Tracking runs once per optimizer step, in ``on_batch_end`` after the step (a post-step hook on the optimizer
tells whether one was taken), on the training model's latent weights. With gradient accumulation (Ultralytics
``nbs`` > ``batch``) the weights only change at steps, so counting per forward would only dilute the frequency EMA.
Forwards never track, so calibration, validation, BN re-estimation and AFW leave the state alone. Every DDP rank
holds the same weights after a step and so computes the same state, with no communication.

Freezing. With threshold thr > 0 (0 before ``freeze_start``, then cosine-annealed from ``freeze_threshold`` to
``freeze_final_threshold``), weights with freq > thr freeze at round(ema_int). In training-mode forwards a frozen
weight is replaced by ``frozen_int * s``: its latent weight gets no gradient, and the scale gets the gradient of a
fixed code (``frozen_int``, times the LSQ gradient scale) just as LSQ treats a clipped weight (fixed code qn/qp). The
latent weight of a frozen entry is also overwritten with ``frozen_int * s`` ("baked") after every step, and in the
EMA before every validation, so eval-mode forwards, ``quantized_int``, BN folding and export read the frozen codes
from the weights alone; eval-mode forwards therefore leave the weight untouched. Frozen weights stay frozen across
resume (the flags are buffers).

Dampening. The loss ``lambda * sum_layers mean_elements (stopgrad(q(w)) - clip(w, s*qn, s*qp))^2`` is added as its
gradient, ``2 * lambda * (clip(w) - q(w)) / numel(w)``, by an identity autograd function on the latent weight
(Ultralytics computes its loss inside the model). lambda is cosine-annealed from 0 at ``dampen_start`` to
``dampen_lambda`` at the end; it is relative to Ultralytics' detection loss (summed components times batch size).
Frozen weights get no dampening gradient.

Logging (``qat/*`` columns of results.csv, identical every epoch): ``osc_frac`` (fraction of tracked weights with
freq > 0.005, :data:`OSC_FREQ`), ``osc_frac_max`` (of the worst layer), ``frozen_frac``, and the current
``freeze_thr`` and ``dampen_lambda``. Per-layer figures would make results.csv very wide; the three worst layers go to
the log each epoch and :func:`oscillation_report` returns them all.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import init_oscillation_state, track_oscillations
from ..ops.oscillation import STATE_DTYPES
from ..ops.reference import SCALE_EPS
from ..quant import LSQQuantizer, QConv2d
from ..utils import LOGGER
from .base import Stabilizer, TrainState, cosine_ramp

OSC_FREQ = 0.005  # a weight "oscillates" when its frequency EMA exceeds this (AFW's default min_frequency)
STATE_NAMES = tuple(STATE_DTYPES)  # prev_int, prev_dir, frozen, frozen_int, freq, ema_int


def _scale_view(scale: torch.Tensor, q: LSQQuantizer, dim: int) -> torch.Tensor:
    """The quantizer's scale shaped to broadcast against a weight of ``dim`` dims (axis 0 when per channel)."""
    return scale.view(-1, *([1] * (dim - 1))) if q.per_channel else scale.reshape(())


class _GradScale(torch.autograd.Function):
    """Identity in the forward, gradient times ``g`` in the backward (LSQ's gradient scale, bit-exact forward)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


class _Dampen(torch.autograd.Function):
    """Identity on the latent weight whose backward adds the gradient of the dampening loss.

    For ``L = lam * mean((stopgrad(q(w)) - clip(w, s*qn, s*qp))^2)`` over the ``n`` elements of ``w``:
    ``dL/dw = 2 * lam / n * (clip(w) - q(w))`` inside the range; outside it clip(w) = q(w) = s*qn or s*qp, so the
    difference (and the gradient, also to ``s``) is 0 there. ``coeff`` is ``2 * lam / n``.
    """

    @staticmethod
    def forward(ctx, w, scale, qn, qp, coeff, frozen):
        with torch.no_grad():
            s = scale.detach().float().clamp_min(SCALE_EPS)
            wf = w.detach().float()
            q = torch.div(wf, s).round_().clamp_(qn, qp).mul_(s)
            d = torch.minimum(torch.maximum(wf, s * qn), s * qp).sub_(q)
            if frozen is not None:
                d = d.masked_fill_(frozen, 0.0)
        ctx.save_for_backward(d)
        ctx.coeff = coeff
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return grad + (ctx.coeff * d).to(grad.dtype), None, None, None, None, None


def dampening_loss(w: torch.Tensor, q: LSQQuantizer, lam: float) -> torch.Tensor:
    """The explicit dampening loss of one layer (for tests and analysis; training adds its gradient instead)."""
    s = _scale_view(q.scale.detach().float(), q, w.dim())
    return lam * (q.quantized_int(w) * s - torch.clamp(w, s * q.qn, s * q.qp)).pow(2).mean()


class OscillationTracker(nn.Module):
    """Per-weight oscillation state of one weight quantizer (buffers), and the quantizer's ``pre_quantize`` hook.

    Args:
        weight_shape: Shape of the weight; the state is stored as [shape[0], prod(shape[1:])].
        device: Device of the buffers.
    """

    def __init__(self, weight_shape: torch.Size | tuple, device=None):
        super().__init__()
        shape = tuple(weight_shape)
        if len(shape) > 1:
            shape = (int(shape[0]), int(torch.Size(shape[1:]).numel()))
        for name, dtype in STATE_DTYPES.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("grid", torch.zeros(3, dtype=torch.int32, device=device))  # bits, qn, qp of the state
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        # host-side switches set by the stabilizer (never read from device tensors in the forward)
        self.dampen_lambda = 0.0  # current dampening weight (training model only)
        self.freezing = False  # some weights may be frozen: substitute frozen_int * s in training forwards

    # -- state -------------------------------------------------------------------------------------------------------
    def state(self) -> tuple[torch.Tensor, ...]:
        """The six state tensors in ``track_oscillations`` order."""
        return tuple(getattr(self, n) for n in STATE_NAMES)

    def grid_tuple(self) -> tuple[int, int, int]:
        """(bits, qn, qp) the state was built for (reads the buffer)."""
        return tuple(int(v) for v in self.grid.tolist())

    @torch.no_grad()
    def reset(self, w: torch.Tensor, q: LSQQuantizer) -> None:
        """Fresh state at the current integers of ``w`` on ``q``'s grid, in place (nothing frozen, no history)."""
        w2 = w.detach().reshape(self.freq.shape)
        fresh = init_oscillation_state(w2, q.scale.detach(), q.qn, q.qp, 0 if q.per_channel else None)
        for name, t in zip(STATE_NAMES, fresh):
            getattr(self, name).copy_(t)
        self.grid.copy_(torch.tensor([q.bits, q.qn, q.qp], dtype=torch.int32))
        self.initialized.fill_(True)
        self.freezing = False

    @torch.no_grad()
    def track(self, w: torch.Tensor, q: LSQQuantizer, momentum: float, threshold: float) -> torch.Tensor:
        """One tracking step on the latent weight ``w`` (see ``ops.oscillation``); returns the oscillation count."""
        w2 = w.detach().reshape(self.freq.shape)
        n = track_oscillations(w2, q.scale.detach(), q.qn, q.qp, *self.state(), momentum, threshold,
                               0 if q.per_channel else None)
        if threshold > 0:
            self.freezing = True
        return n

    @torch.no_grad()
    def bake(self, w: torch.Tensor, q: LSQQuantizer) -> None:
        """Write ``frozen_int * s`` into the latent weight of frozen entries (so plain fake quant gives the codes)."""
        fz = self.frozen.view(w.shape).bool()
        s = _scale_view(q.scale.detach().float().clamp_min(SCALE_EPS), q, w.dim())
        w.copy_(torch.where(fz, self.frozen_int.view(w.shape).float() * s, w.float()).to(w.dtype))

    def codes(self, w: torch.Tensor, q: LSQQuantizer) -> torch.Tensor:
        """Effective integer codes (frozen ones included), float, shape of ``w``."""
        c = q.quantized_int(w)
        return torch.where(self.frozen.view(w.shape).bool(), self.frozen_int.view(w.shape).float(), c)

    # -- the quantizer hook ------------------------------------------------------------------------------------------
    def pre_quantize(self, x: torch.Tensor, q: LSQQuantizer) -> torch.Tensor:
        """Called by ``LSQQuantizer.forward`` on the latent weight; returns what it fake-quantizes.

        Training mode only: dampening gradient on the latent weight, frozen entries replaced by ``frozen_int * s``.
        Eval mode: ``x`` unchanged (frozen entries are baked into the weights, see the module docstring).
        """
        if not self.training or x.numel() != self.freq.numel():
            return x
        fz = self.frozen.view(x.shape).bool() if self.freezing else None
        if self.dampen_lambda > 0 and torch.is_grad_enabled():
            s = _scale_view(q.scale.detach(), q, x.dim())
            x = _Dampen.apply(x, s, q.qn, q.qp, 2.0 * self.dampen_lambda / x.numel(), fz)
        if fz is not None:
            s = _GradScale.apply(q.scale, q.grad_scale(x.numel()))
            # the LSQ forward's clamp, so frozen_int * s quantizes back to frozen_int at any scale; its gradient
            # passes unchanged like the op's (s - s.detach() is exactly 0: the value is bitwise the clamped scale)
            s = _scale_view(s.detach().clamp_min(SCALE_EPS) + (s - s.detach()), q, x.dim())
            x = torch.where(fz, self.frozen_int.view(x.shape).to(x.dtype) * s.to(x.dtype), x)
        return x

    def extra_repr(self) -> str:
        return f"shape={tuple(self.freq.shape)}"


# ---------------------------------------------------------------------------------------------------------------------
def tracked_layers(model: nn.Module) -> list[tuple[str, QConv2d, LSQQuantizer, OscillationTracker]]:
    """(conv name, conv, weight quantizer, tracker) of every conv whose weight quantizer carries a tracker."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QConv2d):
            q = m.weight_fake_quant
            if isinstance(getattr(q, "tracker", None), OscillationTracker):
                out.append((name, m, q, q.tracker))
    return out


@torch.no_grad()
def oscillation_report(model: nn.Module, threshold: float = OSC_FREQ) -> list[tuple[str, float, float]]:
    """Per tracked layer (initialised trackers only): (conv name, fraction with freq > threshold, fraction frozen)."""
    rows = []
    for name, _, _, t in tracked_layers(getattr(model, "module", model)):
        if bool(t.initialized):
            rows.append((name, float((t.freq > threshold).float().mean()), float(t.frozen.float().mean())))
    return rows


def copy_tracker_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy every tracker buffer (float ones included, which the EMA would otherwise average) from src to dst."""
    dst_t = {n: t for n, _, _, t in tracked_layers(dst)}
    with torch.no_grad():
        for n, _, _, t in tracked_layers(src):
            if n in dst_t:
                for (_, a), (_, b) in zip(t.named_buffers(), dst_t[n].named_buffers()):
                    b.copy_(a)
                dst_t[n].freezing = t.freezing


class OscillationStabilizer(Stabilizer):
    """Tracks oscillations of low-bit weights; optionally dampens them and freezes oscillating weights.

    Args:
        track: Run the tracking steps (needed by freezing and AFW; forced on when either is configured).
        max_bits: Only quantizers at this weight width or lower are tracked.
        momentum: EMA momentum of frequency and integer EMA.
        dampen_lambda: Final dampening weight (0 = off).
        dampen_start: Progress at which dampening starts.
        freeze_threshold: Initial freezing threshold, None = no freezing.
        freeze_final_threshold: Threshold at the end of training.
        freeze_start: Progress at which freezing starts.
        scheduled_bits: Weight bits of the bit schedule's stages: a scheduled layer is tracked if any stage is at
            <= max_bits (tracking is active only while it is).
    """

    name = "oscillation"

    def __init__(self, track=True, max_bits=4, momentum=0.01, dampen_lambda=0.0, dampen_start=0.25,
                 freeze_threshold=None, freeze_final_threshold=0.01, freeze_start=0.25, scheduled_bits=()):
        self.tracking = bool(track or freeze_threshold)
        self.max_bits, self.momentum = max_bits, momentum
        self.dampen_lambda, self.dampen_start = dampen_lambda, dampen_start
        self.freeze_threshold, self.freeze_final_threshold, self.freeze_start = (
            freeze_threshold, freeze_final_threshold, freeze_start)
        self.scheduled_bits = list(scheduled_bits)
        self._steps = 0  # optimizer steps not yet tracked
        self._hook = None
        self._optimizer = None

    @classmethod
    def from_config(cls, cfg) -> OscillationStabilizer:
        """Build from a :class:`QATConfig` (tracking forced on when AFW needs it)."""
        o = cfg.oscillation
        return cls(o.track or cfg.afw.enabled, o.max_bits, o.momentum, o.dampen_lambda, o.dampen_start,
                   o.freeze_threshold, o.freeze_final_threshold, o.freeze_start, cfg.schedule.weight_bits)

    # -- schedules ---------------------------------------------------------------------------------------------------
    def threshold(self, progress: float) -> float:
        """Freezing threshold: 0 before ``freeze_start``, then cosine from ``freeze_threshold`` to the final one."""
        if not self.freeze_threshold or progress < self.freeze_start:
            return 0.0
        return cosine_ramp(progress, self.freeze_start, self.freeze_threshold, self.freeze_final_threshold)

    def lam(self, progress: float) -> float:
        """Dampening weight: 0 up to ``dampen_start``, then cosine up to ``dampen_lambda`` at the end."""
        return cosine_ramp(progress, self.dampen_start, 0.0, self.dampen_lambda) if self.dampen_lambda else 0.0

    def _active(self, q: LSQQuantizer) -> bool:
        return q.bits <= self.max_bits

    # -- hooks -------------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        low_stage = bool(self.scheduled_bits) and min(self.scheduled_bits) <= self.max_bits
        for m in model.modules():
            if isinstance(m, QConv2d):
                q = m.weight_fake_quant
                if q.bits <= self.max_bits or (q.scheduled and low_stage):
                    q.tracker = OscillationTracker(m.weight.shape, device=m.weight.device)

    def _count_step(self, *args, **kwargs) -> None:
        self._steps += 1

    def on_train_start(self, state: TrainState) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._optimizer, self._steps = state.optimizer, 0
        if state.optimizer is not None:
            self._hook = state.optimizer.register_step_post_hook(self._count_step)
        for _, m, q, t in tracked_layers(state.model):
            if not bool(t.initialized) and q._initialized and self._active(q):
                t.reset(m.weight, q)
            t.freezing = bool(t.initialized) and bool(t.frozen.any())
        self._sync_ema(state)

    def on_epoch_start(self, state: TrainState) -> None:
        # a bit-schedule step (BitSchedule runs before this) moved some grids: start those trackers afresh
        for _, m, q, t in tracked_layers(state.model):
            if bool(t.initialized) and t.grid_tuple() != (q.bits, q.qn, q.qp):
                if self._active(q):
                    t.reset(m.weight, q)
                else:
                    t.initialized.fill_(False)
                    t.freezing = False
            elif not bool(t.initialized) and q._initialized and self._active(q):
                t.reset(m.weight, q)
            t._grid = (q.bits, q.qn, q.qp) if bool(t.initialized) else None  # host mirror read per step
        self._sync_ema(state)

    def on_batch_start(self, state: TrainState) -> None:
        lam = self.lam(state.progress)
        for _, _, q, t in tracked_layers(state.model):
            t.dampen_lambda = lam if self._active(q) else 0.0

    def on_batch_end(self, state: TrainState) -> None:
        if not self.tracking or self._steps == 0:
            return
        self._steps = 0
        thr = self.threshold(state.progress)
        for _, m, q, t in tracked_layers(state.model):
            if not self._active(q) or getattr(t, "_grid", None) != (q.bits, q.qn, q.qp):
                continue  # not tracked at this width, or its state is for another grid (reset at the epoch start)
            t.track(m.weight, q, self.momentum, thr)
            if t.freezing:
                t.bake(m.weight, q)

    def on_epoch_end(self, state: TrainState) -> None:
        for _, _, _, t in tracked_layers(state.model):
            t.dampen_lambda = 0.0  # the training model's forwards outside training batches get no dampening
        self._sync_ema(state)
        rows = oscillation_report(state.model)
        sizes = {n: t.freq.numel() for n, _, _, t in tracked_layers(state.model)}
        total = sum(sizes[n] for n, _, _ in rows)
        osc = sum(f * sizes[n] for n, f, _ in rows) / max(total, 1)
        frozen = sum(z * sizes[n] for n, _, z in rows) / max(total, 1)
        state.log["qat/osc_frac"] = osc
        state.log["qat/osc_frac_max"] = max((f for _, f, _ in rows), default=0.0)
        state.log["qat/frozen_frac"] = frozen
        state.log["qat/freeze_thr"] = self.threshold(state.progress)
        state.log["qat/dampen_lambda"] = self.lam(state.progress)
        if rows and self.tracking:
            worst = sorted(rows, key=lambda r: -r[1])[:3]
            LOGGER.info("QAT: oscillating weights (freq > %g) %.2f%%, frozen %.2f%%; worst layers: %s" % (
                OSC_FREQ, 100 * osc, 100 * frozen, ", ".join(f"{n} {100 * f:.1f}%" for n, f, _ in worst)))

    def before_validation(self, state: TrainState) -> None:
        if state.ema is not None:
            for _, m, q, t in tracked_layers(state.ema):
                if bool(t.initialized) and bool(t.frozen.any()):
                    t.bake(m.weight, q)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _sync_ema(self, state: TrainState) -> None:
        """Exact tracker state in the EMA (it would average freq/ema_int), with frozen codes baked into its weights."""
        if state.ema is None:
            return
        copy_tracker_state(state.model, state.ema)
        self.before_validation(state)
