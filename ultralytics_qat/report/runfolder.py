"""What a run folder holds, read back: results.csv, qat_layers.csv, qat_events.jsonl and the post-QAT result."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QATError
from .layers import LAYERS_CSV, read_layers_csv

EVENTS_FILE = "qat_events.jsonl"  # one JSON object a line: {"epoch": int (results.csv's), "source", "action", "message"}
MAP50, MAP = "metrics/mAP50(B)", "metrics/mAP50-95(B)"


@dataclass
class RunData:
    """The numbers of one run folder (see :func:`read_run`)."""

    run_dir: Path
    results: dict[str, list[float]]  # results.csv column -> values, one per row; "epoch" included
    layers: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    post_qat: dict | None = None

    @property
    def epochs(self) -> list[int]:
        return [int(e) for e in self.results.get("epoch", [])]

    def best_epoch(self) -> int | None:
        """The epoch best.pt was taken from during training: the last one with the highest mAP50-95."""
        vals = self.results.get(MAP, [])
        finite = [(v, i) for i, v in enumerate(vals) if math.isfinite(v)]
        if not finite:
            return None
        best = max(v for v, _ in finite)
        return self.epochs[max(i for v, i in finite if v == best)]

    def value(self, key: str, epoch: int) -> float | None:
        if epoch not in self.epochs:
            return None
        v = self.results[key][self.epochs.index(epoch)]
        return v if math.isfinite(v) else None


def read_run(run_dir: str | Path, post_qat: dict | None = None) -> RunData:
    """Read a run folder; ``post_qat`` (the engine's in-memory result) else the one saved in weights/last.pt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise QATError(f"run folder '{run_dir}' not found; pass the folder of a yolo-qat training run, e.g. "
                       "runs/detect/train")
    csv_path = run_dir / "results.csv"
    if not csv_path.is_file():
        raise QATError(f"'{run_dir}' has no results.csv, so it is not a finished training run folder; pass the save "
                       "dir printed by 'yolo-qat train'")
    return RunData(run_dir, read_results_csv(csv_path), read_layers_csv(run_dir / LAYERS_CSV), read_events(run_dir),
                   post_qat if post_qat is not None else read_post_qat(run_dir))


def read_results_csv(path: Path) -> dict[str, list[float]]:
    """results.csv as columns of floats (NaN where a cell is empty or not a number)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    cols: dict[str, list[float]] = {h: [] for h in header}
    for r in rows[1:]:
        if len(r) != len(header):
            continue
        for h, v in zip(header, r):
            cols[h].append(_float(v))
    return cols


def read_events(run_dir: Path) -> list[dict]:
    """Events another part of the plugin logged (e.g. a collapse guard); malformed lines are skipped."""
    path = run_dir / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
            out.append({"epoch": int(e["epoch"]), "source": str(e.get("source", "")),
                        "action": str(e.get("action", "")), "message": str(e.get("message", ""))})
        except (ValueError, TypeError, KeyError):
            continue
    return out


def read_post_qat(run_dir: Path) -> dict | None:
    """The post-QAT stage result saved in the final checkpoints (``ckpt["qat"]["post_qat"]``), if any."""
    import torch

    from ..checkpoint import CKPT_KEY

    for name in ("last.pt", "best.pt"):
        path = run_dir / "weights" / name
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a corrupt or foreign file: the report goes on without the post-QAT result
            continue
        entry = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("post_qat"), dict):
            return entry["post_qat"]
    return None


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
