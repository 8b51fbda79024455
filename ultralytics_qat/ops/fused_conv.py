"""Input fake quantization fused with the convolution that consumes it, to keep QAT memory at the float level.

Unfused, autograd keeps two activations per quantized conv: the float input (for the LSQ backward) and its
fake-quantized copy (for the conv's weight gradient). Here only the float input is saved; the fake-quantized copy is
recomputed in the backward (one cheap elementwise pass) and fed to ``aten.convolution_backward``. The math is that of
``conv2d(lsq_fake_quantize(x), w, b)`` exactly: same forward, same gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import _lsq_backward_op, _lsq_op


class _LSQConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight, bias, qn, qp, grad_scale, pulse_delta, stride, padding, dilation, groups):  # noqa: D102
        q = _lsq_op(x, scale, qn, qp, grad_scale, None, pulse_delta, 0.0, None)
        y = F.conv2d(q, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, scale, weight)
        ctx.conf = (qn, qp, grad_scale, pulse_delta, stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, scale, weight = ctx.saved_tensors
        qn, qp, grad_scale, pulse_delta, stride, padding, dilation, groups, has_bias = ctx.conf
        q = _lsq_op(x, scale, qn, qp, grad_scale, None, pulse_delta, 0.0, None)  # recomputed, not stored
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_q, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, q, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0],
            groups, [need_x, ctx.needs_input_grad[2], has_bias and ctx.needs_input_grad[3]],
        )
        del q
        grad_x = grad_s = None
        if need_x:
            grad_x, grad_s = _lsq_backward_op(grad_q, x, scale, qn, qp, grad_scale, None, pulse_delta, 0.0, None)
        return grad_x, grad_s, grad_w, grad_b, None, None, None, None, None, None, None, None


def lsq_conv2d(
    x: Tensor,
    scale: Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    pulse_delta: float = 0.0,
) -> Tensor:
    """``conv2d(lsq_fake_quantize(x, scale, qn, qp, grad_scale), weight, bias, ...)`` saving only ``x`` for backward.

    ``scale`` is a per-tensor [1] scale; ``weight`` is used as given (fake-quantize it before, with its own graph).
    String paddings ("same") are not supported: pass the explicit padding.
    """
    return _LSQConv2d.apply(x, scale, weight, bias, int(qn), int(qp), float(grad_scale), float(pulse_delta),
                            tuple(stride), tuple(padding), tuple(dilation), int(groups))
