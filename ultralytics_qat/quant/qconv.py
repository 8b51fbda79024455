"""QConv2d: an ``nn.Conv2d`` whose weight and input pass through LSQ fake quantizers.

It subclasses ``nn.Conv2d`` (and shares the original Parameters) so everything Ultralytics does with convs keeps
working: weight init, parameter grouping, EMA pairing by state_dict key, and BN fusion. Fusion folds BN into the
weights; ``weight_quantizer`` lets Ultralytics' ``fuse_conv_and_bn`` rescale the per-channel weight range along with
it (its documented hook), so the integer codes stay the same after ``model.fuse()``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import lsq_conv2d
from .quantizer import LSQQuantizer


class _FoldableRange:
    """The ``amax`` view of a weight quantizer that ``ultralytics.utils.torch_utils.fuse_conv_and_bn`` rescales.

    Ultralytics multiplies ``amax`` by |gamma / sigma| per output channel when it folds BN; scaling the step size by
    the same factor keeps round(w / s) unchanged. A per-tensor scale becomes per-channel here (inference only).
    """

    def __init__(self, conv: QConv2d):
        self._conv = conv

    @property
    def amax(self) -> torch.Tensor:
        q = self._conv.weight_fake_quant
        return q.scale.detach().expand(self._conv.out_channels).clone()

    @amax.setter
    def amax(self, value: torch.Tensor) -> None:
        q = self._conv.weight_fake_quant
        value = value.detach().reshape(-1).to(q.scale.dtype)
        q.scale = nn.Parameter(value, requires_grad=False)


class QConv2d(nn.Conv2d):
    """Conv2d with fake-quantized weight (``weight_fake_quant``) and optional fake-quantized input."""

    weight_fake_quant: LSQQuantizer
    input_fake_quant: LSQQuantizer | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_fake_quant: LSQQuantizer, input_fake_quant: LSQQuantizer | None) -> QConv2d:
        """Wrap ``conv`` without copying: the new module holds the same weight and bias Parameters."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q.train(conv.training)
        q.weight_fake_quant = weight_fake_quant.to(conv.weight.device)
        q.input_fake_quant = None if input_fake_quant is None else input_fake_quant.to(conv.weight.device)
        return q

    @property
    def weight_quantizer(self) -> _FoldableRange:
        """Hook used by Ultralytics' BN fusion to rescale the weight range (see module docstring)."""
        return _FoldableRange(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fake_quant(self.weight)
        aq = self.input_fake_quant
        if aq is None:
            return self._conv_forward(x, w, self.bias)
        if self._fusable(x, aq):  # training: save only x, not also its fake-quantized copy
            return lsq_conv2d(x, aq.scale, aq.qn, aq.qp, aq.grad_scale(x.numel()), w, self.bias, self.stride,
                              self.padding, self.dilation, self.groups, aq.pulse_delta)
        return self._conv_forward(aq(x), w, self.bias)

    def _fusable(self, x: torch.Tensor, aq: LSQQuantizer) -> bool:
        return (
            torch.is_grad_enabled()
            and aq._initialized
            and aq._observer is None
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not torch.is_autocast_enabled(x.device.type)
        )
