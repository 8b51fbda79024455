"""Deployable export of QAT checkpoints (ONNX with QuantizeLinear/DequantizeLinear and INT4 weights).

Works from a checkpoint alone; imports nothing of ``ultralytics_qat.engine``.

Examples:
    >>> from ultralytics_qat.export import export
    >>> export("runs/detect/train/weights/best.pt", format="onnx")  # -> Path('.../best.onnx')
"""

from __future__ import annotations

from pathlib import Path

from .fold import ActivationQuant, FoldReport, QATExportError, QDQConv2d, fold_model, fold_weight, weight_codes
from .onnx import check_export_requirements, export_onnx

SUPPORTED_FORMATS = ("onnx",)

__all__ = [
    "SUPPORTED_FORMATS",
    "ActivationQuant",
    "FoldReport",
    "QATExportError",
    "QDQConv2d",
    "check_export_requirements",
    "export",
    "export_onnx",
    "fold_model",
    "fold_weight",
    "weight_codes",
]


def export(checkpoint_path: str | Path, format: str = "onnx", **kwargs) -> Path:  # noqa: A002  (Ultralytics' name)
    """Export a QAT checkpoint to ``format``; only ``onnx`` (other runtimes build from the ONNX, e.g. trtexec).

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        format: Export format; one of :data:`SUPPORTED_FORMATS`.
        **kwargs: Passed to the format's exporter, e.g. ``imgsz``, ``opset`` and ``file`` for :func:`export_onnx`.
    """
    fmt = str(format).lower()
    if fmt not in SUPPORTED_FORMATS:
        raise QATExportError(
            f"format='{format}' is not supported by yolo-qat export; supported: {', '.join(SUPPORTED_FORMATS)} "
            "(TensorRT and OpenVINO build from the Q/DQ ONNX; for float formats use 'yolo export' on a float model)"
        )
    return export_onnx(checkpoint_path, **kwargs)
