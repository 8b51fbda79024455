"""What a QAT run did, from its run folder alone: per-layer statistics, a stats database, plots and report.md.

The engine calls in (``LayerStats`` during training, :func:`write_report` at the end); nothing here imports it.
"""

from .layers import LAYERS_CSV, LayerStats, read_layers_csv

__all__ = ["LAYERS_CSV", "LayerStats", "read_layers_csv"]
