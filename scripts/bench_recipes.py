"""Recipe benchmark: does each QAT recipe keep the FP accuracy at W4A4 and W3A3, and does plain QAT collapse?

On the synthetic shapes dataset, on CPU:
1. train a float yolov8n from its yaml (the FP reference);
2. fine-tune it with each recipe at W4A4 and W3A3 (the plugin's fine-tune defaults: Ultralytics' own choice);
3. PTQ: calibrate the scales and validate, no training;
4. scratch W4A16 QAT from the yaml with Ultralytics' default hyperparameters (the seed's failing setting);
5. the fair control "fp+ft": the float model fine-tuned (plain Ultralytics) for the same epochs with the same arguments
   as the QAT fine-tunes, so extra epochs alone do not count as QAT keeping accuracy.
It prints one table: final mAP50-95 (the model the run ends with: after QC when the recipe has it), the last and the
best epoch's, final as % of the fair control (fp+ft, final) and as % of the start FP model (its best epoch, the only
reference of BENCHMARKS.md's older tables), epoch of the best, a collapse flag (last epoch below 90% of the best), the
fraction of oscillating weights at the end, training seconds per epoch (results.csv's clock: the loop and its
validations, so distillation's teacher forward shows there), and wall time. The fine-tune arguments are the
plugin's ``qat.finetune`` defaults, passed explicitly so that the float control gets the very same ones.

    python scripts/bench_recipes.py --quick            # < 10 min on 2 cores
    python scripts/bench_recipes.py                    # the full run (BENCHMARKS.md)
    python scripts/bench_recipes.py --seeds 0 1 2      # seed spread
    python scripts/bench_recipes.py --smoke --recipes lsq stable --bits 4   # does the script run (~3 min)
    python scripts/bench_recipes.py --seeds 0 1 2 --recipes lsq default default+distill default+mixed --no-scratch
    python scripts/bench_recipes.py --recipes default --bits 4 --no-scratch --stop-after 1 --train-args mosaic=0

A recipe is a bundled recipe name, or ``default`` (the bundled ``qat.yaml``), optionally with ``+distill``
(``qat.distill.weight=1``: the float start model as teacher; ``+distill=0.5`` sets the weight, ``+distill=1:both``
also the loss), ``+KEY=VALUE`` (any qat key, e.g. ``+optim.scale_lr_mult=0.1``) and/or ``+mixed``
(``qat.budget``: per-layer weight bits from a ``yolo-qat sensitivity`` measurement of the seed's float model, at the
average weight bits of the uniform run, so it is the same size). ``--train-args KEY=VALUE ...`` changes Ultralytics'
arguments of every fine-tune, the fair control's and the QAT runs' alike (their runs and rows are named
``...@KEY=VALUE``); ``--stop-after N`` stops every fine-tune after epoch N of its schedule (the learning rates of a
full run; for first-epoch studies). A finished run in ``--work`` is reused, so an interrupted benchmark resumes where
it stopped, and new recipes can be added to a finished one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = "metrics/mAP50-95(B)"

PROFILES = {
    "smoke": dict(n_train=32, n_val=16, imgsz=64, fp_epochs=3, qat_epochs=2, scratch_epochs=2, batch=16),
    "quick": dict(n_train=128, n_val=32, imgsz=128, fp_epochs=60, qat_epochs=5, scratch_epochs=30, batch=16),
    "full": dict(n_train=256, n_val=64, imgsz=160, fp_epochs=100, qat_epochs=15, scratch_epochs=60, batch=16),
}
RECIPES = ["lsq", "wacv24", "icml22", "scalegrad", "stable"]


def results(save_dir: Path) -> list[dict]:
    """Rows of an Ultralytics results.csv, numbers parsed."""
    with open(save_dir / "results.csv") as f:
        return [{k.strip(): float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def post_qat_map(save_dir: Path) -> float | None:
    """mAP50-95 of the model after the post-QAT stages (QC), when the run had them."""
    from ultralytics_qat.report.runfolder import read_post_qat

    post = read_post_qat(save_dir)
    return (post or {}).get("metrics", {}).get(MAP)


def summarize(name: str, save_dir: Path, fp_map: float | None, wall: float, control: float | None = None) -> dict:
    """One table row. ``final`` is the model the run ends with: after the post-QAT stages when it had them."""
    rows = results(save_dir)
    maps = [r.get(MAP, 0.0) for r in rows]
    post = post_qat_map(save_dir)
    best = max(maps)  # over the training epochs
    final = post if post is not None else maps[-1]
    return {
        "run": name,
        "final": final,
        "last_epoch": maps[-1],
        "best": best,
        "retained": 100 * final / fp_map if fp_map else None,
        "fair": 100 * final / control if control else None,
        "best_epoch": maps.index(best) + 1,
        "epochs": len(maps),
        "collapse": maps[-1] < 0.9 * best,
        "osc": rows[-1].get("qat/osc_frac"),
        "curve": maps,
        "epoch_s": rows[-1]["time"] / len(rows),  # results.csv's clock: the loop with its validations, not setup
        "wall_s": wall,
    }


def run_key(kw: dict) -> str:
    """What a finished run is reused by: its arguments and, for a QAT run, the recipe they resolve to (a bundled
    recipe such as ``qat.yaml`` can change between commits under the same name)."""
    from ultralytics_qat.config import QATConfig

    key = {k: str(v) for k, v in sorted(kw.items())}
    if "qat" in kw:
        overrides = {k[len("qat."):]: v for k, v in kw.items() if k.startswith("qat.")}
        key["qat resolved"] = json.dumps(QATConfig.load(kw["qat"], overrides).to_dict(), sort_keys=True, default=str)
    return json.dumps(key)


def train(tag: str, work: Path, trainer=None, rerun: bool = False, stop_after: int | None = None, **kw
          ) -> tuple[Path, float]:
    """Train one run into ``work/runs/tag``; a run finished there before with the same ``run_key`` is reused.
    ``stop_after``: stop after that epoch of the ``epochs`` schedule."""
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils

    save_dir = work / "runs" / tag  # work is absolute: Ultralytics puts a relative project under runs_dir
    done = save_dir / "bench_done.json"
    key = run_key(kw if stop_after is None else {**kw, "stop after epoch": stop_after})
    threads = torch_utils.NUM_THREADS  # another thread count sums in another order and ends elsewhere
    record = json.loads(done.read_text()) if done.is_file() else {}
    if (not rerun and record.get("args") == key and record.get("threads", threads) == threads
            and (save_dir / "results.csv").is_file()):  # records older than the thread field: the default count
        print(f"{Path(sys.argv[0]).name}: reusing {save_dir} (same arguments, recipe and threads)")
        return save_dir, record["wall_s"]
    model = YOLO(kw.pop("model"))
    if stop_after is not None:
        model.add_callback("on_fit_epoch_end", lambda tr: setattr(tr, "stop", tr.stop or tr.epoch + 1 >= stop_after))
    t = time.perf_counter()
    model.train(trainer=trainer, project=str(work / "runs"), name=tag, exist_ok=True, plots=False, workers=0,
                verbose=False, **kw)
    wall = time.perf_counter() - t
    save_dir = Path(model.trainer.save_dir)
    (save_dir / "bench_done.json").write_text(json.dumps({"args": key, "threads": threads, "wall_s": wall}))
    return save_dir, wall


def parse_recipe(spec: str) -> tuple[str, dict, bool]:
    """``stable``, ``default+distill=0.5:both+mixed``, ``default+optim.scale_lr_mult=0.1`` -> (qat= value, extra
    ``qat.*`` arguments, mixed)."""
    import yaml

    from ultralytics_qat.config import QATConfig, bundled_recipes
    from ultralytics_qat.errors import QATConfigError

    base, *mods = spec.split("+")
    qat = "qat.yaml" if base == "default" else base
    extra, mixed, ok = {}, False, base == "default" or base in bundled_recipes()
    for mod in mods:
        name, _, value = mod.partition("=")
        if name == "mixed" and not value:
            mixed = True
        elif name == "distill":
            weight, _, loss = value.partition(":")
            try:
                extra["qat.distill.weight"] = float(weight) if weight else 1.0
            except ValueError:
                ok = False
            if loss:
                extra["qat.distill.loss"] = loss
                ok = ok and loss in ("head", "feat", "both")
        elif "." in name and value and ok:  # any qat key, e.g. optim.scale_lr_mult=0.1: checked by the config
            parsed = yaml.safe_load(value)
            try:
                QATConfig.load(qat, {name: parsed})
                extra[f"qat.{name}"] = parsed
            except QATConfigError:
                ok = False
        else:
            ok = False
    if not ok or extra.get("qat.distill.weight", 1.0) <= 0:
        raise SystemExit(f"recipe '{spec}': use a bundled recipe ({', '.join(bundled_recipes())}) or 'default', "
                         "optionally with +distill (weight 1, loss head), +distill=W, +distill=W:LOSS "
                         "(head, feat or both), +mixed and/or +KEY=VALUE for any qat key (e.g. +optim.scale_lr_mult=0.1)")
    return qat, extra, mixed


BENCH_ARGS = {"model", "data", "epochs", "imgsz", "batch", "nbs", "seed", "deterministic", "project", "name",
              "exist_ok", "plots", "workers", "verbose", "resume", "qat"}


def parse_train_args(items: list[str]) -> dict:
    """``--train-args mosaic=0 optimizer=AdamW`` -> {"mosaic": 0, "optimizer": "AdamW"}: Ultralytics training
    arguments (checked against its defaults) that the benchmark does not set itself."""
    import yaml
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_CFG_DICT or key in BENCH_ARGS:
            why = (f"'{key}' is set by the benchmark itself" if key in BENCH_ARGS else
                   f"'{key}' is not an Ultralytics training argument" if sep else "write KEY=VALUE")
            raise SystemExit(f"--train-args {item}: {why}; use Ultralytics arguments such as mosaic=0 lr0=0.0005 "
                             "(qat keys go in --recipes, e.g. default+calibration.batches=32)")
        out[key] = yaml.safe_load(value)
    return out


def args_suffix(train_args: dict, stop_after: int | None) -> str:
    """What a fine-tune's run and row name add for --train-args / --stop-after: ``@mosaic=0,stop1`` (or nothing)."""
    parts = [f"{k}={v}" for k, v in train_args.items()] + ([f"stop{stop_after}"] if stop_after else [])
    return "@" + ",".join(parts) if parts else ""


def uniform_avg_bits(fp_weights: Path, qat: str, bits: int) -> float:
    """Average weight bits of the uniform W``bits`` model (first/last layers at their own widths): the mixed budget."""
    from ultralytics import YOLO

    from ultralytics_qat.config import QATConfig
    from ultralytics_qat.quant.budget import average_weight_bits
    from ultralytics_qat.quant.inject import plan_layers

    model = YOLO(str(fp_weights)).model
    plans = plan_layers(model, QATConfig.load(qat, {"weight.bits": bits}))
    modules = dict(model.named_modules())
    return average_weight_bits({p.name: p.weight_bits for p in plans},
                               {p.name: modules[p.name].weight.numel() for p in plans})


def sensitivity(fp_weights: Path, data: str, prof: dict, work: Path, tag: str) -> Path:
    """``yolo-qat sensitivity`` of the float model (widths 2, 3, 4, 6) on training images (the table's mAP is on
    the val split, so the layer choice never sees it), reused when already measured."""
    from ultralytics import YOLO

    from ultralytics_qat.quant.sensitivity import run_sensitivity

    out = work / "runs" / tag / "sensitivity.json"
    if not out.is_file():
        out = run_sensitivity(YOLO(str(fp_weights)).model, data, bits=(2, 3, 4, 6), batches=4, split="train",
                              imgsz=prof["imgsz"], batch=prof["batch"], project=str(work / "runs"), name=tag,
                              exist_ok=True)["json"]
    return out


def ptq(fp_weights: Path, data: str, bits: int, prof: dict, work: Path) -> dict:
    """Calibrate only: build the QAT model from the FP weights, calibrate, validate (no training)."""
    from ultralytics_qat.engine.ptq import ptq_metrics

    t = time.perf_counter()
    m = ptq_metrics(fp_weights, dict(data=data, imgsz=prof["imgsz"], batch=prof["batch"], workers=0, plots=False,
                                     project=str(work / "runs"), name=f"ptq-w{bits}", exist_ok=True,
                                     **{"qat.weight.bits": bits, "qat.activation.bits": bits})).get(MAP, 0.0)
    return {"run": f"ptq w{bits}a{bits}", "final": m, "best": m, "best_epoch": 0, "epochs": 0, "collapse": False,
            "osc": None, "curve": [m], "wall_s": time.perf_counter() - t}


def run_seed(seed: int, prof: dict, work: Path, recipes: list[str], bits_list: list[int], scratch: bool = True,
             train_args: dict | None = None, stop_after: int | None = None) -> list[dict]:
    from ultralytics.models.yolo.detect import DetectionTrainer

    from ultralytics_qat import QATDetectionTrainer
    from ultralytics_qat.data import make_shapes_dataset

    data = str(make_shapes_dataset(work / "shapes", prof["n_train"], prof["n_val"], prof["imgsz"], seed=0))
    # nbs = batch: one optimizer step per batch (Ultralytics would otherwise accumulate 64 images per step)
    common = dict(data=data, imgsz=prof["imgsz"], batch=prof["batch"], nbs=prof["batch"], seed=seed, deterministic=True)
    out = []
    fp_dir, wall = train(f"fp-s{seed}", work, DetectionTrainer, model="yolov8n.yaml", epochs=prof["fp_epochs"], **common)
    fp = summarize("fp", fp_dir, None, wall)
    fp_map = fp["best"]
    fp["retained"] = 100.0
    out.append(fp)
    fp_weights = fp_dir / "weights" / "best.pt"
    finetune = {**finetune_args(), **(train_args or {}), **common}
    at = args_suffix(train_args or {}, stop_after)
    d, wall = train(f"fp-ft{at}-s{seed}", work, DetectionTrainer, stop_after=stop_after, model=str(fp_weights),
                    epochs=prof["qat_epochs"], **finetune)
    ctrl = summarize(f"fp+ft{at} (fair control)", d, fp_map, wall)
    control = ctrl["final"]
    ctrl["fair"] = 100.0
    out.append(ctrl)
    for bits in bits_list:
        out.append(ptq(fp_weights, data, bits, prof, work))
        out[-1]["retained"] = 100 * out[-1]["final"] / fp_map if fp_map else None
        out[-1]["fair"] = 100 * out[-1]["final"] / control if control else None
        for recipe in recipes:
            qat, extra, mixed = parse_recipe(recipe)
            if mixed:
                extra["qat.budget.avg_weight_bits"] = round(uniform_avg_bits(fp_weights, qat, bits), 6)
                extra["qat.budget.sensitivity"] = str(sensitivity(fp_weights, data, prof, work, f"sens-s{seed}"))
            d, wall = train(f"{recipe}{at}-w{bits}-s{seed}", work, QATDetectionTrainer, stop_after=stop_after,
                            model=str(fp_weights), epochs=prof["qat_epochs"], qat=qat, **finetune,
                            **{"qat.weight.bits": bits, "qat.activation.bits": bits}, **extra)
            width = f"w{bits}" if not mixed else f"w{extra['qat.budget.avg_weight_bits']:.2f}"
            name = f"{recipe}{at} {width}a{bits}"
            out.append(summarize(name, d, fp_map, wall, control))
    if not scratch:
        return out
    d, wall = train(f"scratch-w4a16-s{seed}", work, QATDetectionTrainer, model="yolov8n.yaml",
                    epochs=prof["scratch_epochs"], qat="lsq", **common,
                    **{"qat.weight.bits": 4, "qat.activation.bits": None})
    out.append(summarize("scratch w4a16 (defaults)", d, fp_map, wall))
    return out


def finetune_args() -> dict:
    """The plugin's QAT fine-tune defaults (``qat.finetune`` of the default recipe), as explicit training arguments."""
    from ultralytics_qat.config import QATConfig

    return {k: v for k, v in vars(QATConfig.load().finetune).items() if v is not None}


def epoch1(row: dict, fp_map: float) -> float | None:
    """A QAT fine-tune's first validation as % of the start FP model (issue 11's first-epoch target)."""
    if row["run"] == "fp" or row["run"].startswith(("fp+ft", "ptq", "scratch")) or not fp_map:
        return None
    return 100 * row["curve"][0] / fp_map


def table(rows_by_seed: dict[int, list[dict]]) -> str:
    seeds = sorted(rows_by_seed)
    lines = ["| run | final mAP50-95 | last epoch | best epoch's | % of fp+ft (fair) | % of start FP | epoch 1 % of "
             "start FP | best epoch | collapse | osc. frac | s per epoch | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows_by_seed[seeds[0]]):
        runs = [{**rows_by_seed[s][i], "e1": epoch1(rows_by_seed[s][i], rows_by_seed[s][0]["best"])} for s in seeds]

        def fmt(key, scale=1.0, nd=3):
            vals = [x[key] for x in runs if x.get(key) is not None]
            if not vals:
                return "-"
            m = statistics.mean(vals) * scale
            return f"{m:.{nd}f}" + (f" ± {statistics.stdev(vals) * scale:.{nd}f}" if len(vals) > 1 else "")
        collapse = sum(x["collapse"] for x in runs)
        lines.append(f"| {r['run']} | {fmt('final')} | {fmt('last_epoch')} | {fmt('best')} | {fmt('fair', nd=1)} | "
                     f"{fmt('retained', nd=1)} | {fmt('e1', nd=1)} | "
                     f"{'/'.join(str(x['best_epoch']) for x in runs)} of {r['epochs']} | "
                     f"{'yes' if collapse else 'no'}{f' ({collapse}/{len(runs)})' if len(runs) > 1 and collapse else ''} | "
                     f"{fmt('osc', nd=4)} | {fmt('epoch_s', nd=1)} | {fmt('wall_s', nd=0)} |")
    return "\n".join(lines)


def _recipe_and_bits(name: str) -> tuple[str, int]:
    """``default+mixed w4.30a4`` -> (``default+mixed``, 4): the activation bits name the width."""
    recipe, width = name.rsplit(" ", 1)
    return recipe, int(width.rsplit("a", 1)[1])


def _baselines(run: str) -> list[str]:
    """What a row is compared with: ``X@args`` with ``X`` (a stopped run with a run stopped alike), ``X+mod`` with
    ``X`` and default with lsq under the same arguments."""
    recipe, _, args = run.partition("@")
    stop = [p for p in args.split(",") if p.startswith("stop")]
    out = [recipe.rsplit("+", 1)[0]] if "+" in recipe else ["lsq"] if recipe == "default" else []
    out = [b + ("@" + args if args else "") for b in out]
    if args and args != (stop[0] if stop else ""):
        out.append(recipe + ("@" + stop[0] if stop else ""))
    return out


def comparisons(rows_by_seed: dict[int, list[dict]]) -> str:
    """Per seed, in points of the fair control (each run's own): default vs lsq, every ``X+mod`` vs ``X`` and every
    ``X@args`` (other training arguments) vs ``X`` at the same width."""
    seeds = sorted(rows_by_seed)
    fair = {s: {_recipe_and_bits(r["run"]): r["fair"] for r in rows_by_seed[s]
                if r.get("fair") is not None and " w" in r["run"] and not r["run"].startswith(("ptq", "scratch"))}
            for s in seeds}
    pairs = {(a, b, bits) for s in seeds for (a, bits) in fair[s] for b in _baselines(a) if b != a}
    lines = []
    for a, b, bits in sorted(pairs, key=lambda x: (-x[2], x[0])):
        diffs = [fair[s][(a, bits)] - fair[s][(b, bits)] for s in seeds if (a, bits) in fair[s] and (b, bits) in fair[s]]
        if diffs:
            lines.append(f"- {a} vs {b} at A{bits}: {' / '.join(f'{d:+.1f}' for d in diffs)} points of the fair control "
                         f"(mean {statistics.mean(diffs):+.1f}; ahead in {sum(d > 0 for d in diffs)} of {len(diffs)})")
    return "\n".join(lines)


def merge_rows(files: list[dict]) -> dict[int, list[dict]]:
    """Rows of several --json files per seed, each run once (the first file's order, then new runs in file order)."""
    merged: dict[int, list[dict]] = {}
    for rows in files:
        for seed, runs in rows.items():
            have = merged.setdefault(int(seed), [])
            names = {r["run"] for r in have}
            have.extend(r for r in runs if r["run"] not in names)
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small profile, < 10 min on 2 CPU cores")
    p.add_argument("--smoke", action="store_true", help="tiny profile: checks the script runs, numbers mean nothing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write all rows (with mAP curves) as JSON")
    p.add_argument("--no-scratch", action="store_true", help="skip the scratch W4A16 run")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="print the table of --json files (runs of the same work folder merged); train nothing")
    p.add_argument("--train-args", nargs="+", default=[], metavar="KEY=VALUE",
                   help="Ultralytics arguments of every fine-tune (the fair control's too), e.g. mosaic=0 lr0=0.0005")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop every fine-tune after epoch N of its schedule (first-epoch studies)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch CPU threads (default: every core; Ultralytics takes cores - 1, one thread on 2 cores)")
    a = p.parse_args()
    for r in a.recipes:
        parse_recipe(r)
    train_args = parse_train_args(a.train_args)
    if a.stop_after is not None and a.stop_after < 1:
        raise SystemExit(f"--stop-after {a.stop_after}: give an epoch >= 1 (1 = the first epoch only)")
    if a.from_json:
        rows = merge_rows([json.loads(f.read_text()) for f in a.from_json])
        print(table(rows) + "\n\n" + comparisons(rows))
        return

    import tempfile

    from ultralytics_qat.utils import make_hermetic

    import ultralytics.utils.torch_utils as torch_utils

    torch_utils.NUM_THREADS = a.threads  # select_device sets it on every trainer; the thread count changes float
    # summation order, so compare runs made with the same count (BENCHMARKS.md: up to 2 points at epoch 1)
    work = (a.work or Path(tempfile.mkdtemp(prefix="bench_recipes_"))).resolve()
    make_hermetic(work / "cfg")
    prof = PROFILES["smoke" if a.smoke else "quick" if a.quick else "full"]
    t0 = time.perf_counter()
    rows = {}
    for s in a.seeds:
        rows[s] = run_seed(s, prof, work, a.recipes, a.bits, scratch=not a.no_scratch, train_args=train_args,
                           stop_after=a.stop_after)
        if a.json:  # after every seed: an interrupted benchmark keeps what it measured
            a.json.write_text(json.dumps(rows, indent=1))
    print(f"\nshapes {prof['n_train']}/{prof['n_val']} images at {prof['imgsz']}, yolov8n, FP {prof['fp_epochs']} "
          f"epochs, QAT fine-tune {prof['qat_epochs']} epochs "
          f"({' '.join(f'{k}={v}' for k, v in {**finetune_args(), **train_args}.items())}"
          f"{f', stopped after epoch {a.stop_after}' if a.stop_after else ''}),"
          f" seeds {a.seeds}, total {time.perf_counter() - t0:.0f} s")
    print(table(rows) + "\n\n" + comparisons(rows))


if __name__ == "__main__":
    sys.exit(main())
