"""Training overhead of QAT against float training, timed as users run it: the loop and the full epoch, side by side.

Each configuration trains yolov8n from its yaml on the synthetic shapes dataset in its own subprocess (peak RSS is a
per-process high-water mark) with identical Ultralytics arguments and validation every epoch, as a real run does.
Per epoch it records, from Ultralytics callbacks:

- loop: ``on_train_epoch_start`` to the epoch's last ``on_train_batch_end`` (forward, backward, optimizer, EMA);
- full epoch: ``on_train_epoch_start`` to ``on_fit_epoch_end`` (loop + QAT's BN re-estimation + validation +
  checkpoint writing), i.e. what an epoch costs the user;
- BN re-estimation: the time spent in ``reestimate_bn`` (QAT only; part of the full epoch);
- val: ``on_val_start`` to ``on_val_end`` of the epoch's validation (part of the full epoch).

The first two epochs are dropped as warm-up (the CPU kernels compile meanwhile) and the median of the rest reported;
"process" is the whole child process's wall time, dataset building and the final validation included.

Configurations: FP (plain DetectionTrainer), ultralytics-qat W8A8 and W4A4 (QATDetectionTrainer, default recipe),
upstream INT8 QAT (``quantize=8``, nvidia-modelopt with fixed calibrated ranges) when ``nvidia-modelopt`` is
installed (``pip install "ultralytics-qat[bench]"``), and the cost of distillation: W4A4 fine-tunes of a float .pt
(the untrained yaml model saved, since only the arithmetic is timed) without and with ``qat.distill.weight=1``
(one teacher forward without gradient per step).

    python scripts/bench_overhead.py                      # imgsz 320, batch 8, 128 + 32 images, 6 epochs
    python scripts/bench_overhead.py --imgsz 160 --epochs 3 --only fp qat-w4a4
    python scripts/bench_overhead.py --only qat-w4a4-ft qat-w4a4-ft-distill   # what the teacher costs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "fp": {},
    "qat-w8a8": {"qat": "qat.yaml", "qat.weight.bits": 8, "qat.activation.bits": 8},
    "qat-w4a4": {"qat": "qat.yaml"},
    "upstream-int8": {"quantize": 8},
    # distillation's cost: the same fine-tune from a float .pt (a teacher needs one) without and with the teacher
    "qat-w4a4-ft": {"qat": "qat.yaml", "model": "FLOAT_PT"},
    "qat-w4a4-ft-distill": {"qat": "qat.yaml", "model": "FLOAT_PT", "qat.distill.weight": 1.0},
}

CHILD = r"""
import json, resource, statistics, sys, time
t_process = time.perf_counter()
from ultralytics_qat.utils import make_hermetic
make_hermetic(sys.argv[3])
import torch
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics_qat import QATDetectionTrainer
import ultralytics_qat.stabilize.bn as bn_mod

name, spec, base = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[4])
loop, full, bn, val, t = [], [], [], [], {"bn": 0.0}
_reestimate = bn_mod.reestimate_bn
def timed_reestimate(*a, **k):
    t0 = time.perf_counter()
    try:
        return _reestimate(*a, **k)
    finally:
        t["bn"] += time.perf_counter() - t0
bn_mod.reestimate_bn = timed_reestimate
def start(tr): t.update(start=time.perf_counter(), bn=0.0, val=0.0)
def batch_end(tr): t["last"] = time.perf_counter()
def val_start(v): t["v0"] = time.perf_counter()
def val_end(v): t["val"] += time.perf_counter() - t["v0"]
def fit_epoch_end(tr):
    if tr.epoch >= tr.epochs:  # final_eval's validation of best.pt (logged as epoch epochs + 1): not an epoch
        return
    loop.append(t["last"] - t["start"]); full.append(time.perf_counter() - t["start"]); bn.append(t["bn"])
    val.append(t["val"])
model = YOLO(spec.pop("model", "yolov8n.yaml"))
model.add_callback("on_train_epoch_start", start)
model.add_callback("on_train_batch_end", batch_end)
model.add_callback("on_val_start", val_start)  # the trainer's validator gets copies of these callbacks
model.add_callback("on_val_end", val_end)
model.add_callback("on_fit_epoch_end", fit_epoch_end)
trainer = QATDetectionTrainer if any(k.startswith("qat") for k in spec) else DetectionTrainer
model.train(trainer=trainer, name=name, **base, **spec)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
steady = lambda xs: statistics.median(xs[2:] if len(xs) > 3 else xs[1:] or xs)  # epochs 1-2: warm-up and compiles
print("RESULT " + json.dumps({"name": name, "loop": loop, "full": full, "bn": bn, "val": val, "loop_s": steady(loop),
                              "full_s": steady(full), "bn_s": steady(bn), "val_s": steady(val), "rss_mb": rss_mb,
                              "process_s": time.perf_counter() - t_process, "threads": torch.get_num_threads()}))
"""


def run(name: str, spec: dict, base: dict, cfg_dir: str) -> dict | None:
    """Train one configuration in a fresh process and return its measurements."""
    cmd = [sys.executable, "-c", CHILD, name, json.dumps(spec), cfg_dir, json.dumps(base)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        print(f"{name}: failed ({' | '.join(tail)})", file=sys.stderr)
        return None
    return json.loads(line[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--images", type=int, default=128, help="training images (batches per epoch = images / batch)")
    p.add_argument("--val-images", type=int, default=32, help="validation images")
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="subset of configurations")
    p.add_argument("--json", help="also write the measurements to this file")
    a = p.parse_args()

    from ultralytics_qat.utils import make_hermetic

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    cfg_dir = str(make_hermetic(work / "cfg"))
    from ultralytics_qat.data import make_shapes_dataset

    data = make_shapes_dataset(work / "shapes", n_train=a.images, n_val=a.val_images, imgsz=a.imgsz, seed=0)
    base = dict(data=str(data), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, nbs=a.batch, workers=0, plots=False,
                project=str(work / "runs"), exist_ok=True, seed=0, deterministic=False, device="cpu")
    names = a.only or list(CONFIGS)
    if "upstream-int8" in names:
        import importlib.util

        if importlib.util.find_spec("modelopt") is None:
            print("upstream-int8 skipped: nvidia-modelopt not installed (pip install 'ultralytics-qat[bench]')")
            names.remove("upstream-int8")
    float_pt = work / "float.pt"
    if any(CONFIGS[n].get("model") == "FLOAT_PT" for n in names):
        from ultralytics import YOLO
        from ultralytics.nn.tasks import DetectionModel

        from ultralytics_qat.data.shapes import CLASS_NAMES

        model = YOLO("yolov8n.yaml")
        model.model = DetectionModel("yolov8n.yaml", nc=len(CLASS_NAMES), verbose=False)  # the dataset's classes
        model.save(float_pt)
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        spec = {k: str(float_pt) if v == "FLOAT_PT" else v for k, v in CONFIGS[name].items()}
        res = run(name, spec, base, cfg_dir)
        if res:
            results[name] = res
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    print(table(results, a))


def table(results: dict, a) -> str:
    """The side-by-side table: loop and full epoch (s and x FP), BN re-estimation, peak RSS, process wall time."""
    fp = results.get("fp")

    def ratio(r, key):
        return f"{r[key] / fp[key]:.2f}x" if fp and fp[key] else "-"

    threads = next(iter(results.values()))["threads"] if results else "?"
    lines = [f"\nyolov8n, shapes {a.images}+{a.val_images} images, imgsz {a.imgsz}, batch {a.batch}, {a.epochs} epochs "
             f"(median of epochs 3+), validation every epoch, CPU, {threads} torch threads",
             f"{'config':<15}{'loop s':>8}{'x FP':>7}{'full epoch s':>14}{'x FP':>7}{'BN re-est s':>13}{'val s':>7}"
             f"{'peak RSS MB':>13}{'x FP':>7}{'process s':>11}{'x FP':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<15}{r['loop_s']:>8.2f}{ratio(r, 'loop_s'):>7}{r['full_s']:>14.2f}{ratio(r, 'full_s'):>7}"
                     f"{r['bn_s']:>13.2f}{r['val_s']:>7.2f}{r['rss_mb']:>13.0f}{ratio(r, 'rss_mb'):>7}{r['process_s']:>11.1f}"
                     f"{ratio(r, 'process_s'):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
