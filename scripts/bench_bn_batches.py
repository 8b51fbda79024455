"""What BN re-estimation's batch count buys: mAP50-95 of one QAT checkpoint re-estimated with 1, 2, 4, ... batches.

BN re-estimation (``qat.bn.batches``) runs before every validation, one no-grad forward per batch, so its cost grows
with the count (on a small dataset it can be a whole extra pass per epoch). This re-estimates the BN statistics of a
finished QAT model from scratch with each count, over several random draws of training batches (augmented as in its
run), and validates each result, to show where more batches stop helping.

    python scripts/bench_bn_batches.py RUN_DIR                   # a finished run: weights/last.pt, its data and args
    python scripts/bench_bn_batches.py RUN_DIR --counts 1 2 4 8 16 --draws 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--draws", type=int, default=3, help="random draws of batches per count")
    a = p.parse_args()

    from ultralytics_qat.utils import make_hermetic

    make_hermetic()
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from ultralytics_qat import QATDetectionValidator, load_qat_model
    from ultralytics_qat.stabilize.bn import reestimate_bn

    ckpt_path = a.run_dir / "weights" / "last.pt"
    model, ckpt = load_qat_model(ckpt_path)
    args = get_cfg(overrides={k: v for k, v in ckpt["train_args"].items() if k not in ("cfg",)})
    data = check_det_dataset(args.data)
    dataset = build_yolo_dataset(args, data["train"], args.batch, data, mode="train")
    val_args = dict(data=args.data, imgsz=args.imgsz, batch=args.batch, plots=False, verbose=False, rect=False,
                    project=str(a.run_dir.parent), name=f"{a.run_dir.name}-bn-bench")
    results = {}
    for n in a.counts:
        maps = []
        for draw in range(a.draws):
            torch.manual_seed(draw)
            loader = build_dataloader(dataset, args.batch, workers=0, shuffle=True, rank=-1)
            images = (b["img"].float() / 255 for b in loader)
            m = load_qat_model(ckpt_path)[0].float()
            used = reestimate_bn(m, images, n)
            maps.append(float(QATDetectionValidator(args=val_args)(model=m)["metrics/mAP50-95(B)"]))
            if used < n:
                print(f"note: only {used} batches in an epoch; count {n} used {used}")
        results[n] = maps
    print(f"\n{ckpt_path}: BN re-estimated from scratch, batch {args.batch}, {a.draws} draws per count")
    print(f"{'batches':>8}{'images':>8}{'mAP50-95 mean':>15}{'min':>8}{'max':>8}")
    for n, maps in results.items():
        print(f"{n:>8}{n * args.batch:>8}{statistics.mean(maps):>15.4f}{min(maps):>8.4f}{max(maps):>8.4f}")


if __name__ == "__main__":
    main()
