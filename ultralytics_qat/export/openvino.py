"""OpenVINO IR of a QAT checkpoint, converted by OpenVINO's own converter from the Q/DQ ONNX graph.

OpenVINO reads each QuantizeLinear/DequantizeLinear pair as a ``FakeQuantize`` and its CPU plugin runs every conv
whose input and weights are quantized as an INT8 convolution (``runtimePrecision`` u8/i8 in the compiled model).
The ONNX it converts stores all codes in INT8 containers: OpenVINO would decompress INT4 conv weights to float and
run those convs in floating point (measured: 18 of 50 INT4 convs), so INT8 storage is what keeps every conv integer.
The IR directory carries Ultralytics' ``metadata.yaml``, so ``YOLO("best_openvino_model")`` predicts and validates.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..utils import LOGGER
from .fold import QATExportError
from .onnx import PREFIX, TRACE_OPSET, check_export_requirements, check_options, prepare, summary, write_onnx


def check_openvino() -> None:
    if importlib.util.find_spec("openvino") is None:
        raise QATExportError('format=openvino needs openvino, which is not installed; install the export extra: '
                             'pip install "ultralytics-qat[export]"')


def export_openvino(checkpoint_path: str | Path, imgsz=None, opset: int | None = None, file: str | Path | None = None,
                    *, dynamic: bool = False, batch: int = 1, half: bool = False, simplify: bool = True,
                    int8: bool = False, data: str | None = None, parity: bool = True) -> Path:
    """Export a QAT checkpoint to an OpenVINO IR directory (``<stem>_openvino_model/``) with integer convolutions.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        imgsz, dynamic, batch, simplify, int8, data, parity: as for :func:`~.onnx.export_onnx`.
        opset: Opset of the intermediate ONNX (default 18; INT8 containers at every opset).
        file: Output directory; default: ``<checkpoint stem>_openvino_model`` next to the checkpoint.
        half: Store the float layers' weights (head outputs, DFL) in FP16 (OpenVINO's ``compress_to_fp16``); the
            INT8 weights and the quantization ranges are unchanged.

    Returns:
        The IR directory (``<stem>.xml``, ``<stem>.bin``, ``metadata.yaml``).
    """
    check_export_requirements()
    check_openvino()
    import openvino as ov
    import yaml

    from .onnx import _resolve_opset

    target = _resolve_opset(opset if opset is not None else TRACE_OPSET, int8)
    ckpt = Path(checkpoint_path)
    out = Path(file) if file is not None else ckpt.with_name(f"{ckpt.stem}_openvino_model")
    opts = check_options(dynamic=dynamic, batch=batch, half=False, simplify=simplify)
    prepared = prepare(checkpoint_path, imgsz, int8)
    with tempfile.TemporaryDirectory(prefix="qat_openvino_") as tmp:
        onnx_file = Path(tmp) / f"{ckpt.stem}.onnx"
        proto, metadata = write_onnx(prepared, onnx_file, target, int4=False, **opts)
        model = ov.convert_model(str(onnx_file))
    _set_ultralytics_rt_info(model, metadata)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / f"{ckpt.stem}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=half)
    (out / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True))
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    LOGGER.info(summary(proto, prepared.report, out, size).replace(f", opset {target}", " (IR .xml + .bin)"))
    runner = OpenVINORunner(xml)
    LOGGER.info(f"{PREFIX} OpenVINO CPU runs {runner.conv_line(len(prepared.report.quantized))}")
    if parity:
        from .parity import report_parity

        report_parity(prepared, runner, metadata["imgsz"], batch=batch, data=data, exported=out)
    return out


def _set_ultralytics_rt_info(model, metadata: dict) -> None:
    """The model_info Ultralytics' own OpenVINO export writes (used by OpenVINO's model API and Model Server)."""
    model.set_rt_info("YOLO", ["model_info", "model_type"])
    model.set_rt_info(True, ["model_info", "reverse_input_channels"])
    model.set_rt_info(114, ["model_info", "pad_value"])
    model.set_rt_info([255.0], ["model_info", "scale_values"])
    model.set_rt_info(0.7, ["model_info", "iou_threshold"])
    model.set_rt_info([str(v).replace(" ", "_") for v in metadata["names"].values()], ["model_info", "labels"])
    model.set_rt_info("fit_to_window_letterbox", ["model_info", "resize_type"])


class OpenVINORunner:
    """An IR compiled for OpenVINO's CPU plugin at FP32 inference precision (the parity check's runtime).

    FP32 because the plugin's default on CPUs with bf16 units computes the float parts (the head's box outputs)
    in bf16; ``yolo val`` through Ultralytics uses that default (see README's deployment table).
    """

    name = "OpenVINO CPU, f32"

    def __init__(self, xml: Path, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": ov.Type.f32} if precision == "f32" else {}
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.compiled(x)[0]

    def conv_precisions(self) -> Counter:
        """Runtime precision of every convolution the CPU plugin compiled (u8/i8 = integer convolution)."""
        out = Counter()
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                out[info["runtimePrecision"].astype(str)] += 1
        return out

    def conv_line(self, quantized: int) -> str:
        p = self.conv_precisions()
        integer = p.get("u8", 0) + p.get("i8", 0)
        rest = ", ".join(f"{n} in {k}" for k, n in sorted(p.items()) if k not in ("u8", "i8"))
        return (f"{integer} of {sum(p.values())} convolutions as INT8 convolutions ({quantized} are quantized in the "
                f"graph)" + (f"; {rest}" if rest else ""))
