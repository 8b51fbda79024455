"""One function compiled by TorchInductor off the training thread, with the eager twin used until it is ready.

Policy (``ULTRALYTICS_QAT_CPU_COMPILE``, see ``cpu_compile.compile_mode``): ``async`` compiles on a background thread
on first use and returns None (run eager) until done; ``sync`` compiles on the caller's thread (and waits for a compile
already under way); ``off`` never compiles. Any failure logs one warning with its reason and means eager for the rest
of the process. Forked children start over.

Which path every call took is recorded per op in :data:`PATHS` (read it with :func:`cpu_compile_paths`), so tests and
users can see that training really runs compiled and that nothing fell back.

Guards. Dynamo recompiles when a call differs from the traced one in a guarded property, and gives up (with
``fullgraph=True``: raises) after ``recompile_limit`` (8) graphs per *code object*. :meth:`AsyncCompiled.run` keeps
every guarded property of a call equal to the warm-up's: inputs are detached (no ``requires_grad``, no view base whose
sizes Dynamo would also guard), warm-up and calls run in the state of a custom op's implementation (``no_grad``,
autograd keys excluded), inference-mode calls never reach the graph, and each unit compiles its own copy of the
function (so units never share a recompile budget). Callers pass contiguous tensors (strides are guarded too).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .backend import warn_once


@dataclass
class PathStats:
    """Which path the calls of one CPU op took since the last :func:`reset_cpu_compile_paths`.

    Only calls the compiled path is meant for are counted (CPU tensors big enough; see each op's ``MIN_NUMEL``).
    """

    last: str | None = None  # path of the latest training (non-inference) call: "compiled" or "eager"
    compiled: int = 0  # training calls that ran the compiled graph
    eager: int = 0  # training calls that ran eager: compile off, not ready yet (async), or given up
    inference: int = 0  # inference-mode calls: the eager twin by design (validation must not recompile the graph)
    fallback: str | None = None  # why compiling was given up for good (also logged once); None while it was not

    def record(self, path: str) -> None:
        self.last = path
        setattr(self, path, getattr(self, path) + 1)


OPS = ("lsq_forward", "lsq_backward", "track_oscillations")
PATHS: dict[str, PathStats] = {op: PathStats() for op in OPS}
_UNITS: list[AsyncCompiled] = []


def cpu_compile_paths() -> dict[str, PathStats]:
    """Per CPU op (``lsq_forward``, ``lsq_backward``, ``track_oscillations``): a copy of its :class:`PathStats`.

    Examples:
        >>> paths = cpu_compile_paths()
        >>> paths["lsq_backward"].last, paths["lsq_backward"].fallback  # ("compiled", None) in a healthy run
    """
    return {op: PathStats(**vars(s)) for op, s in PATHS.items()}


def reset_cpu_compile_paths() -> None:
    """Zero the counters and ``last``; compiled graphs stay, and so does ``fallback`` (eager for the process)."""
    for op, s in PATHS.items():
        PATHS[op] = PathStats(fallback=s.fallback)


def warm_randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal samples for warm-ups from a private generator.

    Warm-ups may run on a background thread: drawing from the global generator would race the training thread's
    seeded draws (augmentation, sampling) and shift them by a time-dependent amount.
    """
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def is_inference_call(args: tuple) -> bool:
    """True in inference mode or when a tensor argument is an inference tensor (validation, BN re-estimation)."""
    return torch.is_inference_mode_enabled() or any(isinstance(a, torch.Tensor) and a.is_inference() for a in args)


@contextlib.contextmanager
def _as_in_an_op() -> Iterator[None]:
    """The state a custom op's implementation runs in: no grad, autograd dispatch keys excluded.

    Dynamo guards on both (the dispatch keys of every tensor input), so warm-ups (on a bare background thread) and
    direct calls (tests, scripts) use them too, and all match the calls made from inside the ops.
    """
    with torch.no_grad(), torch._C._AutoDispatchBelowAutograd():
        yield


def _own_copy(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own: Dynamo counts recompiles per code object, shared by all its wrappers."""
    name = f"{fn.__name__}__{tag}"
    names = {"co_name": name, **({"co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {})}  # 3.11+
    code = fn.__code__.replace(**names)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _process_exiting() -> bool:
    """True once the main thread has finished (Python joins the compile threads then; Inductor's pools are shut)."""
    return not threading.main_thread().is_alive()


class AsyncCompiled:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, warmed by ``warm(compiled_fn)`` before first use.

    Args:
        fn: The function to compile (pure tensor code; scalars passed as 0-d tensors to avoid recompiles).
        warm: Calls the compiled function once on small examples (inputs from :func:`warm_randn` or constants, never
            the global RNG), so the first real call does not compile; it runs as an op's implementation would.
        name: Short name for the warning and the thread, unique per unit.
        op: The op (one of :data:`OPS`) whose :class:`PathStats` this unit's calls are recorded in.
    """

    def __init__(self, fn: Callable, warm: Callable, name: str, op: str):
        self._fn, self._warm, self.name, self.op = _own_copy(fn, re.sub(r"\W+", "_", name)), warm, name, op
        self.reset()
        _UNITS.append(self)

    def reset(self) -> None:
        """Back to never compiled, with a fresh lock (a forked child may inherit the lock held by a dead thread)."""
        self.lock = threading.Lock()
        self.fn, self.failed, self._thread = None, False, None

    @property
    def pending(self) -> bool:
        """A background compile is under way."""
        return self._thread is not None and self._thread.is_alive()

    def _build(self):
        fn = torch.compile(self._fn, dynamic=True, fullgraph=True)
        with _as_in_an_op():
            self._warm(fn)
        return fn

    def _compile_here(self) -> None:
        try:
            fn = self._build()
        except Exception as e:  # noqa: BLE001 - any compile failure means: stay eager
            self.fail(e)
            return
        with self.lock:
            self.fn = fn

    def fail(self, e: BaseException) -> None:
        """Give up compiling for this process: eager from now on, logged once with the reason."""
        self.failed = True
        if _process_exiting():
            return  # a compile cut short by interpreter shutdown is no fallback anyone will run into
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        PATHS[self.op].fallback = PATHS[self.op].fallback or f"{self.name}: {reason}"
        warn_once(f"cpu-compile-{self.name}", f"TorchInductor compile of {self.name} failed ({reason}); using the "
                  "eager PyTorch twin. Set ULTRALYTICS_QAT_CPU_COMPILE=off to silence.")  # fmt: skip

    def get(self, mode: str):
        """The compiled function, or None while not ready (``async``) or unavailable."""
        if self.failed or mode == "off":
            return None
        with self.lock:
            thread = self._thread
            if self.fn is not None or (mode == "async" and thread is not None):
                return self.fn
            if mode == "async":
                # not a daemon: the interpreter joins it at exit; killing it mid-compile aborts the process
                self._thread = threading.Thread(target=self._compile_here, name=f"ultralytics-qat-compile-{self.name}",
                                                daemon=False)  # fmt: skip
                self._thread.start()
                return None
        if thread is not None:
            thread.join()  # sync after async (e.g. determinism switched on): wait for the compile under way
        else:
            self._compile_here()
        return self.fn

    def run(self, mode: str, *args):
        """``fn(*args)`` through the compiled graph, or None where the caller runs eager; recorded in :data:`PATHS`."""
        stats = PATHS[self.op]
        if is_inference_call(args):
            stats.inference += 1
            return None
        out, fn = None, self.get(mode)
        if fn is not None:
            try:
                with _as_in_an_op():  # the warm-up's state: Dynamo guards on it
                    out = fn(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            except Exception as e:  # noqa: BLE001 - e.g. a recompile that fails: eager from now on
                self.fail(e)
        stats.record("eager" if out is None else "compiled")
        return out

    def graphs(self) -> int:
        """Graphs Dynamo holds for this unit (1 after the warm-up; more means calls recompiled)."""
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self._fn.__code__))


def _reset_after_fork() -> None:
    for unit in _UNITS:
        unit.reset()
    reset_cpu_compile_paths()
    for s in PATHS.values():
        s.fallback = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
