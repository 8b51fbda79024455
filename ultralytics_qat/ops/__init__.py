"""Numerical kernels of ultralytics-qat: LSQ fake quantization and oscillation tracking. Imports nothing else of ours.

Public entry points (each a ``torch.library`` custom op in the ``ultralytics_qat`` namespace, dispatching to Triton on
CUDA and to the PyTorch twin elsewhere; see ``backend.py`` for ``ULTRALYTICS_QAT_BACKEND``):

- :func:`lsq_fake_quantize` and its twin/oracle :func:`lsq_fake_quantize_reference`
- :func:`lsq_conv2d`: input fake quantization fused with its conv (saves memory in training)
- :func:`track_oscillations` and its twin :func:`track_oscillations_reference`, with :func:`init_oscillation_state`
- :func:`cpu_compile_paths`: which CPU path (Inductor-compiled or eager twin) the calls of each op took, and why a
  compile fell back if one did (``ULTRALYTICS_QAT_CPU_COMPILE``, see ``cpu_compile.py``)

Importing this package never imports triton.
"""

from .async_compile import PathStats, cpu_compile_paths, reset_cpu_compile_paths
from .backend import BACKEND_ENV, BackendUnavailableError, has_triton
from .cpu_compile import CPU_COMPILE_ENV
from .dispatch import lsq_fake_quantize, track_oscillations
from .fused_conv import lsq_conv2d
from .oscillation import OscillationState, init_oscillation_state, track_oscillations_reference
from .onnx_symbolic import register as _register_onnx_symbolic
from .reference import SCALE_EPS, lsq_fake_quantize_reference

_register_onnx_symbolic()  # plain `yolo export` of a QAT checkpoint (see onnx_symbolic.py)

__all__ = [
    "BACKEND_ENV",
    "CPU_COMPILE_ENV",
    "SCALE_EPS",
    "BackendUnavailableError",
    "OscillationState",
    "PathStats",
    "cpu_compile_paths",
    "has_triton",
    "init_oscillation_state",
    "lsq_conv2d",
    "lsq_fake_quantize",
    "lsq_fake_quantize_reference",
    "reset_cpu_compile_paths",
    "track_oscillations",
    "track_oscillations_reference",
]
