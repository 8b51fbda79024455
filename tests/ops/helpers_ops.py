"""Shared helpers of the ops tests."""

from __future__ import annotations

import torch

# Every integer grid the kernels must handle: signed and unsigned 2..8 bit, and an asymmetric one.
SIGNED = [(-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in range(2, 9)]
UNSIGNED = [(0, 2**b - 1) for b in range(2, 9)]
RANGES = SIGNED + UNSIGNED + [(-1, 14)]


def run(fn, x, scale, go, *args, **kwargs):
    """(y, grad_x, grad_scale) of ``fn(x, scale, *args)`` for upstream gradient ``go``."""
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    y = fn(x, scale, *args, **kwargs)
    y.backward(go)
    return y.detach(), x.grad, scale.grad


def grad_s_tol(x, scale, go, grad_scale, ch_axis=None):
    """Absolute tolerance for grad_scale: 1e-5 of the sum of |g * t| (t <= qp in size), per scale value."""
    mag = (go.float().abs() * (x.float().abs() / scale.float().abs().max() + 1)).sum()
    return float(mag) * abs(grad_scale) * 1e-5 + 1e-12


def assert_lsq_close(a, b, tol_s, exact_grad_x=True):
    """Forward bitwise, grad_x bitwise (or within 1e-6 relative), grad_s within ``tol_s``."""
    assert a[0].dtype == b[0].dtype and a[0].shape == b[0].shape
    assert torch.equal(a[0], b[0]), f"forward differs at {(a[0] != b[0]).sum()} elements"
    if exact_grad_x:
        assert torch.equal(a[1], b[1]), f"grad_x differs at {(a[1] != b[1]).sum()} elements"
    else:
        torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-7)
    assert a[2].shape == b[2].shape and a[2].dtype == b[2].dtype
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=tol_s)
