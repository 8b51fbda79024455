"""ultralytics-qat: stable ultra-low-bit quantization-aware training for Ultralytics YOLO detectors.

Importing the package is light: Ultralytics is imported on first use of a name that needs it, so the CLI can make
the environment hermetic first.

Examples:
    >>> from ultralytics import YOLO
    >>> from ultralytics_qat import QATDetectionTrainer
    >>> YOLO("yolov8n.yaml").train(trainer=QATDetectionTrainer, qat="qat.yaml", data="coco8.yaml", epochs=3)
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "QATConfig": "config",
    "QATController": "controller",
    "QATDetectionTrainer": "engine",
    "QATDetectionValidator": "engine",
    "add_qat_callbacks": "engine",
    "load_qat_model": "checkpoint",
    "export_onnx": "export",
    "bundled_coco8": "data",
    "make_shapes_dataset": "data",
    "make_hermetic": "utils",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ultralytics_qat' has no attribute '{name}'")
