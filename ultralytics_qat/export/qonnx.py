"""QONNX export: each quantized conv as ``Quant`` nodes with the layer's own bit width (2-8), scale and zero point.

QONNX (FINN, hls4ml) describes low-bit tensors with one op, ``Quant(x, scale, zeropt, bitwidth)``: ``q =
clamp(round(x / scale + zeropt), min_int, max_int)``, output ``(q - zeropt) * scale``, where ``signed``, ``narrow``
and ``bitwidth`` give the integer range. Every learned grid maps onto it exactly:

- weights: the BN-folded float weight ``codes * scale`` (exact in fp32, so ``round(w / scale)`` gives the codes back),
  per output channel, signed, ``narrow`` as trained, zero point 0;
- activations: the grid ``[qn, qp]`` of ``b`` bits is signed ([-2^(b-1), 2^(b-1)-1], or narrow) with zero point 0,
  or unsigned with zero point ``-qn`` when it spans ``2^b - 1`` steps (the unsigned and SiLU-affine grids).

The graph is the Q/DQ ONNX graph (INT8 containers) with each [Clip] -> QuantizeLinear -> DequantizeLinear chain and
each weight DequantizeLinear replaced; everything else (SiLU, concat, the float head, DFL) is unchanged.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from ..utils import LOGGER
from .fold import FoldReport, QATExportError
from .onnx import PREFIX, TRACE_OPSET, check_export_requirements, check_options, prepare, weight_nodes, write_onnx

QONNX_DOMAIN = "qonnx.custom_op.general"


def check_qonnx() -> None:
    if importlib.util.find_spec("qonnx") is None:
        raise QATExportError('format=qonnx needs qonnx, which is not installed; install the export extra: '
                             'pip install "ultralytics-qat[export]"')


def grid_attributes(qn: int, qp: int, bits: int) -> tuple[int, int, int]:
    """(signed, narrow, zero point) of the QONNX ``Quant`` whose integer range is the grid ``[qn, qp]`` at ``bits``."""
    half = 2 ** (bits - 1)
    if (qn, qp) == (-half, half - 1):
        return 1, 0, 0
    if (qn, qp) == (-half + 1, half - 1):
        return 1, 1, 0
    if qn <= 0 <= qp and qp - qn == 2**bits - 1:
        return 0, 0, -qn
    if qn <= 0 <= qp and qp - qn == 2**bits - 2:
        return 0, 1, -qn
    raise QATExportError(f"the {bits}-bit grid [{qn}, {qp}] has no QONNX Quant form; please report this")


def weight_attributes(codes: np.ndarray, grid: tuple[int, int], bits: int) -> tuple[int, int]:
    """(bit width, narrow) of the signed weight ``Quant``: as trained, one bit more where BN's sign moved qn to -qn."""
    qn, qp = grid
    half = 2 ** (bits - 1)
    if codes.min() >= qn and codes.max() <= qp:
        return bits, int(qn == -qp)
    if codes.min() >= -half and codes.max() <= half - 1:
        return bits, 0
    return bits + 1, 0  # the fold's full-range case: +2^(b-1) needs one bit more (fold.py warned)


def export_qonnx(checkpoint_path: str | Path, imgsz=None, opset: int | None = None, file: str | Path | None = None,
                 *, dynamic: bool = False, batch: int = 1, simplify: bool = True, data: str | None = None,
                 parity: bool = True) -> Path:
    """Export a QAT checkpoint to QONNX (``<stem>_qonnx.onnx``), checked with qonnx's own executor.

    Args:
        checkpoint_path: ``best.pt`` / ``last.pt`` of a yolo-qat run.
        imgsz, dynamic, batch, simplify, parity: as for :func:`~.onnx.export_onnx`.
        opset: Default-domain opset of the graph (default 18).
        file: Output path; default ``<checkpoint stem>_qonnx.onnx`` next to the checkpoint.
        data: Accepted for symmetry; Ultralytics cannot run QONNX, so no mAP is computed (validate the ONNX export).

    Returns:
        Path of the written file.
    """
    check_export_requirements()
    check_qonnx()
    import onnx

    from .onnx import _resolve_opset

    target = _resolve_opset(opset if opset is not None else TRACE_OPSET)
    ckpt = Path(checkpoint_path)
    file = Path(file) if file is not None else ckpt.with_name(f"{ckpt.stem}_qonnx.onnx")
    if file.suffix != ".onnx":
        raise QATExportError(f"file='{file}' must end in .onnx")
    opts = check_options(dynamic=dynamic, batch=batch, half=False, simplify=simplify)
    prepared = prepare(checkpoint_path, imgsz)
    with tempfile.TemporaryDirectory(prefix="qat_qonnx_") as tmp:
        proto, metadata = write_onnx(prepared, Path(tmp) / "qdq.onnx", target, int4=False, **opts)
    qproto = to_qonnx(proto, prepared.report)
    file.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qproto, str(file))
    LOGGER.info(qonnx_summary(qproto, prepared.report, file))
    if parity:
        from .parity import report_parity

        report_parity(prepared, QonnxRunner(file), metadata["imgsz"], batch=batch, data=data, exported=None, n=2)
    return file


def _constant(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise QATExportError(f"internal: '{name}' is not a constant of the traced graph; please report this")


def to_qonnx(proto, report: FoldReport):
    """The Q/DQ graph (INT8 containers) with every quantized conv's Q/DQ replaced by QONNX ``Quant`` nodes."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    wnodes = weight_nodes(proto)
    replace, drop, inits = {}, set(), []

    def scalar(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    for name, layer in report.quantized.items():
        dq = wnodes[f"{name}.codes"]
        codes = _constant(proto, dq.input[0]).astype(np.int8)
        scale = _constant(proto, dq.input[1]).astype(np.float32)
        bits, narrow = weight_attributes(codes, layer.weight_grid, layer.bits)
        shape = (-1,) + (1,) * (codes.ndim - 1)
        inits.append(numpy_helper.from_array(codes.astype(np.float32) * scale.reshape(shape), f"{name}.weight"))
        inits.append(numpy_helper.from_array(scale.reshape(shape), f"{name}.weight_scale"))
        replace[id(dq)] = helper.make_node(
            "Quant", [f"{name}.weight", f"{name}.weight_scale", scalar(f"{name}.weight_zeropt", 0.0),
                      scalar(f"{name}.weight_bits", bits)], [dq.output[0]], name=f"{name}.weight_quant",
            domain=QONNX_DOMAIN, signed=1, narrow=narrow, rounding_mode="ROUND")
        a = layer.act
        if a is None:
            continue
        conv = consumers[dq.output[0]][0]
        dqa = producers[conv.input[0]]
        qa = producers[dqa.input[0]]
        clip = producers.get(qa.input[0])
        src = clip.input[0] if clip is not None and clip.op_type == "Clip" else qa.input[0]
        if src != qa.input[0]:
            drop.add(id(clip))
        drop.add(id(qa))
        signed, narrow_a, zp = grid_attributes(a.qn, a.qp, a.bits)
        replace[id(dqa)] = helper.make_node(
            "Quant", [src, scalar(f"{name}.act_scale", np.float32(a.scale)), scalar(f"{name}.act_zeropt", zp),
                      scalar(f"{name}.act_bits", a.bits)], [dqa.output[0]], name=f"{name}.act_quant",
            domain=QONNX_DOMAIN, signed=signed, narrow=narrow_a, rounding_mode="ROUND")
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + inits)
    constants = [n for n in g.node if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(constants)
    proto.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    return proto


def qonnx_summary(proto, report: FoldReport, file: Path) -> str:
    """Bit widths of the Quant nodes and the file size (one size line)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    widths = {"weight": {}, "act": {}}
    for n in proto.graph.node:
        if n.op_type == "Quant":
            kind = "weight" if n.name.endswith(".weight_quant") else "act"
            b = int(numpy_helper.to_array(inits[n.input[3]]))
            widths[kind][b] = widths[kind].get(b, 0) + 1
    def fmt(d):
        return ", ".join(f"{c} at {b} bits" for b, c in sorted(d.items()))
    return "\n".join([
        f"{PREFIX} QONNX Quant nodes: weights {fmt(widths['weight'])}; activations {fmt(widths['act'])}",
        f"{PREFIX} left in float ({len(report.float_layers)}): {', '.join(report.float_layers) or 'none'}",
        f"{PREFIX} {file} {file.stat().st_size / 1e6:.2f} MB (float weights with Quant nodes: QONNX stores no "
        "integer tensors; FINN / hls4ml pack them at their bit width)",
    ])


class QonnxRunner:
    """qonnx's own reference executor (``qonnx.core.onnx_exec.execute_onnx``): node by node, Quant in numpy."""

    name = "qonnx.core.onnx_exec"

    def __init__(self, file: Path):
        from qonnx.core.modelwrapper import ModelWrapper

        self.model = ModelWrapper(str(file))
        self.input = self.model.graph.input[0].name
        self.output = self.model.graph.output[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.output]

    def run(self, x: np.ndarray, full: bool = False) -> dict:
        from qonnx.core.onnx_exec import execute_onnx

        return execute_onnx(self.model, {self.input: x}, return_full_exec_context=full)
