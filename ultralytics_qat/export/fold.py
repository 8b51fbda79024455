"""Exact BN folding and the export-time conv whose ONNX form is QuantizeLinear/DequantizeLinear.

A QAT conv computes ``conv(A(x), c * s)`` followed by BN, with integer weight codes ``c = clamp(round(w / s), qn, qp)``
and ``A`` the activation fake quantizer. BN is a per-channel affine ``y * f + (beta - mean * f)``,
``f = gamma / sqrt(var + eps)``, so it folds into the weights *without touching the codes*:

    weight = (c * sign(f)) * (s * |f|)        bias = beta + (b - mean) * f

The codes are computed once, before folding, and stored as integers; only the float scale absorbs BN. Folding the
float weights and re-quantizing them (what ``model.fuse()`` plus a rescaled range does) can move a code by one step
wherever ``w / s`` sits near a rounding boundary, and the re-rounded grid is no longer the trained one.

Negating codes is exact on a narrow (symmetric) grid. On a full-range grid a code ``qn = -2^(b-1)`` in a channel with
``f < 0`` becomes ``2^(b-1)``, one past the signed b-bit range: such a layer is stored in a wider container (INT8 for
<= 7 bits) with a warning, and an 8-bit one cannot be stored at all (:class:`QATExportError` names the fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QATExportError
from ..ops.reference import SCALE_EPS, lsq_forward
from ..quant import LSQQuantizer, QConv2d
from ..utils import LOGGER


# -- activations: which 8-bit container holds a grid ------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationQuant:
    """How one activation grid ``s * [qn, qp]`` is written as ONNX Clip -> QuantizeLinear -> DequantizeLinear.

    Containers are always 8 bits (what every runtime quantizes activations to). A grid that fits [-128, 127] (every
    grid below 8 bits, and the signed 8-bit grid) goes to INT8 with zero point 0: its levels are the integers
    qn..qp themselves, and symmetric INT8 with zero point 0 is the only activation format TensorRT accepts. Only an
    8-bit unsigned or affine grid ([0, 255], [-z, 255-z]) needs UINT8 with zero point ``-qn``. A grid narrower than its
    container adds ``Clip(qn * s, qp * s)`` *before* QuantizeLinear. That is exact: inside the clip
    the ops are the fake quantizer's own ``round(x / s)``; a clipped value is ``fl(qp * s)``, whose ``/ s`` is within
    qp * 2^-23 of qp and rounds back to it. Clip before Q (not after DQ) keeps each DequantizeLinear adjacent to its
    Conv, the pattern TensorRT and ONNX Runtime fuse into integer convolutions, and lets the Clip fuse into the
    producer.
    """

    scale: float
    qn: int
    qp: int
    bits: int

    @property
    def signed(self) -> bool:
        """True when the grid fits a signed INT8 container with zero point 0."""
        return self.qn >= -128 and self.qp <= 127

    @property
    def zero_point(self) -> int:
        return 0 if self.signed else -self.qn

    @property
    def container(self) -> str:
        return "int8" if self.signed else "uint8"

    @property
    def clip(self) -> bool:
        """True when the container saturates outside the grid, so a Clip must restore the learned range."""
        lo, hi = (-128, 127) if self.signed else (0, 255)
        return (self.qn + self.zero_point, self.qp + self.zero_point) != (lo, hi)

    @classmethod
    def from_quantizer(cls, q: LSQQuantizer, name: str) -> ActivationQuant:
        if q.scale.numel() != 1:
            raise QATExportError(
                f"activation quantizer of '{name}' has {q.scale.numel()} scales; export needs one per tensor"
            )
        if not (q.qn <= 0 <= q.qp and q.qp - q.qn <= 255):
            raise QATExportError(f"activation grid [{q.qn}, {q.qp}] of '{name}' does not fit an 8-bit container")
        return cls(float(q.scale.detach().float().clamp_min(SCALE_EPS)), q.qn, q.qp, q.bits)

    def symmetric_int8(self) -> ActivationQuant:
        """This grid if it fits INT8 with zero point 0, else the symmetric INT8 grid covering its range (TensorRT).

        Only 8-bit unsigned/affine grids change: ``s' = s * max(-qn, qp) / 127`` and the grid ends rounded onto the
        new steps, i.e. one bit of resolution is lost on that tensor (the export reports it; training those layers
        at 7 bits, or with a signed grid, keeps the TensorRT graph exact).
        """
        if self.signed:
            return self
        step = self.scale * max(-self.qn, self.qp) / 127
        lo, hi = (max(-127, min(127, round(q * self.scale / step))) for q in (self.qn, self.qp))
        return ActivationQuant(step, lo, hi, 8)


# -- weights: exact fold -------------------------------------------------------------------------------------------
@dataclass
class FoldedWeight:
    """Integer codes (container dtype int8), per-output-channel float scale and float bias of one folded conv."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    container_bits: int  # 4 or 8: the narrowest signed container holding the (possibly negated) codes


@torch.no_grad()
def weight_codes(conv: QConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``clamp(round(w / s), qn, qp)`` of a QAT conv (as its fake quantizer computes them) and s [C]."""
    q = conv.weight_fake_quant
    s = q.scale.detach().float().clamp_min(SCALE_EPS).expand(conv.out_channels).clone()
    c = torch.div(conv.weight.detach().float(), s.view(-1, 1, 1, 1)).round_().clamp_(q.qn, q.qp)
    return c, s


@torch.no_grad()
def fold_weight(conv: QConv2d, bn: nn.BatchNorm2d | None, name: str = "") -> FoldedWeight:
    """Fold ``bn`` into ``conv`` exactly: codes * sign(f), scale * |f| (see module docstring)."""
    q = conv.weight_fake_quant
    codes, scale = weight_codes(conv)
    bias = None if conv.bias is None else conv.bias.detach().double()
    if bn is not None:
        f = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        sign = torch.where(f < 0, -1.0, 1.0).to(codes.dtype)
        codes = codes * sign.view(-1, 1, 1, 1)
        dead = f == 0  # gamma == 0: the channel is the constant beta; any positive scale with zero codes is exact
        codes[dead] = 0
        scale = torch.where(dead, scale.double(), scale.double() * f.abs()).float()
        b = torch.zeros_like(f) if bias is None else bias
        bias = bn.bias.detach().double() + (b - bn.running_mean.detach().double()) * f
    lo, hi = int(codes.min()), int(codes.max())
    half = 2 ** (q.bits - 1)
    if -half <= lo and hi < half:
        container = 4 if q.bits <= 4 else 8
    elif q.bits < 8:  # only a full-range grid with a negated qn gets here: +2^(b-1) needs one more bit
        container = 8
        LOGGER.warning(
            f"QAT export: '{name}' has a full-range {q.bits}-bit grid and negative BN gamma at code {q.qn}; its codes "
            f"are stored in INT8 to stay exact (train with qat.weight.narrow_range=true to avoid this)"
        )
    else:
        raise QATExportError(
            f"'{name}' has a full-range 8-bit weight grid and a negative BN gamma at code -128, which cannot be stored "
            "in INT8 exactly; retrain with qat.weight.narrow_range=true"
        )
    bias = None if bias is None else bias.float()
    return FoldedWeight(codes.to(torch.int8), scale.contiguous(), bias, q.bits, container)


# -- the export-time conv ------------------------------------------------------------------------------------------
class _WeightDQ(torch.autograd.Function):
    """``codes * scale`` per output channel; ONNX: ``DequantizeLinear(codes, scale, axis=0)`` on the initializers."""

    @staticmethod
    def forward(ctx, codes, scale):  # noqa: D102
        return codes.float() * scale.view(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scale):  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, axis_i=0)  # zero point omitted: 0, type of the codes


class _ActQDQ(torch.autograd.Function):
    """The activation fake quantizer; ONNX: [Clip] -> QuantizeLinear -> DequantizeLinear (see ActivationQuant)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi, qn, qp, clip):  # noqa: D102
        return lsq_forward(x, scale, qn, qp)

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi, qn, qp, clip):  # noqa: D102
        if clip:
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class QDQConv2d(nn.Module):
    """A BN-folded QAT conv holding integer weight codes; exports as Q/DQ + Conv, runs the same math in PyTorch.

    Buffers become ONNX initializers named after the module (``model.0.conv.codes``), which is how the ONNX pass
    finds each layer's codes again (e.g. to repack <= 4-bit codes as INT4).
    """

    def __init__(self, conv: QConv2d, folded: FoldedWeight, act: ActivationQuant | None):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        if conv.padding_mode != "zeros":
            raise QATExportError(f"conv padding_mode='{conv.padding_mode}' is not supported by QAT export")
        self.bits, self.container_bits, self.act = folded.bits, folded.container_bits, act
        self.weight_grid = (conv.weight_fake_quant.qn, conv.weight_fake_quant.qp)  # the trained grid (QONNX needs it)
        self.register_buffer("codes", folded.codes)
        self.register_buffer("scale", folded.scale)
        self.register_buffer("bias", folded.bias)
        if act is not None:
            zp_dtype = torch.int8 if act.container == "int8" else torch.uint8
            self.register_buffer("act_scale", torch.tensor(act.scale, dtype=torch.float32))
            self.register_buffer("act_zero_point", torch.tensor(act.zero_point, dtype=zp_dtype))
            self.register_buffer("act_lo", torch.tensor(act.qn, dtype=torch.float32) * self.act_scale)
            self.register_buffer("act_hi", torch.tensor(act.qp, dtype=torch.float32) * self.act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act
        if a is not None:
            x = _ActQDQ.apply(x, self.act_scale, self.act_zero_point, self.act_lo, self.act_hi, a.qn, a.qp, a.clip)
        w = _WeightDQ.apply(self.codes, self.scale)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        a = "float" if self.act is None else f"{self.act.bits}-bit {self.act.container} zp={self.act.zero_point}"
        w = f"W{self.bits} (INT{self.container_bits})"
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, {w}, A {a}"


@dataclass
class FoldReport:
    """What :func:`fold_model` did: quantized layers by name and the convs left in float."""

    quantized: dict[str, QDQConv2d] = field(default_factory=dict)
    float_layers: list[str] = field(default_factory=list)
    regridded: list[str] = field(default_factory=list)  # 8-bit unsigned/affine inputs moved to symmetric INT8


def _bn_of(parent: nn.Module, attr: str) -> nn.BatchNorm2d | None:
    bn = getattr(parent, "bn", None) if attr == "conv" else None
    return bn if isinstance(bn, nn.BatchNorm2d) else None


@torch.no_grad()
def fold_model(model: nn.Module, symmetric_int8: bool = False) -> FoldReport:
    """Replace every QConv2d (and the BN after it) by a :class:`QDQConv2d` in place; fold BN of float convs too.

    ``symmetric_int8``: every activation grid in INT8 with zero point 0 (:meth:`ActivationQuant.symmetric_int8`).

    Every Ultralytics ``Conv`` ends up BN-free with ``forward_fuse``, so ``model.fuse()`` (called by Ultralytics'
    exporter) finds nothing left to fold and cannot re-round the codes.
    """
    from ultralytics.nn.modules.block import RepVGGDW
    from ultralytics.nn.modules.conv import Conv, Conv2, RepConv
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    report = FoldReport()
    modules = dict(model.named_modules())
    for name, m in list(modules.items()):
        if isinstance(m, (Conv2, RepConv, RepVGGDW)) and any(isinstance(c, QConv2d) for c in m.modules()):
            raise QATExportError(
                f"'{name}' ({type(m).__name__}) merges branches at inference; QAT export cannot fold it exactly"
            )
    for name, m in list(modules.items()):
        if isinstance(m, QConv2d):
            parent_name, attr = name.rsplit(".", 1)
            parent = modules[parent_name]
            bn = _bn_of(parent, attr)
            folded = fold_weight(m, bn, name)
            act = None if m.input_fake_quant is None else ActivationQuant.from_quantizer(m.input_fake_quant, name)
            if act is not None and symmetric_int8 and not act.signed:
                act = act.symmetric_int8()
                report.regridded.append(name)
            new = QDQConv2d(m, folded, act)
            setattr(parent, attr, new)
            report.quantized[name] = new
            if bn is not None:
                delattr(parent, "bn")
                parent.forward = parent.forward_fuse
        elif isinstance(m, nn.Conv2d):
            parent_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
            parent = modules.get(parent_name)
            report.float_layers.append(name)
            if isinstance(parent, Conv) and attr == "conv" and _bn_of(parent, attr) is not None:
                parent.conv = fuse_conv_and_bn(m, parent.bn)
                delattr(parent, "bn")
                parent.forward = parent.forward_fuse
    return report
