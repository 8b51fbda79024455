"""ONNX export of a QAT checkpoint: QuantizeLinear/DequantizeLinear with exactly the learned scales, INT4 weights.

Route: load the checkpoint's exact fp32 QAT state, fold BN into per-channel weight scales without moving a single
integer code (:mod:`.fold`), trace with Ultralytics' own exporter (so the graph, onnxslim and the metadata that
``YOLO("best.onnx")`` reads are the same as ``yolo export``), then rewrite the weight initializers: codes of <= 4-bit
layers are repacked as ``TensorProto.INT4`` at opset 21 (ONNX Runtime >= 1.20 dequantizes INT4 per axis on CPU),
everything else stays an INT8 container.

Graph per quantized conv::

    x -> [Clip(qn*s, qp*s)] -> QuantizeLinear(s, zp) -> DequantizeLinear(s, zp) --> Conv -> act
         codes (INT4/INT8 initializer) -> DequantizeLinear(scale[C], axis=0) ----/
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..checkpoint import load_qat_model
from ..utils import LOGGER
from .fold import FoldReport, QATExportError, fold_model

EXPORT_DEPS = ("onnx", "onnxruntime", "onnxslim")
INT4_OPSET = 21  # first opset with INT4 tensors in QuantizeLinear/DequantizeLinear
MIN_OPSET = 13  # per-axis DequantizeLinear
TRACE_OPSET = 18  # what Ultralytics traces with on this torch; higher opsets are reached by conversion
PREFIX = "QAT export:"


def check_export_requirements() -> None:
    """Raise a one-line :class:`QATExportError` naming the missing packages of the ``export`` extra."""
    missing = [m for m in EXPORT_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise QATExportError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            'install the export extra: pip install "ultralytics-qat[export]"'
        )


def _resolve_opset(opset: int | None) -> int:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(INT4_OPSET, top)
    opset = int(opset)
    if not MIN_OPSET <= opset <= top:
        raise QATExportError(
            f"opset={opset} is not supported: per-channel DequantizeLinear needs opset >= {MIN_OPSET} and onnx "
            f"{onnx.__version__} knows up to {top}; use opset={INT4_OPSET} (INT4 weights) or leave it unset"
        )
    return opset


def export_onnx(checkpoint_path: str | Path, imgsz: int | list[int] | None = None, opset: int | None = None,
                file: str | Path | None = None) -> Path:
    """Export a QAT checkpoint to ONNX with Q/DQ nodes holding exactly the learned scales and integer codes.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        imgsz: Static input size (int or [h, w]); None takes the checkpoint's training ``imgsz`` as ``yolo export``
            does, 640 if it has none.
        opset: ONNX opset; None = 21, which stores <= 4-bit weights as INT4. Opsets 13..20 store them in INT8.
        file: Output path; default: the checkpoint path with ``.onnx``.

    Returns:
        Path of the written ``.onnx``.

    Examples:
        >>> f = export_onnx("runs/detect/train/weights/best.pt")
        >>> YOLO(str(f)).val(data="coco8.yaml")
    """
    check_export_requirements()
    import onnx

    target = _resolve_opset(opset)
    model, _ = load_qat_model(checkpoint_path, hint="yolo export")
    args = getattr(model, "args", None) or {}
    imgsz = imgsz or (args.get("imgsz") if isinstance(args, dict) else None) or 640
    file = Path(file) if file is not None else Path(checkpoint_path).with_suffix(".onnx")
    if file.suffix != ".onnx":
        raise QATExportError(f"file='{file}' must end in .onnx")
    file.parent.mkdir(parents=True, exist_ok=True)

    model = model.float().eval()
    report = fold_model(model)
    written = Path(_trace(model, file, imgsz, min(target, TRACE_OPSET)))
    traced = onnx.load(str(written))  # Ultralytics' graph + metadata, codes in INT8; rewritten below
    if written != file:
        written.unlink(missing_ok=True)
    int4 = target >= INT4_OPSET
    final = finalize(onnx.ModelProto.FromString(traced.SerializeToString()), report, target, int4=int4)
    onnx.save(final, str(file))
    if int4 and not _runs(file):  # an onnxruntime without INT4 DequantizeLinear: fall back to INT8 containers
        LOGGER.warning(f"{PREFIX} this onnxruntime cannot run INT4 weights; storing them in INT8 containers")
        final = finalize(traced, report, target, int4=False)
        onnx.save(final, str(file))
    LOGGER.info(summary(final, report, file))
    return file


def _trace(model, file: Path, imgsz, opset: int) -> str:
    """Run Ultralytics' exporter on the folded model (graph, onnxslim, metadata); returns the file it wrote."""
    from ultralytics.engine.exporter import Exporter

    model.pt_path = str(file.with_suffix(".pt"))  # the exporter names its output after the source checkpoint
    for p in model.parameters():
        p.requires_grad_(False)
    overrides = {"format": "onnx", "imgsz": imgsz, "opset": opset, "batch": 1, "device": "cpu", "data": None,
                 "simplify": True, "dynamic": False, "nms": False, "verbose": False, "mode": "export"}
    return Exporter(overrides=overrides)(model=model)


def _runs(file: Path) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:  # NOT_IMPLEMENTED for INT4 on old builds; anything else surfaces on first use anyway
        LOGGER.warning(f"{PREFIX} onnxruntime {ort.__version__} could not load the INT4 graph: {str(e).splitlines()[0]}")
        return False
    return True


def weight_nodes(proto) -> dict[str, object]:
    """Initializer name -> DequantizeLinear node, for every DequantizeLinear reading an integer initializer."""
    from onnx import TensorProto

    ints = {TensorProto.INT4, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16}
    inits = {t.name: t for t in proto.graph.initializer}
    return {n.input[0]: n for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in ints
            and len(inits[n.input[0]].dims) > 1}


def finalize(proto, report: FoldReport, opset: int, int4: bool = True):
    """Check every layer's codes survived tracing bit for bit, repack them (INT4 where possible) and set the opset."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = weight_nodes(proto)
    for name, layer in report.quantized.items():
        key = f"{name}.codes"
        if key not in nodes:
            raise QATExportError(f"internal: the traced graph has no DequantizeLinear on '{key}'; please report this")
        codes = layer.codes.cpu().numpy()
        stored = numpy_helper.to_array(inits[key]).astype(np.int8)
        if not np.array_equal(stored, codes):
            raise QATExportError(f"internal: codes of '{name}' changed during tracing; please report this")
        dtype = ml_dtypes.int4 if int4 and layer.container_bits == 4 else np.int8
        inits[key].CopyFrom(numpy_helper.from_array(codes.astype(dtype), key))
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < opset:
            proto = _convert_opset(proto, opset)
            break
    if not any(p.key == "ultralytics_qat" for p in proto.metadata_props):
        meta = proto.metadata_props.add()
        meta.key, meta.value = "ultralytics_qat", json.dumps({"version": __version__, "int4_weights": int4})
    onnx.checker.check_model(proto)
    return proto


def _convert_opset(proto, opset: int):
    """Raise the default-domain opset. Every op Ultralytics emits changed between 18 and 21 only by new types and
    attributes with the old defaults (QuantizeLinear/DequantizeLinear gained INT4 and blocks), so the graph means the
    same under the higher version; the version converter is used when it can, else the import is raised in place."""
    import onnx

    try:
        return onnx.version_converter.convert_version(proto, opset)
    except Exception:
        for imp in proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
        return proto


def fp32_equivalent(proto):
    """The same graph in float: weight DequantizeLinear replaced by float initializers, activation Q/DQ/Clip removed.

    Its size is the size of an FP32 export of the same (BN-folded) model; used for the size comparison.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    rename, drop, new_inits = {}, set(), []
    for key, node in weight_nodes(proto).items():
        codes = numpy_helper.to_array(inits[key]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        new_inits.append(numpy_helper.from_array(codes * scale.reshape(-1, *[1] * (codes.ndim - 1)), node.output[0]))
        drop.add(id(node))
    for node in g.node:
        if node.op_type == "DequantizeLinear" and id(node) not in drop:
            q = producers.get(node.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            src = q.input[0]
            clip = producers.get(src)
            if clip is not None and clip.op_type == "Clip":
                drop.add(id(clip))
                src = clip.input[0]
            rename[node.output[0]] = src
            drop.update((id(node), id(q)))
    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    used = {i for n in kept for i in n.input}
    del g.node[:]
    g.node.extend(kept)
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits + new_inits)
    return proto


def summary(proto, report: FoldReport, file: Path) -> str:
    """The printed report: layers and containers, float layers, and the size against the FP32 graph."""
    from onnx import TensorProto

    inits = {t.name: t for t in proto.graph.initializer}
    types = {TensorProto.INT4: "INT4", TensorProto.INT8: "INT8"}
    by_type: dict[str, int] = {}
    for name in report.quantized:
        t = types.get(inits[f"{name}.codes"].data_type, "?")
        by_type[t] = by_type.get(t, 0) + 1
    acts = [m.act for m in report.quantized.values() if m.act is not None]
    u8 = [a for a in acts if a.container == "uint8"]
    clipped = sum(a.clip for a in acts)
    size, fp32 = file.stat().st_size, fp32_equivalent(proto).ByteSize()
    opset = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    weights = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
    lines = [
        f"{PREFIX} {len(report.quantized)} convs with integer weights per output channel, BN folded exactly ({weights})",
        f"{PREFIX} {len(acts)} activation Q/DQ per tensor: {len(u8)} UINT8 ({sum(a.zero_point != 0 for a in u8)} with a "
        f"nonzero zero point), {len(acts) - len(u8)} INT8; {clipped} clipped to a grid narrower than 8 bits",
        f"{PREFIX} left in float ({len(report.float_layers)}): {', '.join(report.float_layers) or 'none'}",
        f"{PREFIX} {file} {size / 1e6:.2f} MB vs {fp32 / 1e6:.2f} MB for the FP32 graph of the same model "
        f"({fp32 / size:.1f}x smaller), opset {opset}",
    ]
    return "\n".join(lines)
