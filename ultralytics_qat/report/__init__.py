"""What a QAT run did, from its run folder alone: per-layer statistics, a stats database, plots and report.md.

The engine calls in (``LayerStats`` during training, :func:`write_report` at the end); nothing here imports it.
"""

from .build import REPORT_FILE, write_report
from .db import DB_FILE
from .layers import LAYERS_CSV, LayerStats, read_layers_csv
from .plots import plot_results_png
from .runfolder import EVENTS_FILE, read_run

__all__ = ["DB_FILE", "EVENTS_FILE", "LAYERS_CSV", "REPORT_FILE", "LayerStats", "plot_results_png", "read_layers_csv",
           "read_run", "write_report"]
