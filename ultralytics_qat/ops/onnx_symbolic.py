"""ONNX symbolic of ``ultralytics_qat::lsq_fake_quant`` for the TorchScript exporter that Ultralytics' own
``yolo export`` uses, so a QAT checkpoint exports there too instead of failing on an unknown operator.

``clamp(round(x / s), qn, qp) * s`` becomes Min/Max (the grid's clip, per channel by broadcast) followed by
QuantizeLinear/DequantizeLinear with INT8 (signed grids) or UINT8 and zero point ``-qn`` (zero-point activation grids)
containers. ``yolo-qat export`` remains the better route: INT4 weights at opset 21, its own exact BN fold and a parity
check; this one exists so that plain Ultralytics gives a correct Q/DQ graph rather than a traceback.
"""

from __future__ import annotations

import torch

from .reference import SCALE_EPS

OP = "ultralytics_qat::lsq_fake_quant"
_INT8, _UINT8 = 3, 2  # onnx.TensorProto element types


def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def lsq_fake_quant_symbolic(g, x, scale, qn, qp, grad_scale, ch_axis, pulse_delta, dist_k, frozen):
    from torch.onnx import symbolic_helper as sh

    qn, qp = sh._get_const(qn, "i", "qn"), sh._get_const(qp, "i", "qp")
    axis = None if sh._is_none(ch_axis) else sh._get_const(ch_axis, "i", "ch_axis")
    signed = -128 <= qn < 0 and qp <= 127
    if not signed and not (qn <= 0 and qp - qn <= 255):
        raise ValueError(f"grid [{qn}, {qp}] does not fit an 8-bit ONNX container")
    zero_point = 0 if signed or qn == 0 else -qn
    s = g.op("Max", scale, _const(g, SCALE_EPS))
    if axis is None:
        s = g.op("Reshape", s, _const(g, [], torch.int64))  # a scalar scale: per-tensor Q/DQ
        shape = s
    else:
        rank = sh._get_tensor_rank(x) or 4
        shape = g.op("Reshape", s, _const(g, [-1] + [1] * (rank - 1 - axis), torch.int64))
    clipped = g.op("Min", g.op("Max", x, g.op("Mul", shape, _const(g, float(qn)))), g.op("Mul", shape, _const(g, float(qp))))
    zp = g.op("Cast", g.op("Add", g.op("Mul", s, _const(g, 0.0)), _const(g, float(zero_point))),
              to_i=_INT8 if signed else _UINT8)
    kw = {} if axis is None else {"axis_i": axis}
    return g.op("DequantizeLinear", g.op("QuantizeLinear", clipped, s, zp, **kw), s, zp, **kw)


def register() -> None:
    """Register the symbolic for every opset that has per-axis Q/DQ (13+)."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic(OP, lsq_fake_quant_symbolic, 13)
