"""Per-layer QAT statistics, recorded once per epoch into ``<run>/qat_layers.csv`` (one row per quantized conv).

Columns (:data:`COLUMNS`), empty where a value does not apply:

- ``stage``: ``start`` (after calibration, or the loaded scales of a QAT checkpoint; epoch 0), ``epoch`` (the end of
  a training epoch, after BN re-estimation, with results.csv's 1-based epoch), ``post_qat`` (after the post-QAT
  stages, with the last trained epoch).
- ``w_bits``, ``a_bits``: weight and input-activation bit width (``a_bits`` empty for a weight-only layer).
- ``osc_frac``, ``frozen_frac``: fraction of the layer's weights with oscillation frequency above
  ``stabilize.oscillation.OSC_FREQ``, and frozen (empty for an untracked layer).
- ``w_scale_mean``, ``a_scale_mean``: mean learned step size; ``w_scale_drift``, ``a_scale_drift``: its relative
  change since the ``start`` row, ``mean(s) / mean(s_start) - 1``.
- ``bn_mean_shift``, ``bn_var_shift``: what the stage's BN re-estimation changed in the BN after the conv,
  ``mean(|mu' - mu| / sqrt(var + eps))`` (in standard deviations) and ``mean(|var' / var - 1|``; empty when no
  re-estimation changed it.

Everything is read from the EMA model (validated and saved; its tracker state is an exact copy of the training
model's at epoch end). The cost is one walk over the modules per epoch and a copy of the BN statistics.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import nn

from ..quant import QConv2d
from ..stabilize.oscillation import OSC_FREQ, OscillationTracker

LAYERS_CSV = "qat_layers.csv"
COLUMNS = ("stage", "epoch", "layer", "w_bits", "a_bits", "osc_frac", "frozen_frac", "w_scale_mean", "w_scale_drift",
           "a_scale_mean", "a_scale_drift", "bn_mean_shift", "bn_var_shift")
STAGES = ("start", "epoch", "post_qat")


def quantized_convs(model: nn.Module) -> list[tuple[str, QConv2d, nn.Module | None]]:
    """(conv name, conv, the BatchNorm that follows it in its ``Conv`` block or None) of every quantized conv."""
    model = getattr(model, "module", model)
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        if isinstance(m, QConv2d):
            parent = name.rpartition(".")[0]
            bn = getattr(modules.get(parent), "bn", None) if parent else None
            out.append((name, m, bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None))
    return out


class LayerStats:
    """Appends one row per quantized conv and stage to ``<save_dir>/qat_layers.csv`` (see module docstring)."""

    def __init__(self):
        self.path: Path | None = None
        self.start_scales: dict[str, tuple[float | None, float | None]] = {}
        self._bn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):  # pickled with the run for DDP workers: no tensors
        return {**self.__dict__, "_bn": {}}

    def start(self, save_dir: str | Path, model: nn.Module, epochs_done: int = 0) -> None:
        """Begin the file: a fresh one with the ``start`` rows, or (resume) the kept rows of ``epochs_done`` epochs."""
        self.path = Path(save_dir) / LAYERS_CSV
        kept = _read_rows(self.path) if epochs_done > 0 else []
        kept = [r for r in kept if r["stage"] != "post_qat" and _int(r["epoch"]) <= epochs_done]
        starts = {r["layer"]: (_float(r["w_scale_mean"]), _float(r["a_scale_mean"])) for r in kept if r["stage"] == "start"}
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(kept)
        if starts:
            self.start_scales = starts
        else:
            self.start_scales = {}
            self.record(model, 0, "start")

    def snapshot_bn(self, model: nn.Module) -> None:
        """Copy the BN running statistics before a stage that may re-estimate them."""
        self._bn = {n: (bn.running_mean.detach().float().clone(), bn.running_var.detach().float().clone())
                    for n, _, bn in quantized_convs(model) if bn is not None and bn.running_mean is not None}

    @torch.no_grad()
    def record(self, model: nn.Module, epoch: int, stage: str = "epoch") -> int:
        """Append the rows of ``model`` at ``epoch``; returns the number of rows written (0 before :meth:`start`)."""
        if self.path is None:
            return 0
        rows = [self._row(name, conv, bn, epoch, stage) for name, conv, bn in quantized_convs(model)]
        self._bn = {}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerows(rows)
        return len(rows)

    def _row(self, name: str, conv: QConv2d, bn, epoch: int, stage: str) -> dict:
        wq, aq = conv.weight_fake_quant, conv.input_fake_quant
        w_scale = float(wq.scale.detach().float().mean())
        a_scale = float(aq.scale.detach().float().mean()) if aq is not None else None
        if stage == "start":
            self.start_scales[name] = (w_scale, a_scale)
        w0, a0 = self.start_scales.get(name, (None, None))
        row = {"stage": stage, "epoch": int(epoch), "layer": name, "w_bits": wq.bits,
               "a_bits": aq.bits if aq is not None else "", "w_scale_mean": _g(w_scale),
               "w_scale_drift": _g(_drift(w_scale, w0)), "a_scale_mean": _g(a_scale), "a_scale_drift": _g(_drift(a_scale, a0))}
        t = wq.tracker
        if isinstance(t, OscillationTracker) and bool(t.initialized):
            row["osc_frac"] = _g(float((t.freq > OSC_FREQ).float().mean()))
            row["frozen_frac"] = _g(float(t.frozen.float().mean()))
        before = self._bn.get(name)
        if before is not None and bn is not None:
            mu0, var0 = before
            mu, var = bn.running_mean.detach().float(), bn.running_var.detach().float()
            if not (torch.equal(mu, mu0) and torch.equal(var, var0)):
                row["bn_mean_shift"] = _g(float(((mu - mu0).abs() / (var0 + bn.eps).sqrt()).mean()))
                row["bn_var_shift"] = _g(float((var / (var0 + bn.eps) - 1).abs().mean()))
        return {k: row.get(k, "") for k in COLUMNS}


def read_layers_csv(path: str | Path) -> list[dict]:
    """Rows of a qat_layers.csv with numbers parsed (None where empty); [] if the file is missing."""
    out = []
    for r in _read_rows(Path(path)):
        row = {"stage": r["stage"], "epoch": _int(r["epoch"]), "layer": r["layer"]}
        row.update({k: _float(r.get(k, "")) for k in COLUMNS[3:]})
        out.append(row)
    return out


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("stage") in STAGES]


def _drift(value: float | None, start: float | None) -> float | None:
    if value is None or not start:
        return None
    return value / start - 1.0


def _g(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.6g}"


def _float(v) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _int(v) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1
