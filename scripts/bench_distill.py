"""Distillation benchmark: W4A4 QAT with and without the float teacher (qat.distill), against a fair float control.

On the synthetic shapes dataset, on CPU: train a float yolov8n (the teacher and start point), fine-tune it in float
for the same epochs and settings as the QAT runs (the fair control: QAT's extra epochs are not credited to QAT), then
fine-tune at W4A4 with the default recipe, distillation off and on. Prints final mAP50-95, % of the control, and the
training time per epoch (results.csv's clock: the loop and its validation, not setup or post-QAT stages; the
teacher's extra forward shows here).

    python scripts/bench_distill.py                         # tiny profile, a few minutes on 2 cores
    python scripts/bench_distill.py --profile quick --weights 0.5 1 2 --losses head both
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipes import results, summarize, train  # noqa: E402

PROFILES = {
    "tiny": dict(n_train=64, n_val=16, imgsz=96, fp_epochs=30, qat_epochs=3, batch=16),
    "quick": dict(n_train=128, n_val=32, imgsz=128, fp_epochs=60, qat_epochs=5, batch=16),
}


def _epoch_s(save_dir: Path) -> float:
    rows = results(save_dir)
    return rows[-1]["time"] / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=list(PROFILES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--weights", type=float, nargs="+", default=[1.0], help="qat.distill.weight values")
    p.add_argument("--losses", nargs="+", default=["head"], help="qat.distill.loss values")
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()

    from ultralytics_qat.utils import make_hermetic

    make_hermetic()
    from ultralytics.models.yolo.detect import DetectionTrainer

    from ultralytics_qat import QATDetectionTrainer
    from ultralytics_qat.data import make_shapes_dataset

    prof = PROFILES[a.profile]
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_distill_"))
    data = str(make_shapes_dataset(work / "shapes", prof["n_train"], prof["n_val"], prof["imgsz"], seed=0))
    common = dict(data=data, imgsz=prof["imgsz"], batch=prof["batch"], nbs=prof["batch"], seed=a.seed,
                  deterministic=True)
    fp_dir, _ = train("fp", work, DetectionTrainer, model="yolov8n.yaml", epochs=prof["fp_epochs"], **common)
    fp_weights = fp_dir / "weights" / "best.pt"
    finetune = dict(optimizer="AdamW", lr0=2e-4, warmup_epochs=0, mosaic=0.0, close_mosaic=0, epochs=prof["qat_epochs"],
                    **common)
    rows = []
    d, wall = train("fp-control", work, DetectionTrainer, model=str(fp_weights), **finetune)
    control = summarize("float control (same fine-tune)", d, None, wall)
    control["epoch_s"] = _epoch_s(d)
    rows.append(control)
    bits = {"qat.weight.bits": a.bits, "qat.activation.bits": a.bits}
    d, wall = train("qat-off", work, QATDetectionTrainer, model=str(fp_weights), qat="qat", **finetune, **bits)
    rows.append({**summarize(f"W{a.bits}A{a.bits} default, distill off", d, control["final"], wall), "epoch_s": _epoch_s(d)})
    for loss in a.losses:
        for w in a.weights:
            d, wall = train(f"qat-{loss}-{w}", work, QATDetectionTrainer, model=str(fp_weights), qat="qat",
                            **finetune, **bits, **{"qat.distill.weight": w, "qat.distill.loss": loss})
            rows.append({**summarize(f"W{a.bits}A{a.bits} default, distill {loss} x{w}", d, control["final"], wall),
                         "epoch_s": _epoch_s(d)})
    print(f"\nprofile {a.profile} {prof}, seed {a.seed}, work {work}")
    print("| run | final mAP50-95 | best | % of float control (final) | train s per epoch | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pct = "100" if r is control else f"{r['retained']:.1f}" if r["retained"] is not None else "n/a"
        print(f"| {r['run']} | {r['final']:.4f} | {r['best']:.4f} | {pct} | {r['epoch_s']:.2f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
