"""write_report: the database, the plots and report.md of a run folder, from that folder alone."""

from __future__ import annotations

import math
from pathlib import Path

from .db import DB_FILE, write_db
from .plots import REPORT_PLOTS, plot_results_png
from .runfolder import MAP, MAP50, RunData, read_run

REPORT_FILE = "report.md"
PLOTS_DIR = "qat_report"  # the report's plots, in a folder of their own beside Ultralytics' plots


def write_report(run_dir: str | Path, post_qat: dict | None = None, results_png: bool = True) -> Path:
    """Write ``qat_stats.db``, the plots (``qat_report/*.png|svg``, ``results.png``) and ``report.md``.

    Args:
        run_dir: A training run's save dir (holds results.csv).
        post_qat: The post-QAT stage result, if the caller has it (else read from weights/last.pt).
        results_png: Also redraw results.png with the QAT curves.

    Returns:
        The path of report.md.
    """
    run = read_run(run_dir, post_qat)
    write_db(run)
    plots_dir = run.run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    plots = [p for fn in REPORT_PLOTS for p in fn(run, plots_dir)]
    if results_png:
        plot_results_png(run, run.run_dir)
    out = run.run_dir / REPORT_FILE
    out.write_text(summary(run, [p for p in plots if p.suffix == ".png"]))
    return out


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def _f(v, nd: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{nd}f}"


def summary(run: RunData, plots: list[Path]) -> str:
    """report.md: headline numbers, the layers that stand out, events, and links to the plots and the database."""
    ep = run.epochs
    best = run.best_epoch()
    lines = [f"# QAT report: {run.run_dir.name}", "", f"Run folder: `{run.run_dir.resolve()}`", ""]
    lines += ["| | epoch | mAP50 | mAP50-95 |", "|---|---|---|---|"]
    if best is not None:
        lines.append(f"| best epoch (best.pt during training) | {best} | {_f(run.value(MAP50, best))} | "
                     f"{_f(run.value(MAP, best))} |")
    if ep:
        lines.append(f"| last epoch | {ep[-1]} | {_f(run.value(MAP50, ep[-1]))} | {_f(run.value(MAP, ep[-1]))} |")
    post = run.post_qat
    if post:
        m = post.get("metrics") or {}
        lines.append(f"| post-QAT stages | after {ep[-1] if ep else '?'} | {_f(m.get(MAP50))} | "
                     f"{_f(m.get(MAP, post.get('fitness')))} |")
    lines.append("")
    if post:
        where = "it is best.pt and last.pt" if post.get("in_best") else "best.pt keeps the best epoch; last.pt holds it"
        lines += [f"Post-QAT model: fitness {_f(post.get('fitness'))} vs best epoch before {_f(post.get('best_fitness_before'))}"
                  f" ({where}).", ""]
    lines += _layer_lines(run)
    if run.events:
        lines += ["## Events", "", "| epoch | source | action | message |", "|---|---|---|---|"]
        lines += [f"| {e['epoch']} | {e['source']} | {e['action']} | {e['message'].replace('|', '/')} |" for e in run.events]
        lines.append("")
    lines += ["## Files", "", f"- `{DB_FILE}`: every results.csv scalar per epoch (`results`), per-layer statistics "
              "(`layers`), `post_qat`, `events` (SQLite)", "- `qat_layers.csv`: the per-layer statistics per epoch",
              "- `results.png`: Ultralytics' curves with the QAT ones"]
    lines += [f"- [`{p.relative_to(run.run_dir)}`]({p.relative_to(run.run_dir)}) (and .svg)" for p in plots]
    return "\n".join(lines) + "\n"


def _layer_lines(run: RunData) -> list[str]:
    last = max((r["epoch"] for r in run.layers if r["stage"] == "epoch"), default=None)
    if last is None:
        return []
    rows = [r for r in run.layers if r["stage"] == "epoch" and r["epoch"] == last]
    bits: dict[str, int] = {}
    for r in rows:
        key = f"W{_i(r['w_bits'])}A{_i(r['a_bits']) if r['a_bits'] is not None else '-'}"
        bits[key] = bits.get(key, 0) + 1
    out = [f"## Layers after epoch {last}", "", f"{len(rows)} quantized convs: " +
           ", ".join(f"{n} x {k}" for k, n in sorted(bits.items(), key=lambda kv: -kv[1])) + ".", ""]
    osc = sorted((r for r in rows if r["osc_frac"] is not None), key=lambda r: -r["osc_frac"])
    if osc:
        out += ["Most oscillating layers: " + ", ".join(f"`{r['layer']}` {_pct(r['osc_frac'])}" for r in osc[:5]) +
                f"; frozen weights at most {_pct(max(r['frozen_frac'] or 0 for r in osc))}.", ""]
    drift = sorted((r for r in rows if r["w_scale_drift"] is not None), key=lambda r: -abs(r["w_scale_drift"]))
    if drift:
        out += ["Largest weight-scale drift since calibration: " +
                ", ".join(f"`{r['layer']}` {100 * r['w_scale_drift']:+.1f}%" for r in drift[:5]) + ".", ""]
    shifts = [r for r in run.layers if r["stage"] == "epoch" and r["bn_mean_shift"] is not None]
    if shifts:
        top = max(shifts, key=lambda r: r["bn_mean_shift"])
        out += [f"Largest BN mean shift at a re-estimation: {top['bn_mean_shift']:.3f} std (`{top['layer']}`, epoch "
                f"{top['epoch']}).", ""]
    return out


def _i(v) -> str:
    return "?" if v is None else str(int(v))
