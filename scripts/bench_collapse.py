"""Collapse benchmark: find a setting where plain LSQ's validation mAP peaks and then falls, and show the cures.

The failure this plugin targets (seed 000): low-bit QAT whose validation mAP50-95 peaks early and then falls. On the
synthetic shapes dataset, on CPU:

``--search [NAME ...]``  trains plain LSQ (``qat=lsq``: no stabilizer, BN statistics left stale, the collapse guard
    only reporting) under each candidate setting of :data:`SETTINGS` (all of them, in order, if no name is given) and
    prints per setting: peak mAP50-95 and its epoch, final mAP50-95, drop of the final below the peak (% of the peak),
    the worst dip below the best so far, and whether it collapsed (:func:`collapse_stats`).
``--compare NAME``  trains, under that setting, the float model (the control: does the setting make float training
    fall too?), plain LSQ, each remedy recipe (wacv24, icml22, scalegrad, and stable, the default recipe's
    stabilizers; each with the guard only reporting) and the default recipe (``qat.yaml``) with its collapse guard
    acting (``restore``), and prints a summary and per-epoch tables of mAP50-95, the oscillating
    fraction (``qat/osc_frac``) and the weight-scale drift (mean over layers of qat_layers.csv's ``w_scale_drift``,
    the relative change of the mean learned step size since calibration). ``--compare auto`` (after ``--search`` in
    the same command) compares the setting with the largest collapse.

A setting is a dict of Ultralytics training arguments and ``qat.*`` keys that describe the *problem* (model, bit
widths, granularity, optimizer, learning rate, epochs), never a stabilizer: ``--compare`` lays it over each recipe.
``model: "fp"`` fine-tunes a trained float yolov8n: ``--fp`` or, without it, one trained here once (yolov8n.yaml,
60 epochs) and cached in the work folder. ``yolo-qat demo`` caches such a model on the same data (shapes 128 train /
32 val at 128 px, seed 0): ``<weights_dir>/ultralytics-qat/yolov8n-shapes128-128px-e60.pt`` with
``<datasets_dir>/shapes-demo-128/data.yaml`` (``yolo settings`` shows both dirs). Every run shares :data:`COMMON` (one
optimizer step per batch of 16); a finished run with the same arguments in the work folder is reused, not retrained
(``--rerun`` retrains), so ``--compare`` reuses the search's LSQ run. Each candidate takes 1-3 minutes on 2 cores.

    python scripts/bench_collapse.py --list
    python scripts/bench_collapse.py --search --work runs/bench_collapse --json collapse_search.json
    python scripts/bench_collapse.py --search ft-w3a3-sgd ft-w4a4-adamw --compare auto \\
        --fp <weights_dir>/ultralytics-qat/yolov8n-shapes128-128px-e60.pt \\
        --data <datasets_dir>/shapes-demo-128/data.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipes import MAP, results, train

SHAPES = {"n_train": 128, "n_val": 32, "imgsz": 128}  # the quick profile's dataset (and the demo float model's)
COMMON = {"imgsz": 128, "batch": 16, "nbs": 16, "deterministic": True}  # nbs = batch: one optimizer step per batch
FP_EPOCHS = 60
BITS = {2: {"qat.weight.bits": 2, "qat.activation.bits": 2}, 3: {"qat.weight.bits": 3, "qat.activation.bits": 3},
        4: {"qat.weight.bits": 4, "qat.activation.bits": 4}, 16: {"qat.weight.bits": 4, "qat.activation.bits": None}}

# Candidate settings, in search order (most likely to collapse first). Ultralytics' own values apply to every key not
# named here (warm-up 3 epochs with warmup_bias_lr 0.1, mosaic 1.0 with close_mosaic 10, linear decay to lrf 0.01).
SETTINGS: dict[str, dict] = {
    # fine-tunes of the float model with SGD / AdamW at rates 2-8x above Ultralytics' auto choice for it (AdamW 1.25e-3)
    "ft-w3a3-sgd": dict(model="fp", epochs=15, optimizer="SGD", lr0=1e-2, **BITS[3]),
    "ft-w3a3-adamw": dict(model="fp", epochs=15, optimizer="AdamW", lr0=3e-3, **BITS[3]),
    "ft-w2a2-sgd": dict(model="fp", epochs=15, optimizer="SGD", lr0=1e-2, **BITS[2]),
    "ft-w2a2-adamw": dict(model="fp", epochs=15, optimizer="AdamW", lr0=3e-3, **BITS[2]),
    # one learned scale per weight tensor: outlier channels stretch the 3-bit grid of all others
    "ft-w3a3-tensor-sgd": dict(model="fp", epochs=15, optimizer="SGD", lr0=1e-2, **BITS[3],
                               **{"qat.weight.granularity": "tensor"}),
    # seed 000's setting: W4A16 QAT from scratch with Ultralytics' default hyperparameters
    "scratch-w4a16": dict(model="yolov8n.yaml", epochs=30, **BITS[16]),
    # W4A4 starts near the float model: room for a peak before the high rate (reached after warm-up) hurts
    "ft-w4a4-adamw": dict(model="fp", epochs=15, optimizer="AdamW", lr0=3e-3, **BITS[4]),
    # AdamW at 8x the auto rate: every step moves a weight by ~1e-2, a large part of a 3-bit step
    "ft-w3a3-adamw-hi": dict(model="fp", epochs=15, optimizer="AdamW", lr0=1e-2, **BITS[3]),
    # seed 000's widths as a fine-tune, at twice the SGD rate
    "ft-w4a16-sgd": dict(model="fp", epochs=15, optimizer="SGD", lr0=2e-2, **BITS[16]),
    # a long run at a high constant rate (lrf=1: no decay that could hide a collapse at the end)
    "ft-w3a3-sgd-const": dict(model="fp", epochs=20, optimizer="SGD", lr0=1e-2, lrf=1.0, **BITS[3]),
    "ft-w3a3-adamw-hi-const": dict(model="fp", epochs=20, optimizer="AdamW", lr0=1e-2, lrf=1.0, **BITS[3]),
    "ft-w4a4-adamw-const": dict(model="fp", epochs=20, optimizer="AdamW", lr0=3e-3, lrf=1.0, **BITS[4]),
    # long runs at a high constant rate
    "ft-w4a4-adamw-long": dict(model="fp", epochs=40, optimizer="AdamW", lr0=3e-3, lrf=1.0, **BITS[4]),
    "ft-w3a3-sgd-long": dict(model="fp", epochs=40, optimizer="SGD", lr0=1e-2, lrf=1.0, **BITS[3]),
    # learned step sizes at 10x the weights' rate: the scale drift and scale oscillation of WACV'24
    "ft-w4a4-adamw-scale10": dict(model="fp", epochs=15, optimizer="AdamW", lr0=3e-3, **BITS[4],
                                  **{"qat.optim.scale_lr_mult": 10.0}),
}

# --compare: run name -> recipe keys laid under the setting. Every run but "default" only reports a collapse.
# "float" (None) is the float model trained by plain Ultralytics with the setting's arguments, its qat.* keys
# dropped: it tells a collapse of QAT from one the hyperparameters cause in float too.
WARN = {"qat.collapse.action": "warn"}
COMPARE = {
    "float": None,
    "lsq": {"qat": "lsq", **WARN},
    "wacv24": {"qat": "wacv24", **WARN},
    "icml22": {"qat": "icml22", **WARN},
    "scalegrad": {"qat": "scalegrad", **WARN},
    "stable": {"qat": "stable", **WARN},
    "default": {"qat": "qat"},
}
LABELS = {"float": "float (same args)", "stable": "stable (guard: warn)",
          "default": "default qat.yaml (guard: restore)"}


def collapse_stats(curve: list[float], drop: float = 0.10, min_peak: float = 0.05) -> dict:
    """Peak-then-drop of a validation mAP curve (one value per epoch).

    ``collapsed`` when the final value is at least ``drop`` (a fraction) of the peak below the peak and the peak is at
    least ``min_peak`` (a run that never learned cannot collapse). ``worst_drop`` is the largest fall below the best
    value so far at any epoch, once that best is at least ``min_peak`` (what the collapse guard watches): a dip the
    run recovered from shows there, not in ``drop``. Drops are fractions of the peak (or best so far); NaN entries
    (no validation) are ignored.
    """
    vals = [(i, v) for i, v in enumerate(curve) if v is not None and math.isfinite(v)]
    if not vals:
        return {"peak": None, "peak_epoch": None, "final": None, "drop": None, "worst_drop": None, "collapsed": False}
    peak_i, peak = max(vals, key=lambda x: (x[1], -x[0]))  # the first epoch that reaches the peak
    final = vals[-1][1]
    d = (peak - final) / peak if peak > 0 else 0.0
    best, worst = None, 0.0
    for _, v in vals:
        best = v if best is None else max(best, v)
        if best >= min_peak:
            worst = max(worst, (best - v) / best)
    return {"peak": peak, "peak_epoch": peak_i + 1, "final": final, "drop": d, "worst_drop": worst,
            "collapsed": peak >= min_peak and d >= drop - 1e-12}


def run_args(setting: dict, recipe: dict | None, fp: str | None, data: str, seed: int) -> dict:
    """Training arguments of one run: COMMON, then the recipe, then the setting (the problem wins).

    ``recipe=None`` is the float run: no ``qat`` key at all.
    """
    args = {**COMMON, "data": data, "seed": seed, **(recipe or {}), **setting}
    if recipe is None:
        args = {k: v for k, v in args.items() if k != "qat" and not k.startswith("qat.")}
    if args["model"] == "fp":
        if fp is None:
            raise ValueError("a fine-tune setting needs the float model")
        args["model"] = fp
    return args


def _jsonable(args: dict) -> dict:
    return json.loads(json.dumps(args, default=str))


def read_curves(save_dir: Path) -> dict:
    """Per-epoch mAP50-95, oscillating fraction, weight-scale drift; guard events; mAP after the post-QAT stages."""
    from ultralytics_qat.report.layers import read_layers_csv
    from ultralytics_qat.report.runfolder import read_events, read_post_qat

    rows = results(save_dir)
    drift = {}
    for r in read_layers_csv(save_dir / "qat_layers.csv"):
        if r["stage"] == "epoch" and r["w_scale_drift"] is not None:
            drift.setdefault(r["epoch"], []).append(r["w_scale_drift"])
    post = read_post_qat(save_dir)
    return {
        "map": [r.get(MAP, float("nan")) for r in rows],
        "osc": [r.get("qat/osc_frac") for r in rows],
        "w_scale_mean": [r.get("qat/weight_scale_mean") for r in rows],
        "w_scale_drift": [sum(v) / len(v) if (v := drift.get(int(r["epoch"]))) else None for r in rows],
        "events": [{"epoch": e["epoch"], "action": e["action"]} for e in read_events(save_dir)],
        "post_qat_map": (post or {}).get("metrics", {}).get(MAP),
    }


def float_model(work: Path, data: str, seed: int, rerun: bool) -> str:
    """A float yolov8n trained here on the shapes set (cached in the work folder)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    args = {**COMMON, "data": data, "seed": seed, "model": "yolov8n.yaml", "epochs": FP_EPOCHS}
    save_dir, _ = train(f"fp-s{seed}", work, DetectionTrainer, rerun, **args)
    return str(save_dir / "weights" / "best.pt")


def one_run(tag: str, setting: dict, recipe: dict | None, ctx: dict) -> dict:
    from ultralytics.models.yolo.detect import DetectionTrainer

    from ultralytics_qat import QATDetectionTrainer

    fp = ctx["fp"]() if setting["model"] == "fp" else None
    args = run_args(setting, recipe, fp, ctx["data"], ctx["seed"])
    trainer = DetectionTrainer if recipe is None else QATDetectionTrainer
    save_dir, wall = train(tag, ctx["work"], trainer, ctx["rerun"], **args)
    curves = read_curves(save_dir)
    return {"run": tag, "save_dir": str(save_dir), "args": _jsonable(args), "wall_s": wall, **curves,
            **collapse_stats(curves["map"], ctx["drop"], ctx["min_peak"])}


def search(names: list[str], ctx: dict) -> list[dict]:
    out = []
    for name in names:
        r = one_run(f"{name}-lsq-s{ctx['seed']}", setting(name, ctx), COMPARE["lsq"], ctx)
        out.append({"setting": name, **r})
        print(f"bench_collapse: {name}: " + _summary_cells(r))
    return out


def compare(name: str, ctx: dict, recipes: list[str]) -> list[dict]:
    return [{"recipe": LABELS.get(k, k), **one_run(f"{name}-{k}-s{ctx['seed']}", setting(name, ctx), COMPARE[k], ctx)}
            for k in recipes]


def setting(name: str, ctx: dict) -> dict:
    """A setting of :data:`SETTINGS`, with ``--epochs`` applied."""
    s = dict(SETTINGS[name])
    if ctx.get("epochs"):
        s["epochs"] = ctx["epochs"]
    return s


def pick_collapsed(rows: list[dict]) -> str | None:
    """The searched setting with the largest collapse (final drop), or None if none collapsed."""
    hits = [r for r in rows if r["collapsed"]]
    return max(hits, key=lambda r: r["drop"])["setting"] if hits else None


def _f(v, nd=3, pct=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.{nd}f}"


def _summary_cells(r: dict) -> str:
    return (f"peak {_f(r['peak'])} at epoch {r['peak_epoch']}, final {_f(r['final'])}, drop {_f(r['drop'], pct=True)}%"
            f" (worst {_f(r['worst_drop'], pct=True)}%), collapsed {'yes' if r['collapsed'] else 'no'}")


def _last(values: list | None):
    return values[-1] if values else None


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(names: list[str]) -> list[str]:
    return [_row(names), "|---" * len(names) + "|"]


def search_table(rows: list[dict]) -> str:
    lines = _header(["setting", "epochs", "peak mAP50-95", "peak epoch", "final", "drop % of peak", "worst dip %",
                     "collapsed", "osc. frac (final)", "wall s"])
    for r in rows:
        lines.append(_row([r["setting"], len(r["map"]), _f(r["peak"]), r["peak_epoch"], _f(r["final"]),
                           _f(r["drop"], pct=True), _f(r["worst_drop"], pct=True), "yes" if r["collapsed"] else "no",
                           _f(_last(r["osc"]), 4), f"{r['wall_s']:.0f}"]))
    return "\n".join(lines)


def compare_tables(rows: list[dict]) -> str:
    lines = _header(["run", "peak mAP50-95", "peak epoch", "final", "drop % of peak", "worst dip %", "collapsed",
                     "guard events", "after post-QAT", "osc. frac (final)", "w-scale drift (final)", "wall s"])
    for r in rows:
        events = ", ".join(f"{e['action']}@{e['epoch']}" for e in r["events"]) or "-"
        lines.append(_row([r["recipe"], _f(r["peak"]), r["peak_epoch"], _f(r["final"]), _f(r["drop"], pct=True),
                           _f(r["worst_drop"], pct=True), "yes" if r["collapsed"] else "no", events, _f(r["post_qat_map"]), _f(_last(r["osc"]), 4),
                           _f(_last(r["w_scale_drift"]), 4), f"{r['wall_s']:.0f}"]))
    n = max(len(r["map"]) for r in rows)
    for key, title, nd in (("map", "mAP50-95", 3), ("osc", "oscillating fraction", 4),
                           ("w_scale_drift", "weight-scale drift since calibration", 4)):
        lines += ["", f"{title} per epoch:", "", *_header(["epoch", *(r["recipe"] for r in rows)])]
        for e in range(n):
            lines.append(_row([e + 1, *(_f(r[key][e] if e < len(r[key]) else None, nd) for r in rows)]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the candidate settings and exit")
    p.add_argument("--search", nargs="*", metavar="NAME", default=None,
                   help="train plain LSQ under these settings (none named: all, in order)")
    p.add_argument("--compare", metavar="NAME", default=None,
                   help="a setting to run every recipe on; 'auto' = the largest collapse of this command's --search")
    p.add_argument("--recipes", nargs="+", default=list(COMPARE), metavar="RUN",
                   help=f"--compare runs, a subset of {list(COMPARE)}")
    p.add_argument("--fp", type=Path, default=None, help="trained float yolov8n .pt for fine-tune settings")
    p.add_argument("--data", default=None, help="data yaml (default: the shapes set 128/32 at 128 in the work folder)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_collapse"), help="work folder (runs, cached models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop", type=float, default=0.10, help="collapse: final at least this fraction below the peak")
    p.add_argument("--min-peak", type=float, default=0.05,
                   help="collapse: a lower peak does not count (32 val images: mAP moves by ~0.01 between epochs)")
    p.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (a check that it runs)")
    p.add_argument("--rerun", action="store_true", help="retrain runs already finished in the work folder")
    p.add_argument("--json", type=Path, default=None, help="write settings, rows and curves as JSON")
    a = p.parse_args(argv)
    if a.search is not None:
        bad = [n for n in a.search if n not in SETTINGS]
        if bad:
            p.error(f"unknown setting(s) {bad}; --list shows {list(SETTINGS)}")
        a.search = a.search or list(SETTINGS)
    if a.compare is not None and a.compare != "auto" and a.compare not in SETTINGS:
        p.error(f"unknown setting {a.compare!r}; --list shows {list(SETTINGS)}")
    if a.compare == "auto" and a.search is None:
        p.error("--compare auto picks from this command's --search; add --search or name a setting")
    bad = [r for r in a.recipes if r not in COMPARE]
    if bad:
        p.error(f"unknown --recipes {bad}; choose from {list(COMPARE)}")
    if not (a.list or a.search is not None or a.compare is not None):
        p.error("nothing to do: give --list, --search [NAME ...] or --compare NAME")
    if not 0 < a.drop < 1:
        p.error(f"--drop must be a fraction in (0, 1), got {a.drop}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for name, s in SETTINGS.items():
            print(f"{name}: {s}")
        return 0

    from ultralytics_qat.utils import make_hermetic

    make_hermetic()
    from ultralytics_qat.data import make_shapes_dataset

    work = a.work.resolve()
    data = a.data or str(make_shapes_dataset(work / "shapes", SHAPES["n_train"], SHAPES["n_val"], SHAPES["imgsz"],
                                             seed=0))
    fp_cache: list[str] = []

    def fp() -> str:  # trained (or found) only when a fine-tune setting needs it
        if not fp_cache:
            fp_cache.append(str(a.fp.resolve()) if a.fp else float_model(work, data, a.seed, a.rerun))
        return fp_cache[0]

    ctx = {"work": work, "data": data, "seed": a.seed, "fp": fp, "rerun": a.rerun, "drop": a.drop,
           "min_peak": a.min_peak, "epochs": a.epochs}
    out: dict = {"settings": SETTINGS, "common": COMMON, "data": data, "seed": a.seed, "drop": a.drop,
                 "min_peak": a.min_peak}
    t0 = time.perf_counter()
    if a.search is not None:
        out["search"] = search(a.search, ctx)
        print(f"\nsearch: plain LSQ (qat=lsq), data {data}, seed {a.seed}, collapsed = final >= {100 * a.drop:.0f}% "
              f"below the peak (peak >= {a.min_peak})")
        print(search_table(out["search"]))
    name = a.compare
    if name == "auto":
        name = pick_collapsed(out["search"])
        if name is None:
            print("\ncompare auto: no searched setting collapsed, nothing to compare")
    if name is not None:
        out["compare"] = {"setting": name, "rows": compare(name, ctx, a.recipes)}
        print(f"\ncompare: setting {name} = {setting(name, ctx)}, data {data}, seed {a.seed}")
        print(compare_tables(out["compare"]["rows"]))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, work {work}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
