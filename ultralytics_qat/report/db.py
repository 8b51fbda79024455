"""``qat_stats.db``: a run's numbers in one SQLite file (stdlib ``sqlite3``), rebuilt from the run folder.

Tables:
    ``results(epoch, name, value)``   every results.csv scalar per epoch (``name`` is the column, e.g. ``qat/osc_frac``)
    ``layers(stage, epoch, layer, w_bits, ...)``   qat_layers.csv as it is (see ``report.layers``)
    ``post_qat(name, value)``         the post-QAT stage result (fitness, validation metrics, QC/AFW figures)
    ``events(epoch, source, action, message)``   qat_events.jsonl
    ``meta(key, value)``              run folder, best epoch, when the database was written
"""

from __future__ import annotations

import math
import os
import sqlite3
from datetime import datetime
from pathlib import Path

from .layers import COLUMNS
from .runfolder import RunData

DB_FILE = "qat_stats.db"
_REAL = {c: "REAL" for c in COLUMNS[3:]}


def write_db(run: RunData, path: str | Path | None = None) -> Path:
    """Write the database of ``run`` (atomically: a reader never sees a half-written file); returns its path."""
    path = Path(path) if path is not None else run.run_dir / DB_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        with con:
            _fill(con, run)
    finally:
        con.close()
    tmp.replace(path)
    return path


def _fill(con: sqlite3.Connection, run: RunData) -> None:
    con.execute("CREATE TABLE results (epoch INTEGER, name TEXT, value REAL)")
    epochs = run.epochs
    con.executemany("INSERT INTO results VALUES (?, ?, ?)", [
        (e, name, _real(v)) for name, vals in run.results.items() if name != "epoch" for e, v in zip(epochs, vals)])
    cols = ", ".join(["stage TEXT", "epoch INTEGER", "layer TEXT"] + [f"{c} {_REAL[c]}" for c in COLUMNS[3:]])
    con.execute(f"CREATE TABLE layers ({cols})")
    con.executemany(f"INSERT INTO layers VALUES ({', '.join('?' * len(COLUMNS))})",
                    [tuple(r[c] for c in COLUMNS) for r in run.layers])
    con.execute("CREATE TABLE post_qat (name TEXT, value REAL)")
    con.executemany("INSERT INTO post_qat VALUES (?, ?)", list(_flat(run.post_qat or {})))
    con.execute("CREATE TABLE events (epoch INTEGER, source TEXT, action TEXT, message TEXT)")
    con.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                    [(e["epoch"], e["source"], e["action"], e["message"]) for e in run.events])
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    meta = {"run_dir": str(run.run_dir.resolve()), "best_epoch": run.best_epoch(), "epochs": len(epochs),
            "written": datetime.now().astimezone().isoformat(timespec="seconds")}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, None if v is None else str(v)) for k, v in meta.items()])
    for table, col in (("results", "name"), ("layers", "layer")):
        con.execute(f"CREATE INDEX {table}_{col} ON {table} ({col}, epoch)")


def _flat(d: dict, prefix: str = ""):
    """(name, number) pairs of a nested dict of numbers and bools; other values are left out."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (bool, int, float)) or v is None:
            yield f"{prefix}{k}", _real(v)


def _real(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
