"""The fast CPU path of the LSQ backward: the PyTorch twin's closed form compiled once by TorchInductor.

Why: eager PyTorch spends ~10 memory passes (and as many page-faulting allocations) on the backward, and the builtin
``torch._fake_quantize_learnable_*`` ops run a scalar loop that also computes a zero-point gradient; one fused,
vectorised loop is 10-30x faster than either (``scripts/bench_ops.py``). The forward stays eager: 4 in-place passes,
already 20-40x faster than the builtin's, and not worth a compile.

How: ``reference.lsq_backward_terms`` is compiled with ``dynamic=True`` and with qn, qp, PulseSmooth delta and k as 0-d
tensors, so one graph per (per-tensor | per-channel with rows up to / over 4096, dtype, frozen mask, distance scaling)
serves every shape, bit
width and layer. Graphs are cached on disk by Inductor (cold ~8-10 s for the first, ~1-3 s warm, per process).

``ULTRALYTICS_QAT_CPU_COMPILE`` chooses when:

- ``async`` (default): the first call of a kind runs eager and starts the compile on a background thread, so the first
  training step is not held up; later calls use the compiled graph once it is ready.
- ``sync``: compile on the first call (blocks it; used by the tests and the benchmark).
- ``off``: eager only.

Any failure (no C++ compiler, unsupported Python, ...) logs one warning and falls back to eager for the process.
"""

from __future__ import annotations

import os
import threading

import torch

from .async_compile import AsyncCompiled
from .backend import warn_once
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


class _Compiler:
    """Compiled graphs by kind; thread-safe; resets in forked children (a pending compile does not survive fork)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.fns: dict[tuple, object] = {}  # key -> compiled callable
        self.pending: set[tuple] = set()
        self.failed = False
        self.compiled: dict[str, object] = {}

    def _compiled(self, per_channel: bool):
        name = "channel" if per_channel else "tensor"
        if name not in self.compiled:
            fn = _bwd_per_channel if per_channel else _bwd_per_tensor
            self.compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return self.compiled[name]

    def fail(self, e: BaseException) -> None:
        self.failed = True
        warn_once(
            "cpu-compile",
            f"TorchInductor compile of the LSQ CPU backward failed ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
            f" using the eager PyTorch path (slower). Set {CPU_COMPILE_ENV}=off to silence.",
        )

    def warm(self, key: tuple) -> None:
        """Compile ``key`` by running it once on small example tensors (sizes are symbolic, so they generalise)."""
        per_channel, long_rows, dtype, frozen_dtype, has_dist = key
        shape = (4, 2 * ACC_CHUNK if long_rows else 16) if per_channel else (MIN_NUMEL,)
        x = torch.randn(shape, dtype=dtype) * 4
        g = torch.randn(shape, dtype=dtype)
        s = torch.full((4, 1) if per_channel else (), 0.5)
        frozen = None if frozen_dtype is None else torch.zeros(shape, dtype=frozen_dtype)
        args = _scalar_tensors(-8, 7, 0.1, 0.5)
        with torch.no_grad():
            self._compiled(per_channel)(g, x, s, *args, frozen, has_dist)

    def _worker(self, key: tuple) -> None:
        try:
            self.warm(key)
            with self.lock:
                self.fns[key] = self._compiled(key[0])
        except Exception as e:  # noqa: BLE001 - any compile failure means: stay eager
            self.fail(e)
        finally:
            with self.lock:
                self.pending.discard(key)

    def get(self, key: tuple, mode: str):
        """The compiled callable for ``key``, or None while it is not ready (async) or unavailable."""
        if self.failed:
            return None
        with self.lock:
            fn = self.fns.get(key)
            if fn is not None or mode == "async" and key in self.pending:
                return fn
            if mode == "async":
                self.pending.add(key)
                # not a daemon: the interpreter joins it at exit; killing it mid-compile aborts the process
                threading.Thread(target=self._worker, args=(key,), name="ultralytics-qat-compile", daemon=False).start()
                return None
        try:  # sync: compile here, on the caller's thread
            self.warm(key)
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return None
        with self.lock:
            self.fns[key] = self._compiled(key[0])
        return self.fns[key]


_COMPILER = _Compiler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_COMPILER.reset)


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
    """The mode named by ``ULTRALYTICS_QAT_CPU_COMPILE`` (``async`` when unset)."""
    mode = os.environ.get(CPU_COMPILE_ENV, "async").strip().lower() or "async"
    if mode not in MODES:
        raise ValueError(f"{CPU_COMPILE_ENV}={mode!r} is invalid; use one of {', '.join(MODES)}.")
    return mode


def lsq_backward_compiled(grad_out, x, scale, qn, qp, grad_scale, ch_axis=None, pulse_delta=0.0, dist_k=0.0,
                          frozen=None):  # fmt: skip
    """``reference.lsq_backward`` through the compiled graph; None when it is not available (the caller runs eager)."""
    mode = compile_mode()
    if mode == "off" or x.device.type != "cpu" or x.numel() < MIN_NUMEL or x.dim() == 0:
        return None
    per_channel = ch_axis is not None
    if per_channel:
        if x.shape[ch_axis] < 2 or x.numel() // x.shape[ch_axis] < 2:
            return None  # size-1 dims would specialise (recompile) the dynamic graph
        ch_axis %= x.dim()
    frozen_dtype = None if frozen is None else torch.uint8 if frozen.dtype == torch.bool else frozen.dtype
    long_rows = per_channel and x.numel() // x.shape[ch_axis] > ACC_CHUNK
    key = (per_channel, long_rows, x.dtype, frozen_dtype, bool(dist_k))
    fn = _COMPILER.get(key, mode)
    if fn is None:
        return None
    s = scale.detach().float().clamp_min(SCALE_EPS)
    if per_channel:
        to2d = (lambda t: t.movedim(ch_axis, 0).reshape(t.shape[ch_axis], -1)) if ch_axis else (
            lambda t: t.reshape(t.shape[0], -1))
        xs, gs, fs, s = to2d(x), to2d(grad_out), None if frozen is None else to2d(frozen), s.reshape(-1, 1)
    else:
        xs, gs, fs, s = x.reshape(-1), grad_out.reshape(-1), None if frozen is None else frozen.reshape(-1), s.reshape(())
    if fs is not None and fs.dtype == torch.bool:
        fs = fs.view(torch.uint8)
    try:
        with torch.no_grad():
            gx, gsum = fn(gs.detach(), xs.detach(), s, *_scalar_tensors(qn, qp, pulse_delta, dist_k), fs, bool(dist_k))
    except Exception as e:  # noqa: BLE001 - e.g. a recompile that fails: eager from now on
        _COMPILER.fail(e)
        return None
    if per_channel:
        gx = gx.view(x.movedim(ch_axis, 0).shape).movedim(0, ch_axis) if ch_axis else gx.view(x.shape)
    else:
        gx = gx.view(x.shape)
    return gx, gsum.mul_(grad_scale).reshape(scale.shape).to(scale.dtype)


# ----------------------------------------------------------------------------------------------- compiled forward
def _fwd(x, s, qn, qp):
    return torch.clamp(torch.round(x / s), qn, qp) * s


def _warm_fwd_tensor(fn) -> None:
    fn(torch.randn(MIN_NUMEL + 1), torch.tensor(0.5), torch.tensor(-8.0), torch.tensor(7.0))


def _warm_fwd_channel(fn) -> None:
    fn(torch.randn(4, MIN_NUMEL // 4 + 1), torch.full((4, 1), 0.5), torch.tensor(-8.0), torch.tensor(7.0))


_FWD = {
    False: AsyncCompiled(_fwd, _warm_fwd_tensor, "LSQ forward (per tensor)"),
    True: AsyncCompiled(_fwd, _warm_fwd_channel, "LSQ forward (per channel)"),
}


def lsq_forward_compiled(x, scale, qn, qp, ch_axis=None):
    """``reference.lsq_forward`` as one fused pass (fp32 CPU tensors); None when not available (run eager)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() < MIN_NUMEL or x.dim() == 0:
        return None
    per_channel = ch_axis is not None
    if per_channel and (ch_axis % x.dim() != 0 or x.shape[0] < 2 or x.numel() // x.shape[0] < 2):
        return None
    fn = _FWD[per_channel].get(compile_mode())
    if fn is None:
        return None
    s = scale.detach().float().clamp_min(SCALE_EPS)
    xs = x.reshape(x.shape[0], -1) if per_channel else x.reshape(-1)
    s = s.reshape(-1, 1) if per_channel else s.reshape(())
    try:
        y = fn(xs, s, torch.tensor(float(qn)), torch.tensor(float(qp)))
    except Exception as e:  # noqa: BLE001
        _FWD[per_channel].fail(e)
        return None
    return y.view(x.shape)
