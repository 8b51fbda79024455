"""Training overhead of QAT against float training: epoch time and peak memory, side by side in one run.

Each configuration trains yolov8n from its yaml on the synthetic shapes dataset in its own subprocess (peak RSS is a
per-process high-water mark) with identical Ultralytics arguments. Epoch time is the training loop only, measured with
callbacks from ``on_train_epoch_start`` to the epoch's last ``on_train_batch_end`` (the process also builds datasets
and validates, and QAT re-estimates BN before validation — validation-time costs that would blur the ratio); the
first two epochs are dropped as warm-up (the CPU kernels compile in a background thread meanwhile, eager until
ready) and the median of the rest reported. BN re-estimation is switched off here: it is a per-validation cost, reported in README separately.

Configurations: FP (plain DetectionTrainer), ultralytics-qat W8A8 and W4A4 (QATDetectionTrainer), and upstream INT8
QAT (``quantize=8``, nvidia-modelopt with fixed calibrated ranges) when ``nvidia-modelopt`` is installed
(``pip install "ultralytics-qat[bench]"``).

    python scripts/bench_overhead.py                      # imgsz 320, batch 8, 128 images, 6 epochs
    python scripts/bench_overhead.py --imgsz 160 --epochs 3
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
    "qat-w8a8": {"qat": "qat.yaml", "qat.weight.bits": 8, "qat.activation.bits": 8, "qat.bn.reestimate": False},
    "qat-w4a4": {"qat": "qat.yaml", "qat.bn.reestimate": False},
    "upstream-int8": {"quantize": 8},
}

CHILD = r"""
import json, resource, statistics, sys, time
from ultralytics_qat.utils import make_hermetic
make_hermetic(sys.argv[3])
import torch
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics_qat import QATDetectionTrainer

name, spec, base = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[4])
times, t0 = [], {}
def start(tr): t0["t"] = time.perf_counter()
def batch_end(tr): t0["last"] = time.perf_counter()
def end(tr): times.append(t0["last"] - t0["t"])
model = YOLO("yolov8n.yaml")
model.add_callback("on_train_epoch_start", start)
model.add_callback("on_train_batch_end", batch_end)
model.add_callback("on_train_epoch_end", end)
trainer = QATDetectionTrainer if any(k.startswith("qat") for k in spec) else DetectionTrainer
model.train(trainer=trainer, name=name, **base, **spec)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
steady = times[2:] if len(times) > 3 else times[1:] or times  # epochs 1-2 may still run eager while Inductor compiles
print("RESULT " + json.dumps({"name": name, "epochs": times, "epoch_s": statistics.median(steady),
                              "rss_mb": rss_mb, "threads": torch.get_num_threads()}))
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
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="subset of configurations")
    a = p.parse_args()

    from ultralytics_qat.utils import make_hermetic

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    cfg_dir = str(make_hermetic(work / "cfg"))
    from ultralytics_qat.data import make_shapes_dataset

    data = make_shapes_dataset(work / "shapes", n_train=a.images, n_val=8, imgsz=a.imgsz, seed=0)
    base = dict(data=str(data), epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, nbs=a.batch, workers=0, plots=False,
                val=False, project=str(work / "runs"), exist_ok=True, seed=0, deterministic=False, device="cpu")
    names = a.only or list(CONFIGS)
    if "upstream-int8" in names:
        import importlib.util

        if importlib.util.find_spec("modelopt") is None:
            print("upstream-int8 skipped: nvidia-modelopt not installed (pip install 'ultralytics-qat[bench]')")
            names.remove("upstream-int8")
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        res = run(name, CONFIGS[name], base, cfg_dir)
        if res:
            results[name] = res
    fp = results.get("fp")
    print(f"\nyolov8n, shapes {a.images} images, imgsz {a.imgsz}, batch {a.batch}, {a.epochs} epochs, CPU, "
          f"torch threads in training: {next(iter(results.values()))['threads'] if results else '?'}")
    print(f"{'config':<16}{'epoch s':>9}{'x FP':>7}{'peak RSS MB':>13}{'x FP':>7}   epochs (s)")
    for name, r in results.items():
        tx = f"{r['epoch_s'] / fp['epoch_s']:.2f}" if fp else "-"
        mx = f"{r['rss_mb'] / fp['rss_mb']:.2f}" if fp else "-"
        eps = ", ".join(f"{t:.2f}" for t in r["epochs"])
        print(f"{name:<16}{r['epoch_s']:>9.2f}{tx:>7}{r['rss_mb']:>13.0f}{mx:>7}   {eps}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
