"""Reading QAT checkpoints: clear errors for wrong or missing files, and the exact fp32 state restored.

Ultralytics pickles the EMA model in fp16; a QAT checkpoint also carries the fp32 state under ``ckpt["qat"]``
(see :meth:`QATController.checkpoint_entry`). Everything that loads a QAT checkpoint goes through here.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .controller import CKPT_KEY, QATController, is_qat_model
from .errors import QATCheckpointError


def check_checkpoint_path(path: str | Path) -> Path:
    """An existing local ``.pt`` file, or a one-line error (Ultralytics would try to download a missing bare name)."""
    p = Path(str(path))
    if p.suffix != ".pt":
        raise QATCheckpointError(f"model '{path}' is not a PyTorch checkpoint (.pt); pass the best.pt or last.pt of a yolo-qat run")
    if not p.is_file():
        raise QATCheckpointError(f"checkpoint '{path}' not found; pass the path of a yolo-qat run's weights, e.g. runs/detect/train/weights/best.pt")
    return p


def _load_errors(path: Path, load):
    """Run ``load()``, turning Ultralytics' loader failures into one-line :class:`QATCheckpointError`."""
    try:
        return load()
    except ModuleNotFoundError as e:
        raise QATCheckpointError(f"checkpoint '{path}' needs Python module '{e.name}', which is not installed") from None
    except (TypeError, RuntimeError, KeyError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QATCheckpointError(f"checkpoint '{path}' could not be loaded: {msg}") from None


def load_raw(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint with Ultralytics' loader: (fp32 model from the fp16 pickle, checkpoint dict)."""
    from ultralytics.nn.tasks import load_checkpoint

    p = check_checkpoint_path(path)
    return _load_errors(p, lambda: load_checkpoint(p))


def require_qat(model: nn.Module, ckpt: dict, path: str | Path, hint: str = "yolo val") -> dict:
    """The ``ckpt["qat"]`` entry, or an error pointing a float checkpoint to plain Ultralytics."""
    entry = ckpt.get(CKPT_KEY)
    if not isinstance(entry, dict) or not is_qat_model(model):
        raise QATCheckpointError(
            f"'{path}' is a float Ultralytics checkpoint, not a QAT one; use '{hint} model={path}', "
            f"or quantize it first with 'yolo-qat train model={path}'"
        )
    return entry


def load_qat_model(path: str | Path, hint: str = "yolo val") -> tuple[nn.Module, dict]:
    """Load a QAT checkpoint as an eval-mode fp32 model with its exact learned state, plus the checkpoint dict."""
    model, ckpt = load_raw(path)
    QATController.restore(model, require_qat(model, ckpt, path, hint))
    return model, ckpt


def restore_exact(model: nn.Module, source: nn.Module) -> bool:
    """If ``source`` was loaded from a QAT checkpoint file, copy that file's fp32 state into ``model``.

    ``model.load(source)`` only sees the fp16-rounded pickled values; this re-reads the exact ones.
    """
    path = getattr(source, "pt_path", None)
    if not path or not Path(path).is_file():
        return False
    _, ckpt = load_raw(path)
    entry = ckpt.get(CKPT_KEY)
    if not isinstance(entry, dict):
        return False
    QATController.restore(model, entry)
    return True


def load_qat_yolo(path: str | Path, hint: str = "yolo val"):
    """An Ultralytics ``YOLO`` object for a QAT checkpoint, its model holding the exact fp32 QAT state."""
    from ultralytics import YOLO

    p = check_checkpoint_path(path)
    yolo = _load_errors(p, lambda: YOLO(str(p)))
    QATController.restore(yolo.model, require_qat(yolo.model, yolo.ckpt, p, hint))
    return yolo
