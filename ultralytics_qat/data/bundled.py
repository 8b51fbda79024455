"""The bundled tiny COCO subset (Ultralytics' coco8 split: 4 train + 4 val real COCO images, CC BY 4.0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ASSET = Path(__file__).resolve().parents[1] / "assets" / "coco8"


def default_data_root() -> Path:
    """Where datasets are materialised: Ultralytics' ``datasets_dir`` setting, else ``./datasets``."""
    try:
        from ultralytics.utils import SETTINGS

        return Path(SETTINGS["datasets_dir"])
    except Exception:  # settings unreadable: still give a usable local folder
        return Path("datasets")


def bundled_coco8(dest: str | Path | None = None) -> Path:
    """Copy the bundled coco8 to a writable folder and return its data yaml (absolute ``path:``).

    Ultralytics writes ``labels/*.cache`` next to the labels, so the packaged copy is never used in place.

    Args:
        dest: Target folder; ``<datasets_dir>/coco8-qat`` if None.

    Returns:
        Path of the data yaml.
    """
    dest = Path(dest) if dest is not None else default_data_root() / "coco8-qat"
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            src = ASSET / kind / split
            dst = dest / kind / split
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if not (dst / f.name).exists():
                    shutil.copyfile(f, dst / f.name)
    names = yaml.safe_load((ASSET / "coco8.yaml").read_text())["names"]
    data = {"path": str(dest.resolve()), "train": "images/train", "val": "images/val", "names": names}
    out = dest / "coco8.yaml"
    out.write_text("# Ultralytics coco8 (COCO train2017 images, CC BY 4.0), bundled with ultralytics-qat\n" + yaml.safe_dump(data, sort_keys=False))
    return out
