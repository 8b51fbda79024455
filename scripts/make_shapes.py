#!/usr/bin/env python
"""Generate the synthetic shapes detection dataset and print the path of its data.yaml.

Example:
    python scripts/make_shapes.py --root datasets/shapes --n-train 256 --n-val 64 --imgsz 160 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from ultralytics_qat.data.shapes import make_shapes_dataset
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ultralytics_qat.data.shapes import make_shapes_dataset


def main(argv: list[str] | None = None) -> Path:
    """Parse command-line arguments, build (or reuse) the dataset and print the yaml path.

    Args:
        argv (list[str] | None): Arguments without the program name; None reads sys.argv.

    Returns:
        (Path): Path to the generated data.yaml.
    """
    p = argparse.ArgumentParser(description="Generate the deterministic synthetic shapes YOLO dataset.")
    p.add_argument("--root", required=True, help="output dataset directory")
    p.add_argument("--n-train", type=int, default=256, help="number of training images (default: 256)")
    p.add_argument("--n-val", type=int, default=64, help="number of validation images (default: 64)")
    p.add_argument("--imgsz", type=int, default=160, help="image side, a multiple of 32 (default: 160)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    args = p.parse_args(argv)
    try:
        yaml_file = make_shapes_dataset(
            args.root,
            n_train=args.n_train,
            n_val=args.n_val,
            imgsz=args.imgsz,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    print(yaml_file)
    return yaml_file


if __name__ == "__main__":
    main()
