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
from dataclasses import dataclass
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


def _resolve_opset(opset: int | None, int8: bool = False) -> int:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if opset is None:
        return TRACE_OPSET if int8 else min(INT4_OPSET, top)
    opset = int(opset)
    if not MIN_OPSET <= opset <= top:
        raise QATExportError(
            f"opset={opset} is not supported: per-channel DequantizeLinear needs opset >= {MIN_OPSET} and onnx "
            f"{onnx.__version__} knows up to {top}; use opset={INT4_OPSET} (INT4 weights) or leave it unset"
        )
    return opset


def export_onnx(checkpoint_path: str | Path, imgsz: int | list[int] | None = None, opset: int | None = None,
                file: str | Path | None = None, *, dynamic: bool = False, batch: int = 1, half: bool = False,
                simplify: bool = True, int8: bool = False, data: str | None = None, parity: bool = True) -> Path:
    """Export a QAT checkpoint to ONNX with Q/DQ nodes holding exactly the learned scales and integer codes.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        imgsz: Input size (int or [h, w]); None takes the checkpoint's training ``imgsz`` as ``yolo export``
            does, 640 if it has none.
        opset: ONNX opset; None = 21, which stores <= 4-bit weights as INT4 (18 with ``int8``). Opsets 13..20 store
            them in INT8.
        file: Output path; default: the checkpoint path with ``.onnx``.
        dynamic: Dynamic batch, height and width (Ultralytics' ``dynamic``).
        batch: Batch size of the (static) input.
        half: Store the layers left in float (head outputs, DFL) in FP16; codes and scales are unchanged.
        simplify: Run onnxslim on the traced graph (Ultralytics' ``simplify``).
        int8: The TensorRT-ready INT8 profile (:func:`tensorrt_profile_problems`): INT8 weight containers, every
            activation INT8 with zero point 0 (8-bit unsigned/affine grids re-gridded), no UINT8 anywhere.
        data: A dataset yaml: the parity check also compares mAP50-95 of the export and the QAT model on it.
        parity: Print the parity summary against the PyTorch QAT model (coco8 images, and ``data`` if given).

    Returns:
        Path of the written ``.onnx``.

    Examples:
        >>> f = export_onnx("runs/detect/train/weights/best.pt")
        >>> YOLO(str(f)).val(data="coco8.yaml")
    """
    check_export_requirements()
    import onnx

    target = _resolve_opset(opset, int8)
    file = Path(file) if file is not None else Path(checkpoint_path).with_suffix(".onnx")
    if file.suffix != ".onnx":
        raise QATExportError(f"file='{file}' must end in .onnx")
    opts = check_options(dynamic=dynamic, batch=batch, half=half, simplify=simplify)
    prepared = prepare(checkpoint_path, imgsz, int8)
    final, metadata = write_onnx(prepared, file, target, int4=target >= INT4_OPSET and not int8, **opts)
    LOGGER.info(summary(final, prepared.report, file, file.stat().st_size))
    if int8:
        problems = tensorrt_profile_problems(final)
        if problems:
            raise QATExportError(f"internal: the INT8 profile graph is not TensorRT-ready ({problems[0]}); please report this")
    if parity:
        from .parity import report_parity

        report_parity(prepared, OnnxRunner(file), metadata["imgsz"], batch=batch, data=data, exported=file)
    return file


@dataclass
class Prepared:
    """A checkpoint ready to trace: the QAT model (reference for parity), its folded copy and what folding did."""

    checkpoint: Path
    qat_model: object
    folded: object
    report: FoldReport
    imgsz: object
    int8: bool


def prepare(checkpoint_path: str | Path, imgsz=None, int8: bool = False) -> Prepared:
    """Load the checkpoint's exact fp32 QAT state and fold a copy of it (see :mod:`.fold`)."""
    import copy

    model, _ = load_qat_model(checkpoint_path, hint="yolo export")
    args = getattr(model, "args", None) or {}
    imgsz = imgsz or (args.get("imgsz") if isinstance(args, dict) else None) or 640
    model = model.float().eval()
    folded = copy.deepcopy(model)
    report = fold_model(folded, symmetric_int8=int8)
    return Prepared(Path(checkpoint_path), model, folded, report, imgsz, int8)


def check_options(dynamic=False, batch=1, half=False, simplify=True) -> dict:
    """The ONNX tracing options, or a one-line :class:`QATExportError` naming a wrong value and the fix."""
    for key, value in (("dynamic", dynamic), ("half", half), ("simplify", simplify)):
        if not isinstance(value, bool):
            raise QATExportError(f"{key}={value!r} must be True or False")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise QATExportError(f"batch={batch!r} must be a positive integer (the exported input's batch size), e.g. batch=1")
    return {"dynamic": dynamic, "batch": batch, "half": half, "simplify": simplify}


def write_onnx(prepared: Prepared, file: Path, opset: int, int4: bool, dynamic=False, batch=1, half=False,
               simplify=True):
    """Trace the folded model with Ultralytics' exporter and write the final Q/DQ graph; returns (proto, metadata)."""
    import onnx

    file.parent.mkdir(parents=True, exist_ok=True)
    written, metadata = _trace(prepared.folded, file, prepared.imgsz, min(opset, TRACE_OPSET), dynamic=dynamic,
                               batch=batch, simplify=simplify)
    written = Path(written)
    traced = onnx.load(str(written))  # Ultralytics' graph + metadata, codes in INT8; rewritten below
    if written != file:
        written.unlink(missing_ok=True)
    final = _finish(traced, prepared.report, opset, int4, half)
    onnx.save(final, str(file))
    if int4 and not _runs(file):  # an onnxruntime without INT4 DequantizeLinear: fall back to INT8 containers
        LOGGER.warning(f"{PREFIX} this onnxruntime cannot run INT4 weights; storing them in INT8 containers")
        final = _finish(traced, prepared.report, opset, False, half)
        onnx.save(final, str(file))
    return final, metadata


def _finish(traced, report: FoldReport, opset: int, int4: bool, half: bool):
    import onnx

    final = finalize(onnx.ModelProto.FromString(traced.SerializeToString()), report, opset, int4=int4)
    return half_float_layers(final) if half else final


def _trace(model, file: Path, imgsz, opset: int, dynamic=False, batch=1, simplify=True) -> tuple[str, dict]:
    """Run Ultralytics' exporter on the folded model (graph, onnxslim, metadata); returns the file and metadata.

    Its own log is silenced (warnings pass): it reports the size of the intermediate INT8-container graph, which
    is not the file written here.
    """
    import copy
    import logging

    from ultralytics.engine.exporter import Exporter
    from ultralytics.utils import LOGGER as UL_LOGGER

    model = copy.deepcopy(model)  # the exporter fuses and patches the model it is given
    model.pt_path = str(file.with_suffix(".pt"))  # the exporter names its output after the source checkpoint
    for p in model.parameters():
        p.requires_grad_(False)
    overrides = {"format": "onnx", "imgsz": imgsz, "opset": opset, "batch": batch, "device": "cpu", "data": None,
                 "simplify": simplify, "dynamic": dynamic, "nms": False, "verbose": False, "mode": "export"}
    exporter = Exporter(overrides=overrides)
    level = UL_LOGGER.level
    noise = _DropMessage("no one-to-one head")  # every v8/11 Detect head: not something to act on
    UL_LOGGER.setLevel(logging.WARNING)
    UL_LOGGER.addFilter(noise)
    try:
        written = exporter(model=model)
    finally:
        UL_LOGGER.setLevel(level)
        UL_LOGGER.removeFilter(noise)
    return written, dict(exporter.metadata)


class _DropMessage:
    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


class OnnxRunner:
    """Runs an exported ONNX file with onnxruntime on the CPU (the parity check's runtime)."""

    name = "onnxruntime"

    def __init__(self, file: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


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
    from onnx import TensorProto, numpy_helper

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
    for node in g.node:  # FP16 storage of float layers (half=True): the FP32 graph holds them in FP32
        if node.op_type == "Cast" and node.input[0] in inits and inits[node.input[0]].data_type == TensorProto.FLOAT16:
            values = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            new_inits.append(numpy_helper.from_array(values, node.output[0]))
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


def half_float_layers(proto):
    """Store the weights and biases of the convs left in float (no DequantizeLinear on their weight) in FP16.

    Each FP16 initializer feeds a ``Cast`` to FLOAT that replaces it, so the graph still computes in FP32 where the
    runtime does, and runtimes that build FP16 kernels (TensorRT ``--fp16``, OpenVINO GPU) fold the Cast away.
    Integer codes, scales and quantized convs' biases are untouched: the quantized layers stay exact.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    names = []
    for node in g.node:
        if node.op_type == "Conv" and node.input[1] in inits and inits[node.input[1]].data_type == TensorProto.FLOAT:
            names += [n for n in node.input[1:] if n in inits and inits[n].data_type == TensorProto.FLOAT]
    users = {}
    for node in g.node:
        for n in node.input:
            users.setdefault(n, []).append(node.op_type)
    casts = []
    for name in dict.fromkeys(names):
        if set(users[name]) != {"Conv"}:
            continue  # shared with something else: keep it as it is
        t = inits[name]
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), f"{name}_fp16")
        t.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}_cast"))
    for c in reversed(casts):  # before every consumer: graph nodes are in topological order
        g.node.insert(0, c)
    onnx.checker.check_model(proto)
    return proto


def tensorrt_profile_problems(proto) -> list[str]:
    """Why a graph is not what TensorRT's explicit-quantization (Q/DQ) parser fuses into INT8 convs; [] when it is.

    Checked: no UINT8 (or INT4) tensor anywhere, every QuantizeLinear/DequantizeLinear zero point INT8 and 0, weights
    INT8 per output channel (axis 0) with per-channel scales, every activation Q/DQ per tensor, every DequantizeLinear
    feeding a Conv, and the head's float layers (Conv with an initializer weight) without Q/DQ on their output.
    """
    from onnx import TensorProto, numpy_helper

    g = proto.graph
    consts = {t.name: t for t in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute})
    producers = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    for name, t in consts.items():
        if t.data_type in (TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4):
            problems.append(f"tensor '{name}' is {TensorProto.DataType.Name(t.data_type)}")
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        weight = n.op_type == "DequantizeLinear" and n.input[0] in consts
        if len(n.input) > 2 and n.input[2]:
            zp = consts.get(n.input[2])
            if zp is None or zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{n.op_type} '{n.name}' has a zero point that is not INT8 0")
        elif not weight:
            problems.append(f"{n.op_type} '{n.name}' has no zero point (UINT8 by default)")
        scale = numpy_helper.to_array(consts[n.input[1]]) if n.input[1] in consts else None
        if weight:
            axis = {a.name: a.i for a in n.attribute}.get("axis", 1)
            if consts[n.input[0]].data_type != TensorProto.INT8 or axis != 0:
                problems.append(f"weight DequantizeLinear '{n.name}' is not INT8 per output channel")
            if scale is None or scale.ndim != 1 or scale.size != consts[n.input[0]].dims[0]:
                problems.append(f"weight DequantizeLinear '{n.name}' has no per-channel scale")
        elif scale is None or scale.size != 1:
            problems.append(f"activation {n.op_type} '{n.name}' is not per tensor")
        if n.op_type == "DequantizeLinear" and any(c.op_type != "Conv" for c in consumers.get(n.output[0], [])):
            problems.append(f"DequantizeLinear '{n.name}' does not feed a Conv")
    for n in g.node:
        if n.op_type == "Conv" and n.input[1] in consts and consts[n.input[1]].data_type == TensorProto.FLOAT:
            after = [c.op_type for c in consumers.get(n.output[0], [])]
            if "QuantizeLinear" in after or (n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear"):
                problems.append(f"float Conv '{n.name}' has a Q/DQ on its input or output")
    return problems


def summary(proto, report: FoldReport, file: Path, size: int) -> str:
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
    fp32 = fp32_equivalent(proto).ByteSize()
    opset = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    weights = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
    lines = [
        f"{PREFIX} {len(report.quantized)} convs with integer weights per output channel, BN folded exactly ({weights})",
        f"{PREFIX} {len(acts)} activation Q/DQ per tensor: {len(u8)} UINT8 ({sum(a.zero_point != 0 for a in u8)} with a "
        f"nonzero zero point), {len(acts) - len(u8)} INT8; {clipped} clipped to a grid narrower than 8 bits"
        + (f"; {len(report.regridded)} 8-bit unsigned/affine grids moved to symmetric INT8 (one bit coarser: "
           "train them at 7 bits for an exact INT8 profile)" if report.regridded else ""),
        f"{PREFIX} left in float ({len(report.float_layers)}): {', '.join(report.float_layers) or 'none'}",
        f"{PREFIX} {file} {size / 1e6:.2f} MB vs {fp32 / 1e6:.2f} MB for the FP32 graph of the same model "
        f"({fp32 / size:.1f}x smaller), opset {opset}",
    ]
    return "\n".join(lines)
