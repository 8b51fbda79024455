"""One function compiled by TorchInductor off the training thread, with the eager twin used until it is ready.

Policy (``ULTRALYTICS_QAT_CPU_COMPILE``, see ``cpu_compile``): ``async`` compiles on a background thread on first use
and returns None (run eager) until done; ``sync`` compiles on the caller's thread; ``off`` never compiles. Any
failure logs one warning and means eager for the rest of the process. Forked children start over.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from .backend import warn_once


class AsyncCompiled:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, warmed by ``warm(compiled_fn)`` before first use.

    Args:
        fn: The function to compile (pure tensor code; scalars passed as 0-d tensors to avoid recompiles).
        warm: Calls the compiled function once on small examples, so the first real call does not compile.
        name: Short name for the warning and the thread.
    """

    def __init__(self, fn: Callable, warm: Callable, name: str):
        self._fn, self._warm, self.name = fn, warm, name
        self.lock = threading.Lock()
        self.reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.fn, self.pending, self.failed = None, False, False

    def _build(self):
        fn = torch.compile(self._fn, dynamic=True, fullgraph=True)
        with torch.no_grad():
            self._warm(fn)
        return fn

    def _worker(self) -> None:
        try:
            fn = self._build()
            with self.lock:
                self.fn = fn
        except Exception as e:  # noqa: BLE001 - any compile failure means: stay eager
            self.fail(e)
        finally:
            with self.lock:
                self.pending = False

    def fail(self, e: BaseException) -> None:
        self.failed = True
        warn_once(f"cpu-compile-{self.name}", f"TorchInductor compile of {self.name} failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); using the eager PyTorch twin. "
                  "Set ULTRALYTICS_QAT_CPU_COMPILE=off to silence.")

    def get(self, mode: str):
        """The compiled function, or None while not ready (``async``) or unavailable."""
        if self.failed or mode == "off":
            return None
        with self.lock:
            if self.fn is not None or (mode == "async" and self.pending):
                return self.fn
            if mode == "async":
                self.pending = True
                # not a daemon: the interpreter joins it at exit; killing it mid-compile aborts the process
                threading.Thread(target=self._worker, name=f"ultralytics-qat-compile-{self.name}", daemon=False).start()
                return None
        try:
            self.fn = self._build()
        except Exception as e:  # noqa: BLE001
            self.fail(e)
        return self.fn
