"""QAT checkpoints: the entry format, compact deploy copies, atomic writes, health checks and clear load errors.

Ultralytics pickles the EMA model in fp16 under ``ckpt["ema"]``/``ckpt["model"]``; a QAT checkpoint adds
``ckpt["qat"]``. Two kinds exist (``entry["kind"]``):

- ``resume`` (``last.pt`` during training, ``epoch<N>.pt``): the fp32 value of every float tensor except the
  oscillation-tracker state, which the pickled model itself keeps in fp32 (stored once, exact). Resume and NaN
  recovery are bitwise.
- ``deploy`` (``best.pt``, and both files once a run has finished): the pickle is a plain Ultralytics model, no class
  of ours in it, so Ultralytics without this plugin loads it (and never offers to pip-install a module named
  ``ultralytics_qat``). Each quantized conv's weight is its dequantized value ``code * s`` in fp16, which rounds back
  to the same integer code given the fp32 scale (|code| <= 127 needs only 8 bits of the fp16 mantissa); BN, biases
  and float layers stay fp32. The entry holds the quantizers' state (fp32 scales, grids) under the QAT model's keys;
  loading re-inserts the quantizers from the entry's config and restores it: the exact QAT model. Tracker state is
  dropped. About the size of the float checkpoint.

Format 1 (before 0.2: one fp32 copy of the whole state, trackers included) still loads.
Everything that reads or writes a QAT checkpoint goes through here.
"""

from __future__ import annotations

import io
import os
import tempfile
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from .controller import is_qat_model, quantizers, unwrap
from .errors import QATCheckpointError

CKPT_KEY = "qat"  # top-level checkpoint key of the QAT entry
CKPT_FORMAT = 2
TRACKER = ".tracker."  # state_dict keys of oscillation-tracker state


# -- writing -----------------------------------------------------------------------------------------------------------
def _float_state(model: nn.Module) -> dict:
    return {k: v.detach().float().cpu().clone() for k, v in unwrap(model).state_dict().items()
            if v.is_floating_point() and TRACKER not in k}


def resume_entry(model: nn.Module, config: dict) -> dict:
    """The entry of a resumable checkpoint: fp32 of every float tensor but the tracker state (see module doc)."""
    return {"format": CKPT_FORMAT, "kind": "resume", "config": config, "state": _float_state(model)}


def resume_pickle(model: nn.Module) -> nn.Module:
    """The model as Ultralytics pickles it (fp16, NCHW), but quantizers in fp32: tracker buffers (their only copy)
    and scales (small; an fp16 scale moves activation codes for whoever reads the pickle alone, e.g. ``yolo export``)."""
    from .quant import LSQQuantizer

    out = deepcopy(unwrap(model)).half().to(memory_format=torch.contiguous_format)
    exact = {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LSQQuantizer)}
    for name, m in out.named_modules():
        if name in exact:
            m.scale = nn.Parameter(exact[name].scale.detach().float().cpu().clone(), exact[name].scale.requires_grad)
            t = getattr(exact[name], "tracker", None)
            for b, v in (t.named_buffers() if t is not None else ()):
                setattr(m.tracker, b, v.detach().cpu().clone())
    return _strip_runtime(out)


def deploy_pickle_and_entry(model: nn.Module, config: dict) -> tuple[nn.Module, dict]:
    """A compact deploy copy: (plain Ultralytics model with dequantized fp16 weights, the entry with the quantizers)."""
    from .quant import QConv2d

    out = deepcopy(unwrap(model)).float()
    state = {k: v.detach().clone() for k, v in out.state_dict().items() if _QUANTIZER in k and TRACKER not in k}
    with torch.no_grad():
        for name, m in list(out.named_modules()):
            if not isinstance(m, QConv2d):
                continue
            q = m.weight_fake_quant
            if q._initialized:
                codes = _codes(m)
                s = q.scale.detach().float().clamp_min(1e-8)
                m.weight.copy_(codes * (s.view(-1, *[1] * (codes.dim() - 1)) if q.per_channel else s))
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, _plain_conv(m, half=q._initialized))
    entry = {"format": CKPT_FORMAT, "kind": "deploy", "config": config, "state": state}
    return _strip_runtime(out.to(memory_format=torch.contiguous_format)), entry


_QUANTIZER = "_fake_quant."  # state_dict keys of weight_fake_quant / input_fake_quant


def _plain_conv(q: nn.Conv2d, half: bool) -> nn.Conv2d:
    """An ``nn.Conv2d`` with the QConv2d's geometry and (dequantized) weight, fp16 when the weight is on its grid."""
    conv = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
                     q.bias is not None, q.padding_mode, device="meta")
    conv.weight = nn.Parameter(q.weight.detach().half().contiguous() if half else q.weight.detach().clone(),
                               requires_grad=q.weight.requires_grad)
    if q.bias is not None:
        conv.bias = nn.Parameter(q.bias.detach().clone(), requires_grad=q.bias.requires_grad)
    conv.train(q.training)
    return conv


def _codes(conv: nn.Module) -> torch.Tensor:
    """The conv's integer weight codes, frozen ones included (baked in already; the tracker makes it certain)."""
    q, w = conv.weight_fake_quant, conv.weight.detach()
    t = getattr(q, "tracker", None)
    if t is not None and bool(t.initialized) and t.frozen.numel() == w.numel():
        return t.codes(w, q)
    return q.quantized_int(w)


def _strip_runtime(model: nn.Module) -> nn.Module:
    if hasattr(model, "criterion"):
        model.criterion = None  # training-only state, as Ultralytics strips it
    for v in model.state_dict().values():
        if v.is_floating_point():
            torch.nan_to_num_(v)  # fp16 overflow clamps instead of becoming inf
    return model


def atomic_save(obj, path: str | Path) -> int:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated file; a failed write (full disk)
    leaves the old file and raises. Returns the bytes written.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


# -- restoring ---------------------------------------------------------------------------------------------------------
def restore(model: nn.Module, entry: dict) -> None:
    """Load a QAT entry's exact state into a model of the same structure (any format and kind)."""
    model = unwrap(model)
    own = model.state_dict()
    state = entry.get("state")
    if not isinstance(state, dict):
        raise QATCheckpointError("QAT checkpoint entry has no state; the file is damaged, retrain or use another one")
    missing = [k for k in state if k not in own]
    if missing:
        raise QATCheckpointError(
            f"QAT checkpoint state does not fit this model ({len(missing)} tensors unknown, e.g. '{missing[0]}'); "
            "load it with the model it was trained with"
        )
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape == v.shape:
                own[k].copy_(v.to(own[k].dtype))
            else:  # tracker state of a format-1 file restored into an unpickled deploy model: take it whole
                _set_tensor(model, k, v.clone())
    for _, q in quantizers(model):  # copy_ bypasses _load_from_state_dict: refresh host mirrors
        q.bits, q.qn, q.qp = (int(x) for x in q.qrange.tolist())
        q._initialized = bool(q.initialized)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, name = key.rpartition(".")
    setattr(model.get_submodule(owner), name, value)


def scale_problems(model: nn.Module) -> tuple[str | None, str | None]:
    """(fatal, warning) about the initialised quantizers: NaN/inf scales or impossible grids are fatal; scales <= 0
    (which the forward clamps to a tiny step, silencing those channels) are a warning. None where all is well."""
    nonfinite, nonpositive, bad_grid = [], [], []
    for name, q in quantizers(unwrap(model)):
        if not q._initialized:
            continue
        s = q.scale.detach()
        if not bool(torch.isfinite(s).all()):
            nonfinite.append(name)
        elif bool((s <= 0).any()):
            nonpositive.append(name)
        bits, qn, qp = q.bits, q.qn, q.qp
        if not (2 <= bits <= 8 and qn <= 0 <= qp and qn < qp and qp - qn <= 2**bits - 1):
            bad_grid.append(f"{name} (bits {bits}, grid [{qn}, {qp}])")
    fatal = warning = None
    if nonfinite:
        fatal = f"{len(nonfinite)} learned scale tensors are NaN or inf (e.g. '{nonfinite[0]}')"
    elif bad_grid:
        fatal = f"{len(bad_grid)} quantizers have an impossible grid (e.g. {bad_grid[0]})"
    if nonpositive:
        warning = f"{len(nonpositive)} learned scale tensors have values <= 0 (e.g. '{nonpositive[0]}')"
    return fatal, warning


# -- reading files -----------------------------------------------------------------------------------------------------
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
    except (TypeError, RuntimeError, KeyError, AttributeError, EOFError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, EOFError) or "PytorchStreamReader" in msg or "zip archive" in msg:
            msg = "the file is truncated or not a checkpoint"
        raise QATCheckpointError(f"checkpoint '{path}' could not be loaded: {msg}") from None
    except Exception as e:  # e.g. pickle.UnpicklingError of a corrupted file
        if type(e).__name__ != "UnpicklingError":
            raise
        raise QATCheckpointError(f"checkpoint '{path}' could not be loaded: the file is corrupted or not a checkpoint") from None


def load_raw(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint with Ultralytics' loader: (fp32 model from the fp16 pickle, checkpoint dict)."""
    from ultralytics.nn.tasks import load_checkpoint

    p = check_checkpoint_path(path)
    return _load_errors(p, lambda: load_checkpoint(p))


def require_qat(model: nn.Module, ckpt: dict, path: str | Path, hint: str = "yolo val") -> dict:
    """The ``ckpt["qat"]`` entry, or an error that says what the file is instead."""
    entry = ckpt.get(CKPT_KEY)
    if not isinstance(entry, dict):
        if is_qat_model(model) or getattr(model, "qat_config", None) is not None:
            raise QATCheckpointError(
                f"'{path}' holds a QAT model but lost its QAT entry (ckpt['qat']), so its exact state is gone; use "
                "another checkpoint of the run (last.pt or best.pt), or retrain"
            )
        raise QATCheckpointError(
            f"'{path}' is a float Ultralytics checkpoint, not a QAT one; use '{hint} model={path}', "
            f"or quantize it first with 'yolo-qat train model={path}'"
        )
    return entry


def carries_qat(model: nn.Module) -> bool:
    """True for a model loaded from a QAT checkpoint: quantized (resume kind), or plain with its QAT config (deploy)."""
    return is_qat_model(model) or getattr(model, "qat_config", None) is not None


def materialize(model: nn.Module, entry: dict) -> nn.Module:
    """Re-insert the quantizers of a deploy checkpoint's plain model (from the entry's config), in place."""
    if is_qat_model(model):
        return model
    from .config import QATConfig
    from .controller import QATController

    QATController(QATConfig.from_dict(entry["config"], source="checkpoint")).prepare(model, verbose=False)
    return model


def restore_checked(model: nn.Module, entry: dict, path: str | Path) -> None:
    """:func:`restore`, then refuse a model whose scales or grids are unusable (NaN, inf, impossible bits)."""
    from .utils import LOGGER

    restore(model, entry)
    fatal, warning = scale_problems(model)
    if fatal:
        raise QATCheckpointError(
            f"checkpoint '{path}' holds a broken QAT model: {fatal}; the run diverged, use an earlier checkpoint or "
            "retrain with a lower lr0 or qat.optim.scale_lr_mult"
        )
    if warning:
        LOGGER.warning(f"QAT: checkpoint '{path}': {warning}; those channels quantize to zero")


def load_qat_model(path: str | Path, hint: str = "yolo val") -> tuple[nn.Module, dict]:
    """Load a QAT checkpoint as an eval-mode fp32 model with its exact learned state, plus the checkpoint dict."""
    model, ckpt = load_raw(path)
    entry = require_qat(model, ckpt, path, hint)
    restore_checked(materialize(model, entry), entry, path)
    return model, ckpt


def restore_exact(model: nn.Module, source: nn.Module) -> bool:
    """If ``source`` was loaded from a QAT checkpoint file, copy that file's exact state into ``model``.

    ``model.load(source)`` only sees the fp16-rounded pickled values; this re-reads the exact ones.
    """
    path = getattr(source, "pt_path", None)
    if not path or not Path(path).is_file():
        return False
    _, ckpt = load_raw(path)
    entry = ckpt.get(CKPT_KEY)
    if not isinstance(entry, dict):
        return False
    restore_checked(model, entry, path)
    return True


def load_qat_yolo(path: str | Path, hint: str = "yolo val"):
    """An Ultralytics ``YOLO`` object for a QAT checkpoint, its model holding the exact fp32 QAT state."""
    from ultralytics import YOLO

    p = check_checkpoint_path(path)
    yolo = _load_errors(p, lambda: YOLO(str(p)))
    entry = require_qat(yolo.model, yolo.ckpt, p, hint)
    restore_checked(materialize(yolo.model, entry), entry, p)
    return yolo


def finished_message(path, epochs) -> str:
    """The one-line refusal to resume a finished run (Ultralytics' own meaning, with the yolo-qat command)."""
    return (f"'{path}': training to {epochs} epochs is finished, nothing to resume; start a new training without "
            f"resuming, i.e. 'yolo-qat train model={path}'")


def resume_refusal(path, ckpt: dict) -> str | None:
    """Why ``path`` (loaded as ``ckpt``) cannot be resumed, as a one-line message, or None if it can."""
    if ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None:
        return finished_message(path, (ckpt.get("train_args") or {}).get("epochs", "its"))
    entry = ckpt.get(CKPT_KEY)
    if isinstance(entry, dict) and entry.get("kind") == "deploy":
        return f"'{path}' is a deploy checkpoint without training state; resume from the run's last.pt"
    return None


__all__ = ["CKPT_KEY", "CKPT_FORMAT", "atomic_save", "carries_qat", "check_checkpoint_path", "deploy_pickle_and_entry",
           "materialize",
           "finished_message", "resume_refusal", "load_qat_model", "load_qat_yolo", "load_raw", "require_qat", "restore",
           "restore_checked", "restore_exact", "resume_entry", "resume_pickle", "scale_problems"]
