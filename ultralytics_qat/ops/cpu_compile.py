"""The fast CPU path of LSQ: the PyTorch twin's forward and backward compiled once by TorchInductor.

Why: eager PyTorch spends ~10 memory passes (and as many page-faulting allocations) on the backward, and the builtin
``torch._fake_quantize_learnable_*`` ops run a scalar loop that also computes a zero-point gradient; one fused,
vectorised loop is 10-30x faster than either (``scripts/bench_ops.py``). The forward is one fused pass too (fp32),
bitwise the twin's 4 in-place passes.

How: ``reference.lsq_backward_terms`` is compiled with ``dynamic=True`` and with qn, qp, PulseSmooth delta and k as 0-d
tensors, so one graph per kind (per-tensor | per-channel with rows up to / over 4096, dtype, frozen mask, distance
scaling) serves every shape, bit width and layer. Graphs are cached on disk by Inductor (cold ~8-10 s for the first,
~1-3 s warm, per process). Each kind is its own ``async_compile.AsyncCompiled`` unit, which keeps every call's guards
equal to its warm-up's, so a training run compiles each kind once, whatever the image sizes.

``ULTRALYTICS_QAT_CPU_COMPILE`` chooses when (see :func:`compile_mode`):

- ``async`` (default): the first call of a kind runs eager and starts the compile on a background thread, so the first
  training step is not held up; later calls use the compiled graph once it is ready. Under deterministic training
  (``torch.are_deterministic_algorithms_enabled()``) it acts as ``sync``.
- ``sync``: compile on the first call (blocks it; used by the tests and the benchmark).
- ``off``: eager only.

Inference-mode calls (validation, BN re-estimation under ``torch.inference_mode``) always run the eager twin: their
tensors differ in a guarded property (dispatch keys), and compiling them too would spend the training graph's
recompile budget. Any failure (no C++ compiler, unsupported Python, ...) logs one warning with its reason and falls
back to eager for the process. ``ops.cpu_compile_paths()`` reports which path the calls took.
"""

from __future__ import annotations

import os
import threading

import torch

from .async_compile import AsyncCompiled, warm_randn
from .reference import SCALE_EPS, lsq_backward_terms

CPU_COMPILE_ENV = "ULTRALYTICS_QAT_CPU_COMPILE"
MODES = ("async", "sync", "off")
MIN_NUMEL = 1 << 14  # below this eager costs the same (~50 us), so small weights never wait for a compile
# Inductor's CPU sum switches to a chunked accumulator above 4096 elements per reduction and guards on that, so a
# graph warmed on short rows would recompile (on the caller's thread) for long ones: warm each side separately.
ACC_CHUNK = 4096


def _bwd_per_tensor(g, x, s, qn, qp, pulse_on, pulse_delta, dist_k, frozen, has_dist: bool):
    gx, prod = lsq_backward_terms(g, x, s, qn, qp, pulse_delta, dist_k, frozen, pulse_on, has_dist)
    return gx.to(x.dtype), prod.sum()


def _bwd_per_channel(g, x, s, qn, qp, pulse_on, pulse_delta, dist_k, frozen, has_dist: bool):
    gx, prod = lsq_backward_terms(g, x, s, qn, qp, pulse_delta, dist_k, frozen, pulse_on, has_dist)
    return gx.to(x.dtype), prod.sum(dim=1)


def _backward_name(key: tuple) -> str:
    per_channel, long_rows, dtype, frozen_dtype, has_dist = key
    parts = ["per channel" + (", long rows" if long_rows else "") if per_channel else "per tensor", str(dtype)[6:]]
    parts += [f"frozen {str(frozen_dtype)[6:]}"] if frozen_dtype is not None else []
    parts += ["distance scaling"] if has_dist else []
    return f"LSQ backward ({', '.join(parts)})"


def _backward_warm(key: tuple):
    """The warm-up of ``key``: small fixed examples (sizes are symbolic, so they generalise; values do not matter)."""
    per_channel, long_rows, dtype, frozen_dtype, has_dist = key
    shape = (4, 2 * ACC_CHUNK if long_rows else 16) if per_channel else (MIN_NUMEL,)

    def warm(fn) -> None:
        g = warm_randn(*shape).to(dtype)
        x = (g * 4).to(dtype)
        s = torch.full((4, 1) if per_channel else (), 0.5)
        frozen = None if frozen_dtype is None else torch.zeros(shape, dtype=frozen_dtype)
        fn(g, x, s, *_scalar_tensors(-8, 7, 0.1, 0.5), frozen, has_dist)

    return warm


class _BackwardCompiler:
    """One compiled unit per kind of backward call (its key, see ``lsq_backward_compiled``), made on first use.

    Each kind is its own unit (own graph, own recompile budget) instead of guards of one function: a frozen mask, a
    dtype or long rows never evict or recompile another kind's graph.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.units: dict[tuple, AsyncCompiled] = {}

    def unit(self, key: tuple) -> AsyncCompiled:
        with self.lock:
            if key not in self.units:
                fn = _bwd_per_channel if key[0] else _bwd_per_tensor
                self.units[key] = AsyncCompiled(fn, _backward_warm(key), _backward_name(key), "lsq_backward")
            return self.units[key]

    @property
    def failed(self) -> bool:
        return any(u.failed for u in self.units.values())

    @property
    def fns(self) -> dict[tuple, object]:
        """The compiled callable of every kind that is ready."""
        return {k: u.fn for k, u in self.units.items() if u.fn is not None}

    def warm(self, key: tuple) -> None:
        """Compile ``key`` now, on this thread (``scripts/bench_ops.py`` times it)."""
        self.unit(key).get("sync")


_COMPILER = _BackwardCompiler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_COMPILER.reset)  # units reset themselves; the lock may be held by a dead thread


def _scalar_tensors(qn, qp, pulse_delta, dist_k):
    pulse_on = torch.tensor(bool(pulse_delta))
    return (
        torch.tensor(float(qn)),
        torch.tensor(float(qp)),
        pulse_on,
        torch.tensor(float(pulse_delta) if pulse_delta else 0.25),
        torch.tensor(float(dist_k)),
    )


def compile_mode() -> str:
    """When to compile: ``ULTRALYTICS_QAT_CPU_COMPILE`` (``async`` when unset), ``sync`` under deterministic training.

    Deterministic training (``torch.use_deterministic_algorithms(True)``, which Ultralytics' ``deterministic=True``
    sets) compiles on first use and runs compiled from the first step: in the background the switch from the eager
    twin would land on a time-dependent step, and the two paths' scale gradients differ in the last bits.
    """
    mode = os.environ.get(CPU_COMPILE_ENV, "async").strip().lower() or "async"
    if mode not in MODES:
        raise ValueError(f"{CPU_COMPILE_ENV}={mode!r} is invalid; use one of {', '.join(MODES)}.")
    if mode == "async" and torch.are_deterministic_algorithms_enabled():
        return "sync"
    return mode


def _rows(t: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """``t`` as a contiguous [C, rest] matrix with the channel axis first."""
    return t.movedim(ch_axis, 0).reshape(t.shape[ch_axis], -1).contiguous()


def lsq_backward_compiled(grad_out, x, scale, qn, qp, grad_scale, ch_axis=None, pulse_delta=0.0, dist_k=0.0,
                          frozen=None):  # fmt: skip
    """``reference.lsq_backward`` through the compiled graph; None when it is not available (the caller runs eager)."""
    if x.device.type != "cpu" or x.numel() < MIN_NUMEL or x.dim() == 0:
        return None
    per_channel = ch_axis is not None
    if per_channel:
        if x.shape[ch_axis] < 2 or x.numel() // x.shape[ch_axis] < 2:
            return None  # size-1 dims would specialise (recompile) the dynamic graph
        ch_axis %= x.dim()
    frozen_dtype = None if frozen is None else torch.uint8 if frozen.dtype == torch.bool else frozen.dtype
    long_rows = per_channel and x.numel() // x.shape[ch_axis] > ACC_CHUNK
    key = (per_channel, long_rows, x.dtype, frozen_dtype, bool(dist_k))
    s = scale.detach().float().clamp_min(SCALE_EPS)
    # contiguous inputs: Dynamo guards on strides, and grad_out of a sum() is an expanded (stride 0) tensor
    flat = (lambda t: _rows(t, ch_axis)) if per_channel else (lambda t: t.reshape(-1).contiguous())
    xs, gs, fs = flat(x), flat(grad_out), None if frozen is None else flat(frozen)
    s = s.reshape(-1, 1) if per_channel else s.reshape(())
    if fs is not None and fs.dtype == torch.bool:
        fs = fs.view(torch.uint8)
    out = _COMPILER.unit(key).run(compile_mode(), gs, xs, s, *_scalar_tensors(qn, qp, pulse_delta, dist_k), fs,
                                  bool(dist_k))  # fmt: skip
    if out is None:
        return None
    gx, gsum = out
    if per_channel:
        gx = gx.view(x.movedim(ch_axis, 0).shape).movedim(0, ch_axis) if ch_axis else gx.view(x.shape)
    else:
        gx = gx.view(x.shape)
    return gx, gsum.mul_(grad_scale).reshape(scale.shape).to(scale.dtype)


# ----------------------------------------------------------------------------------------------- compiled forward
def _fwd(x, s, qn, qp):
    return torch.clamp(torch.round(x / s), qn, qp) * s


def _warm_fwd_tensor(fn) -> None:
    fn(warm_randn(MIN_NUMEL + 1), torch.tensor(0.5), torch.tensor(-8.0), torch.tensor(7.0))


def _warm_fwd_channel(fn) -> None:
    fn(warm_randn(4, MIN_NUMEL // 4 + 1), torch.full((4, 1), 0.5), torch.tensor(-8.0), torch.tensor(7.0))


_FWD = {
    False: AsyncCompiled(_fwd, _warm_fwd_tensor, "LSQ forward (per tensor)", "lsq_forward"),
    True: AsyncCompiled(_fwd, _warm_fwd_channel, "LSQ forward (per channel)", "lsq_forward"),
}


def lsq_forward_compiled(x, scale, qn, qp, ch_axis=None):
    """``reference.lsq_forward`` as one fused pass (fp32 CPU tensors); None when not available (run eager)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() < MIN_NUMEL or x.dim() == 0:
        return None
    per_channel = ch_axis is not None
    if per_channel and (ch_axis % x.dim() != 0 or x.shape[0] < 2 or x.numel() // x.shape[0] < 2):
        return None
    s = scale.detach().float().clamp_min(SCALE_EPS)
    xs = x.reshape(x.shape[0], -1) if per_channel else x.reshape(-1)
    s = s.reshape(-1, 1) if per_channel else s.reshape(())
    y = _FWD[per_channel].run(compile_mode(), xs.contiguous(), s, torch.tensor(float(qn)), torch.tensor(float(qp)))
    return None if y is None else y.view(x.shape)
