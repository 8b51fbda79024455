"""The report's plots (PNG and SVG) and the run's results.png, drawn with matplotlib's object API (no pyplot state).

Each function takes a :class:`RunData` and a folder and returns the files it wrote ([] when the run has nothing to
show, e.g. no quantized layer was tracked).
"""

from __future__ import annotations

import math
from pathlib import Path

from .runfolder import MAP, MAP50, RunData

# results.csv columns that are per-epoch QAT curves worth a results.png panel (others are settings or bookkeeping)
QAT_CURVES = ("qat/osc_frac", "qat/frozen_frac")
FORMATS = ("png", "svg")


def _figure(w: float, h: float, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [a for row in axes for a in row]


def _save(fig, folder: Path, stem: str, formats=FORMATS) -> list[Path]:
    out = []
    for fmt in formats:
        f = folder / f"{stem}.{fmt}"
        fig.savefig(f, dpi=150 if fmt == "png" else None)
        out.append(f)
    return out


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mark_events(ax, run: RunData) -> None:
    for i, e in enumerate(run.events):
        ax.axvline(e["epoch"], color="tab:red", ls="--", lw=1, label="event" if i == 0 else None)
        ax.annotate(e["action"] or e["source"], (e["epoch"], 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="tab:red")


def _epoch_axis(ax, run: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    if len(run.epochs) == 1:  # one point: give it room
        ax.set_xlim(run.epochs[0] - 1, run.epochs[0] + 1)
    ax.grid(alpha=0.3)


def plot_losses(run: RunData, folder: Path) -> list[Path]:
    """Train vs val loss, one panel per loss component and one for their sum."""
    parts = [k[len("train/"):] for k in run.results if k.startswith("train/") and f"val/{k[6:]}" in run.results]
    if not parts:
        return []
    fig, axes = _figure(3.2 * (len(parts) + 1), 3.2, 1, len(parts) + 1)
    x = run.epochs
    totals = {s: [sum(run.results[f"{s}/{p}"][i] for p in parts) for i in range(len(x))] for s in ("train", "val")}
    for ax, name in zip(axes, [*parts, "total"]):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            ys = totals[split] if name == "total" else run.results[f"{split}/{name}"]
            ax.plot(*_finite(x, ys), marker=".", color=color, label=split)
        _mark_events(ax, run)
        ax.set_title(name.replace("_", " ") if name != "total" else "total loss")
        _epoch_axis(ax, run)
    axes[0].legend()
    fig.suptitle(f"train vs val loss: {run.run_dir.name}")
    return _save(fig, folder, "train-vs-val-loss")


def plot_map(run: RunData, folder: Path) -> list[Path]:
    """mAP50 and mAP50-95 per epoch, the best epoch, the post-QAT result and events."""
    if MAP not in run.results:
        return []
    fig, axes = _figure(10, 3.6, 1, 2)
    best = run.best_epoch()
    post = (run.post_qat or {}).get("metrics") or {}
    for ax, key, title in ((axes[0], MAP50, "mAP50"), (axes[1], MAP, "mAP50-95")):
        ax.plot(*_finite(run.epochs, run.results.get(key, [])), marker=".", color="tab:blue", label="epoch (EMA)")
        if best is not None and run.value(key, best) is not None:
            ax.axvline(best, color="tab:green", ls=":", lw=1)
            ax.plot([best], [run.value(key, best)], "o", ms=9, mfc="none", mec="tab:green", mew=2,
                    label=f"best epoch {best}")
        if post.get(key) is not None and run.epochs:
            ax.plot([run.epochs[-1] + 0.5], [post[key]], "*", ms=14, color="tab:purple", label="post-QAT")
        _mark_events(ax, run)
        ax.set_title(title)
        ax.set_ylabel(title)
        _epoch_axis(ax, run)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"validation mAP: {run.run_dir.name}")
    return _save(fig, folder, "metrics-mAP")


def _layer_label(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".conv")


def _layer_grid(run: RunData, stat: str, stages=("epoch",)):
    """(layers, epochs, matrix[layer][epoch] or None) of a per-layer statistic."""
    rows = [r for r in run.layers if r["stage"] in stages and r[stat] is not None]
    layers = list(dict.fromkeys(r["layer"] for r in run.layers if r["stage"] in stages))
    layers = [n for n in layers if any(r["layer"] == n for r in rows)]
    epochs = sorted({r["epoch"] for r in rows})
    cell = {(r["layer"], r["epoch"]): r[stat] for r in rows}
    return layers, epochs, [[cell.get((n, e), math.nan) for e in epochs] for n in layers]


def plot_oscillation_heatmap(run: RunData, folder: Path) -> list[Path]:
    """Layer x epoch heat map of the fraction of oscillating weights (tracked layers only)."""
    layers, epochs, grid = _layer_grid(run, "osc_frac")
    if not layers:
        return []
    h = min(max(3.0, 0.16 * len(layers) + 1.4), 14)
    fig, (ax,) = _figure(min(max(7.0, 0.12 * len(epochs) + 4), 16), h)
    grid = [[100 * v for v in row] for row in grid]
    top = max((v for row in grid for v in row if math.isfinite(v)), default=0.0)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=max(top, 1.0),
                   extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), [_layer_label(n) for n in layers], fontsize=6 if len(layers) > 30 else 8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer")
    for e in run.events:
        ax.axvline(e["epoch"], color="tab:cyan", ls="--", lw=1)
    fig.colorbar(im, ax=ax, label="oscillating weights (% of the layer)")
    fig.suptitle(f"oscillating weights per layer: {run.run_dir.name}")
    return _save(fig, folder, "oscillation-heatmap")


def plot_scale_drift(run: RunData, folder: Path) -> list[Path]:
    """Per layer: the relative drift of the mean weight and activation scale since calibration, at the last epoch."""
    last = max((r["epoch"] for r in run.layers if r["stage"] == "epoch"), default=None)
    if last is None:
        return []
    rows = [r for r in run.layers if r["stage"] == "epoch" and r["epoch"] == last]
    fig, axes = _figure(10, min(max(3.0, 0.16 * len(rows) + 1.4), 14), 1, 2)
    y = range(len(rows))
    for ax, key, title, color in ((axes[0], "w_scale_drift", "weight scale", "tab:blue"),
                                  (axes[1], "a_scale_drift", "activation scale", "tab:orange")):
        vals = [100 * (r[key] or 0.0) for r in rows]
        ax.barh(y, vals, color=color)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [_layer_label(r["layer"]) for r in rows], fontsize=6 if len(rows) > 30 else 8)
        ax.invert_yaxis()
        ax.set_xlabel("drift of the mean since calibration (%)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"scale drift per layer after epoch {last}: {run.run_dir.name}")
    return _save(fig, folder, "scale-drift")


def results_columns(run: RunData) -> list[str]:
    """results.png panels: losses and metrics as Ultralytics draws them, plus the QAT curves; never a column with a
    single value in a run of several epochs."""
    n = len(run.epochs)

    def has_curve(k: str) -> bool:
        return sum(math.isfinite(v) for v in run.results[k]) >= min(2, n)

    losses = [k for k in run.results if "loss" in k and has_curve(k)]
    metrics = [k for k in run.results if k.startswith("metrics/") and has_curve(k)]
    qat = [k for k in QAT_CURVES if k in run.results and has_curve(k)]
    return losses + metrics + qat


def plot_results_png(run: RunData, folder: Path) -> list[Path]:
    """The run's results.png (replaces Ultralytics' own): two rows of panels, one per curve."""
    cols = results_columns(run)
    if not cols or not run.epochs:
        return []
    ncol = (len(cols) + 1) // 2
    fig, axes = _figure(2.6 * ncol + 1, 5.6, 2, ncol)
    for ax, key in zip(axes, cols):
        ax.plot(*_finite(run.epochs, run.results[key]), marker=".", lw=2, ms=7,
                color="tab:purple" if key.startswith("qat/") else "tab:blue")
        ax.set_title(key, fontsize=10)
        _mark_events(ax, run)
        _epoch_axis(ax, run)
        ax.set_xlabel("")
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    return _save(fig, folder, "results", formats=("png",))


REPORT_PLOTS = (plot_losses, plot_map, plot_oscillation_heatmap, plot_scale_drift)
