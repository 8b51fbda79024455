"""Which implementation runs an op: the Triton kernels or the PyTorch twin. Decided per call, here only.

``ULTRALYTICS_QAT_BACKEND`` selects it:

- ``auto`` (default): Triton for CUDA tensors when triton imports, the PyTorch twin otherwise (CPU tensors, or no
  triton: then a one-time warning on CUDA).
- ``torch``: always the PyTorch twin.
- ``triton``: always Triton; a tensor it cannot run on raises :class:`BackendUnavailableError`. With
  ``TRITON_INTERPRET=1`` set before the first kernel launch, CPU tensors run through the Triton interpreter: that is
  how the tests exercise the kernels without a GPU. Never set it in production, CUDA tensors would be interpreted too.

Triton is imported lazily, on the first call that needs it, so importing ``ultralytics_qat.ops`` never imports it and
works with triton missing entirely.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

LOGGER = logging.getLogger("ultralytics_qat.ops")

BACKEND_ENV = "ULTRALYTICS_QAT_BACKEND"
BACKENDS = ("auto", "torch", "triton")

_triton_state: dict[str, object] = {}  # "module" -> triton module or None, "error" -> why it is unusable
_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested kernel backend (``ULTRALYTICS_QAT_BACKEND=triton``) cannot run on this tensor.

    Defined here because ``ultralytics_qat.ops`` imports nothing else of the package; ``ultralytics_qat.errors`` may
    re-export or subclass it.
    """


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        LOGGER.warning(message)


def requested_backend() -> str:
    """The backend named by ``ULTRALYTICS_QAT_BACKEND`` (read on every call, so tests can switch it)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r} is invalid; use one of {', '.join(BACKENDS)}.")
    return name


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() in ("1", "true", "True")


def has_triton() -> bool:
    """True when triton is installed and imports (imports it on the first call, not before)."""
    if "module" not in _triton_state:
        if importlib.util.find_spec("triton") is None:
            _triton_state.update(module=None, error="triton is not installed")
        else:
            try:
                _triton_state.update(module=importlib.import_module("triton"), error=None)
            except Exception as e:  # a broken install must not break the CPU path
                _triton_state.update(module=None, error=f"import triton failed: {type(e).__name__}: {e}")
    return _triton_state["module"] is not None


def _triton_blocker(t: torch.Tensor) -> str | None:
    """Why Triton cannot run on ``t`` (None when it can)."""
    if not has_triton():
        return str(_triton_state["error"])
    if t.is_cuda:
        return None
    if t.device.type == "cpu" and triton_interpret():
        return None
    return f"Triton kernels need a CUDA tensor (got device {t.device}; TRITON_INTERPRET=1 runs them on CPU for tests)"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on ``t`` runs the Triton kernels (True) or the PyTorch twin (False), per ``ULTRALYTICS_QAT_BACKEND``.

    Raises:
        BackendUnavailableError: ``triton`` was requested and cannot run on ``t``.
    """
    name = requested_backend()
    if name == "torch":
        return False
    why = _triton_blocker(t)
    if name == "triton":
        if why is not None:
            raise BackendUnavailableError(f"{BACKEND_ENV}=triton cannot run: {why}. Unset it or use {BACKEND_ENV}=torch.")
        return True
    if t.is_cuda and why is not None:  # auto on a GPU without triton: correct but slow
        warn_once("triton-missing", f"Triton unavailable ({why}); LSQ ops fall back to the PyTorch twin on CUDA.")
    return t.is_cuda and why is None


def triton_kernels(name: str) -> ModuleType:
    """Import a kernel module of this package (``triton_lsq`` or ``triton_oscillation``) on first use."""
    return importlib.import_module(f"{__package__}.{name}")
