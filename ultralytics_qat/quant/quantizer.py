"""LSQ fake quantizer: a learned scale on an integer grid [qn, qp], for weights or activations.

Weights use a symmetric signed grid, per output channel or per tensor, initialised from the weights themselves.
Activations use one scale per tensor on a grid chosen from calibration statistics: unsigned when no negatives were
seen, else an integer zero point (qn = -z) that spends the 2^b levels on [min, max] — SiLU outputs have a small
negative tail (down to -0.278), and a signed grid would waste half its levels on it.

The grid (qn, qp) and the ``initialized`` flag live in buffers so checkpoints carry them, and are mirrored in Python
ints/bools so the forward never reads a device tensor on the host.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import QuantizerNotInitializedError
from ..ops import SCALE_EPS, lsq_fake_quantize

_MSE_ALPHAS = torch.linspace(0.25, 1.0, 31)
_SAMPLE_PER_BATCH = 1 << 15
_SAMPLE_MAX = 1 << 18


def signed_grid(bits: int, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range of a signed ``bits``-bit grid; narrow drops -2^(b-1) so the grid is symmetric."""
    return -(2 ** (bits - 1)) + int(narrow_range), 2 ** (bits - 1) - 1


def unsigned_grid(bits: int) -> tuple[int, int]:
    """Integer range of an unsigned ``bits``-bit grid."""
    return 0, 2**bits - 1


class _RangeObserver:
    """Collects min/max (running and moving-average) and a value sample of activations during calibration."""

    def __init__(self, momentum: float = 0.1):
        self.momentum = momentum
        self.min = self.max = self.ema_min = self.ema_max = None
        self.samples: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        lo, hi = x.min(), x.max()
        if self.min is None:
            self.min, self.max, self.ema_min, self.ema_max = lo, hi, lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
            self.ema_min = self.ema_min + self.momentum * (lo - self.ema_min)
            self.ema_max = self.ema_max + self.momentum * (hi - self.ema_max)
        if sum(s.numel() for s in self.samples) < _SAMPLE_MAX:
            idx = torch.randint(0, x.numel(), (min(_SAMPLE_PER_BATCH, x.numel()),), device=x.device)
            self.samples.append(torch.cat([x[idx], lo.view(1), hi.view(1)]))  # keep the extremes in the sample
        self.count += 1


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size (LSQ, Esser et al. 2020).

    Args:
        bits: Bit width, 2..8.
        kind: ``"weight"`` (symmetric signed grid, init from the weights) or ``"activation"`` (grid from calibration).
        channels: Number of scales: the output channels for per-channel weights, 1 for per tensor.
        narrow_range: Weights only: use [-(2^(b-1)-1), 2^(b-1)-1] so the grid is symmetric.
        grid: Activations only: ``auto``, ``signed`` or ``unsigned`` (see module docstring).
        init: Weights ``lsq|mse|minmax``; activations ``mse|minmax|ema_minmax``.
    """

    def __init__(self, bits: int, kind: str, channels: int = 1, narrow_range: bool = False, grid: str = "signed", init: str = "lsq"):
        super().__init__()
        if kind not in {"weight", "activation"}:
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        self.kind, self.narrow_range, self.grid_mode, self.init = kind, narrow_range, grid, init
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("qrange", torch.zeros(3, dtype=torch.int32))  # bits, qn, qp
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._observer: _RangeObserver | None = None
        self._set_grid(bits, *self._default_grid(bits))
        self._initialized = False
        self.pulse_delta = 0.0  # ScaleGrad options, set by the controller from qat.scalegrad
        self.dist_k = 0.0
        self.scheduled = False  # follows the bit schedule (layers at the default width)
        self.tracker: nn.Module | None = None  # weights: oscillation tracker attached by ultralytics_qat.stabilize

    # -- grid bookkeeping --------------------------------------------------------------------------------------------
    @property
    def per_channel(self) -> bool:
        return self.kind == "weight" and self.scale.numel() > 1

    def _default_grid(self, bits: int) -> tuple[int, int]:
        if self.kind == "weight" or self.grid_mode == "signed":
            return signed_grid(bits, self.narrow_range and self.kind == "weight")
        return unsigned_grid(bits)

    def _set_grid(self, bits: int, qn: int, qp: int) -> None:
        self.bits, self.qn, self.qp = int(bits), int(qn), int(qp)
        self.qrange.copy_(torch.tensor([bits, qn, qp], dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bits, self.qn, self.qp = (int(v) for v in self.qrange.tolist())  # refresh the host-side mirrors
        self._initialized = bool(self.initialized)

    def grad_scale(self, numel: int) -> float:
        """LSQ gradient scale g = 1 / sqrt(N * max(qp, -qn, 1)), N = elements per scale value.

        The largest |level| instead of the paper's qp: on a zero-point activation grid like [-14, 1], qp = 1 would
        make g ~3x that of a symmetric grid of the same width ([-8, 7]); max(qp, -qn, 1) keeps them comparable.
        """
        n = max(numel // self.scale.numel(), 1)
        return 1.0 / math.sqrt(n * max(self.qp, -self.qn, 1))

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.observe(x)
            return x
        if not self._initialized:
            raise QuantizerNotInitializedError(
                "a fake quantizer ran before calibration; call QATController.calibrate(...) "
                "(QATDetectionTrainer and add_qat_callbacks do it before training)"
            )
        if self.tracker is not None:  # freezing, tracking and dampening act on the latent weight first
            x = self.tracker.pre_quantize(x, self)
        return lsq_fake_quantize(
            x, self.scale, self.qn, self.qp, self.grad_scale(x.numel()), 0 if self.per_channel else None,
            self.pulse_delta, self.dist_k if self.kind == "weight" else 0.0,
        )

    def quantized_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes clamp(round(x / s)) as float, without gradient (for trackers, export and tests)."""
        with torch.no_grad():
            s = self.scale.detach().clamp_min(SCALE_EPS)  # the forward's clamp: the codes it used
            s = s.view(-1, *([1] * (x.dim() - 1))) if self.per_channel else s.reshape(())
            return torch.clamp(torch.round(x.detach().float() / s), self.qn, self.qp)

    @torch.no_grad()
    def set_bits(self, bits: int, weight: torch.Tensor | None = None) -> None:
        """Move to a new bit width, keeping the same Parameter (optimizer state and EMA pairing stay valid).

        Weights are re-initialised from ``weight`` with the configured method; activations keep their float clip
        range [qn*s, qp*s] and get the grid of the new width over it. An uninitialised quantizer only changes grid.
        """
        bits = int(bits)
        if bits == self.bits:
            return
        if not self._initialized:
            self._set_grid(bits, *self._default_grid(bits))
            return
        if self.kind == "weight":
            self._set_grid(bits, *self._default_grid(bits))
            self.init_weight(weight)
        else:
            s = self.scale.detach().float().clamp_min(1e-8)
            lo, hi = float(self.qn * s), float(self.qp * s)
            self._set_grid(bits, self.qn, self.qp)  # bits first: init_activation reads self.bits
            self.init_activation(lo, hi)

    # -- initialisation ----------------------------------------------------------------------------------------------
    def start_observing(self) -> None:
        """Activations: make forward pass-through and record statistics until :meth:`finish_observing`."""
        self._observer = _RangeObserver()

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Activations: choose the grid and the scale from what was observed."""
        obs, self._observer = self._observer, None
        if obs is None or obs.min is None:
            raise QuantizerNotInitializedError("activation quantizer saw no data during calibration; run calibrate() with data")
        lo, hi = (obs.ema_min, obs.ema_max) if self.init == "ema_minmax" else (obs.min, obs.max)
        lo, hi = float(lo), float(hi)
        sample = torch.cat(obs.samples) if self.init == "mse" else None
        self.init_activation(lo, hi, sample)

    @torch.no_grad()
    def init_activation(self, lo: float, hi: float, sample: torch.Tensor | None = None) -> None:
        """Set grid and scale for activations in [lo, hi]; with a sample, pick the clip ratio of least MSE."""
        bits = self.bits
        hi = max(hi, 1e-8)
        alphas = _MSE_ALPHAS if sample is not None else torch.ones(1)
        best = None
        for a in alphas.tolist():
            qn, qp, s = self._activation_grid(bits, a * lo, a * hi)
            if sample is None:
                best = (0.0, qn, qp, s)
                break
            err = (torch.clamp(torch.round(sample / s), qn, qp) * s - sample).pow(2).mean().item()
            if best is None or err < best[0]:
                best = (err, qn, qp, s)
        _, qn, qp, s = best
        self._set_grid(bits, qn, qp)
        self.scale.fill_(s)
        self._mark_initialized()

    def _activation_grid(self, bits: int, lo: float, hi: float) -> tuple[int, int, float]:
        if self.grid_mode == "unsigned" or (self.grid_mode == "auto" and lo >= 0):
            qn, qp = unsigned_grid(bits)
            return qn, qp, hi / qp
        if self.grid_mode == "signed":
            qn, qp = signed_grid(bits)
            return qn, qp, max(hi, -lo) / qp
        levels = 2**bits - 1  # auto with negatives: integer zero point z, grid [-z, levels - z]
        s = (hi - lo) / levels
        z = min(max(round(-lo / s), 0), levels)
        return -z, levels - z, s

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor) -> None:
        """Set the weight scale(s) from ``w`` with the configured method (per output channel when per_channel)."""
        w = w.detach().float()
        flat = w.reshape(w.shape[0], -1) if self.scale.numel() > 1 else w.reshape(1, -1)
        qp = self.qp
        if self.init == "lsq":
            s = 2 * flat.abs().mean(1) / math.sqrt(qp)
        else:
            amax = flat.abs().amax(1).clamp_min(1e-8)
            s = amax / qp
            if self.init == "mse":
                best_err = torch.full_like(s, float("inf"))
                best = s.clone()
                for a in _MSE_ALPHAS.tolist():
                    cand = a * amax / qp
                    q = torch.clamp(torch.round(flat / cand[:, None]), self.qn, qp) * cand[:, None]
                    err = (q - flat).pow(2).mean(1)
                    better = err < best_err
                    best = torch.where(better, cand, best)
                    best_err = torch.where(better, err, best_err)
                s = best
        self.scale.copy_(s.clamp_min(1e-8).to(self.scale.dtype))
        self._mark_initialized()

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized = True

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, grid=[{self.qn}, {self.qp}], scales={self.scale.numel()}"
