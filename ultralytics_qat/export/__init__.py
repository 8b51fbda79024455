"""Deployable export of QAT checkpoints: ONNX with QuantizeLinear/DequantizeLinear and INT4 weights, an OpenVINO IR
with integer convolutions, and QONNX with each layer's bit width (FINN, hls4ml).

Works from a checkpoint alone; imports nothing of ``ultralytics_qat.engine``.

Examples:
    >>> from ultralytics_qat.export import export
    >>> export("runs/detect/train/weights/best.pt", format="onnx")  # -> Path('.../best.onnx')
    >>> export("best.pt", format="onnx", quantize="int8")  # the TensorRT-ready INT8 profile
    >>> export("best.pt", format="openvino")  # -> Path('.../best_openvino_model')
"""

from __future__ import annotations

from pathlib import Path

from .fold import ActivationQuant, FoldReport, QATExportError, QDQConv2d, fold_model, fold_weight, weight_codes
from .onnx import check_export_requirements, export_onnx, tensorrt_profile_problems

SUPPORTED_FORMATS = ("onnx", "openvino", "qonnx")
# Ultralytics' `quantize` values (and the deprecated half/int8 flags) -> what they mean for a QAT export
QUANTIZE = {"8": "int8", "int8": "int8", "w8a8": "int8", "16": "half", "fp16": "half", "w16a16": "half",
            "32": None, "fp32": None, "w32a32": None, "none": None}
# the keys `yolo-qat export` takes besides model and format
EXPORT_KEYS = ("imgsz", "opset", "dynamic", "batch", "quantize", "half", "int8", "simplify", "data")

__all__ = [
    "EXPORT_KEYS",
    "SUPPORTED_FORMATS",
    "ActivationQuant",
    "FoldReport",
    "QATExportError",
    "QDQConv2d",
    "check_export_requirements",
    "export",
    "export_onnx",
    "export_openvino",
    "export_qonnx",
    "fold_model",
    "fold_weight",
    "resolve_quantize",
    "tensorrt_profile_problems",
    "weight_codes",
]


def resolve_quantize(quantize=None, half=None, int8=None) -> str | None:
    """``"int8"`` (the TensorRT-ready INT8 profile), ``"half"`` (float layers in FP16) or None (as trained).

    Takes Ultralytics' ``quantize`` values (8/int8/w8a8, 16/fp16/w16a16, 32/fp32/None) and its deprecated
    ``int8=True`` / ``half=True`` flags; int8 wins over half, as in Ultralytics.
    """
    for key, value in (("half", half), ("int8", int8)):
        if value is not None and not isinstance(value, bool):
            raise QATExportError(f"{key}={value!r} must be True or False (or use quantize=...)")
    if quantize is not None and (half or int8):
        raise QATExportError(f"quantize={quantize} and half/int8 given together; pass only quantize=int8 or quantize=fp16")
    if quantize is None:
        return "int8" if int8 else "half" if half else None
    key = str(quantize).strip().lower()
    if isinstance(quantize, bool) or key not in QUANTIZE:
        raise QATExportError(
            f"quantize={quantize!r} is not supported by yolo-qat export; use quantize=int8 (TensorRT-ready INT8 "
            "profile), quantize=fp16 (float layers in FP16), or leave it out (the trained bit widths)"
        )
    return QUANTIZE[key]


def export(checkpoint_path: str | Path, format: str = "onnx", *, quantize=None, half=None, int8=None,  # noqa: A002
           **kwargs) -> Path:
    """Export a QAT checkpoint to ``format`` and print its size and parity with the PyTorch QAT model.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        format: ``onnx`` (Q/DQ, INT4 weights; TensorRT and onnxruntime), ``openvino`` (IR directory) or ``qonnx``
            (``Quant`` nodes with each layer's bit width, for FINN / hls4ml).
        quantize: ``int8`` for the TensorRT-ready INT8 profile, ``fp16`` for float layers stored in FP16 (Ultralytics'
            spelling; ``int8=True`` / ``half=True`` are accepted as in Ultralytics).
        **kwargs: ``imgsz``, ``opset``, ``dynamic``, ``batch``, ``simplify``, ``data`` (mAP parity), ``file``,
            ``parity`` (see :func:`export_onnx`).
    """
    fmt = str(format).lower()
    mode = resolve_quantize(quantize, half, int8)
    if fmt == "onnx":
        return export_onnx(checkpoint_path, half=mode == "half", int8=mode == "int8", **kwargs)
    if fmt == "openvino":
        return export_openvino(checkpoint_path, half=mode == "half", int8=mode == "int8", **kwargs)
    if fmt == "qonnx":
        if mode is not None:
            raise QATExportError("quantize/half/int8 do not apply to format=qonnx: its Quant nodes carry each layer's "
                                 "own trained bit width; leave them out")
        return export_qonnx(checkpoint_path, **kwargs)
    hint = (" (TensorRT builds its engine from the INT8 profile: format=onnx quantize=int8, then "
            "'trtexec --onnx=best.onnx --int8 --fp16')" if fmt in ("engine", "tensorrt", "trt") else
            " (for float formats use 'yolo export' on a float model)")
    raise QATExportError(f"format='{format}' is not supported by yolo-qat export; supported: "
                         f"{', '.join(SUPPORTED_FORMATS)}{hint}")


def export_openvino(*args, **kwargs) -> Path:
    """See :func:`.openvino.export_openvino` (imported on use: openvino is an optional runtime)."""
    from .openvino import export_openvino as run

    return run(*args, **kwargs)


def export_qonnx(*args, **kwargs) -> Path:
    """See :func:`.qonnx.export_qonnx` (imported on use: qonnx is an optional runtime)."""
    from .qonnx import export_qonnx as run

    return run(*args, **kwargs)
