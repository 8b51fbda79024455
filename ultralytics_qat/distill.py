"""Distillation from the float teacher: the float model a QAT run starts from, frozen, supervises the quantized student.

The teacher is a copy of the float model taken before the quantizers go in, loaded with the same float weights, in
eval mode with every parameter frozen (BN statistics never move). It lives on the run (``QATRun.distiller``), outside
the student's module tree: no checkpoint, EMA copy or DDP wrapper of the student ever sees it. The hook is the
student's loss criterion: :class:`DistillCriterion` wraps Ultralytics' criterion on the training model only (not the
EMA, so validation losses stay the plain detection loss), runs one no-grad teacher forward on the batch's images and
appends ``weight * term * batch_size`` to the loss components (Ultralytics sums them and backpropagates).

Terms (``qat.distill.loss``), computed over the whole batch as Ultralytics computes its own losses:

- ``head``: per anchor a, with teacher class probabilities ``p = sigmoid(t / T)`` and confidence ``c_a = max p``,
  ``W = max(sum_a c_a, 1)`` (the teacher's soft object count, as Ultralytics divides by its target-score sum):
  class term ``sum_{a,k} KL_bin(p || sigmoid(s / T)) / W`` and box term
  ``sum_a c_a * mean_side KL(softmax(t_box / T) || softmax(s_box / T)) / W`` over the reg_max bins of each box side
  (the DFL distribution), both times ``T^2``. Both are 0 when the student matches the teacher.
- ``feat``: the head's input features (the neck outputs P3-P5), both expressed in the teacher's per-channel units
  ``(x - mean_t) / std_t`` (statistics over batch and space; ``std_t`` at least a tenth of the level's mean channel
  std, so a channel the teacher barely varies cannot blow the term up); mean squared difference, averaged over levels.
- ``both``: their sum.

Resume: a resumed run has no float model, so the entry records the float weights file (absolute path and SHA-256)
and the teacher is rebuilt from it; a missing or changed file is refused (the run would not be the same).
"""

from __future__ import annotations

import hashlib
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DistillConfig
from .errors import QATCheckpointError, QATError
from .quant import class_count

ENTRY_KEY = "distill_teacher"  # key of the teacher's source in a checkpoint's QAT entry


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN uses its running statistics and never updates them) and no gradient for any parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def head_outputs(preds) -> list[dict]:
    """The raw head dicts ({boxes, scores, feats}) of a detection model's output, train or eval mode, any head."""
    if isinstance(preds, (tuple, list)) and len(preds) == 2 and isinstance(preds[1], dict):
        preds = preds[1]  # eval mode: (decoded, raw)
    if not isinstance(preds, dict):
        raise QATError("qat.distill needs a detection head that returns its raw outputs (boxes, scores, feats)")
    if "one2many" in preds:  # end-to-end heads (YOLOv10/26): both branches
        return [preds["one2many"], preds["one2one"]]
    return [preds]


def head_term(s: dict, t: dict, temperature: float) -> torch.Tensor:
    """Class KL plus box-distribution KL, teacher-confidence weighted (see module docstring)."""
    T = temperature
    s_cls, t_cls = s["scores"].float() / T, t["scores"].float() / T  # (b, nc, A) logits
    p = t_cls.sigmoid()
    conf = p.amax(1)  # (b, A)
    norm = conf.sum().clamp_min(1.0)
    # binary KL(p || q) = BCE(s, p) - H(p); H(p) has no gradient and makes the term 0 at a match
    kl_cls = F.binary_cross_entropy_with_logits(s_cls, p, reduction="sum") - F.binary_cross_entropy_with_logits(
        t_cls, p, reduction="sum")
    b, c, a = s["boxes"].shape
    sides = 4
    s_box = (s["boxes"].float() / T).view(b, sides, c // sides, a)  # (b, 4, reg_max, A)
    t_box = (t["boxes"].float() / T).view(b, sides, c // sides, a)
    if c // sides > 1:
        kl_box = F.kl_div(F.log_softmax(s_box, 2), F.log_softmax(t_box, 2), reduction="none", log_target=True).sum(2)
    else:  # reg_max 1 (no distribution): squared difference of the side distances
        kl_box = (s_box - t_box).squeeze(2).pow(2)
    box = (kl_box.mean(1) * conf).sum()
    return (kl_cls + box) / norm * T * T


def feat_term(s: dict, t: dict) -> torch.Tensor:
    """MSE of the head input features in the teacher's per-channel units, averaged over levels."""
    terms = []
    for fs, ft in zip(s["feats"], t["feats"]):
        ft = ft.float()
        # the teacher's mean cancels in the difference; a channel the teacher barely varies (dead after SiLU, or
        # constant over a small batch) is measured in a tenth of the level's spread, not in its own ~0 std
        std = ft.std((0, 2, 3), keepdim=True)
        std = torch.maximum(std, 0.1 * std.mean().clamp_min(1e-6))  # a tensor: no host sync
        terms.append(((fs.float() - ft) / std).pow(2).mean())
    return torch.stack(terms).mean()


class Distiller:
    """The frozen float teacher and the distillation term (see module docstring).

    Args:
        teacher: The float model (a copy taken before quantizer insertion, float weights loaded); frozen here.
        cfg: The ``qat.distill`` section.
        source: Where the teacher's weights came from, ``{"path", "sha256"}`` (recorded in checkpoint entries), or None.
    """

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, source: dict | None):
        self.teacher = freeze(teacher)
        self.cfg = cfg
        self.source = source
        self.total, self.count = 0.0, 0

    @classmethod
    def from_float(cls, student_float: nn.Module, weights: nn.Module, cfg: DistillConfig) -> Distiller:
        """The teacher from the float model about to be quantized (deep-copied now) and the float ``weights``."""
        teacher = deepcopy(student_float)
        teacher.load(weights, verbose=False) if hasattr(teacher, "load") else teacher.load_state_dict(weights.state_dict())
        path = getattr(weights, "pt_path", None)
        source = None
        if path and Path(path).is_file():
            source = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
        return cls(teacher, cfg, source)

    @classmethod
    def from_entry(cls, student_float: nn.Module, entry: dict, cfg: DistillConfig, where: str) -> Distiller:
        """The teacher of a QAT checkpoint's run, rebuilt from the float weights file its entry records."""
        from .checkpoint import load_raw

        source = entry.get(ENTRY_KEY) if isinstance(entry, dict) else None
        if not source:
            raise QATCheckpointError(
                f"'{where}' was trained with qat.distill but records no float teacher file (its float model was not "
                "loaded from a .pt); start a new QAT run from the float weights file"
            )
        path = Path(source["path"])
        if not path.is_file():
            raise QATCheckpointError(
                f"'{where}' distils from the float model '{path}', which no longer exists; put that file back to "
                "continue this run"
            )
        if file_sha256(path) != source["sha256"]:
            raise QATCheckpointError(
                f"'{where}' distils from '{path}', but that file changed since the run started (SHA-256 differs); "
                "restore the original float weights to continue this run"
            )
        weights, _ = load_raw(path)
        teacher = deepcopy(student_float)
        teacher.load(weights, verbose=False)
        return cls(teacher, cfg, dict(source))

    def to(self, device) -> Distiller:
        self.teacher.to(device)
        return self

    def term(self, preds, img: torch.Tensor) -> torch.Tensor:
        """The unweighted distillation term for the student's raw ``preds`` on images ``img``."""
        with torch.no_grad():
            t_out = head_outputs(self.teacher(img))
        s_out = head_outputs(preds)
        kind = self.cfg.loss
        terms = []
        for s, t in zip(s_out, t_out):
            if kind in ("head", "both"):
                terms.append(head_term(s, t, self.cfg.temperature))
            if kind in ("feat", "both"):
                terms.append(feat_term(s, t))
        return torch.stack(terms).sum() / len(s_out)

    def epoch_mean(self) -> float:
        """Mean unweighted term per batch since the last call (for ``qat/distill_loss``); resets."""
        mean = float(self.total) / self.count if self.count else float("nan")
        self.total, self.count = 0.0, 0
        return mean

    def wrap(self, model: nn.Module) -> None:
        """Make ``model``'s loss criterion add the distillation term (the training model only; idempotent)."""
        crit = getattr(model, "criterion", None)
        if isinstance(crit, DistillCriterion):
            crit.distiller = self
            return
        model.criterion = DistillCriterion(crit if crit is not None else model.init_criterion(), self)


def _same(obj):
    return obj


class DistillCriterion:
    """Ultralytics' loss criterion plus the distillation term as one more loss component (not an ``nn.Module``).

    ``task`` is the wrapped criterion (post-QAT stages use it: they train without the teacher); other attributes
    (e.g. ``update`` of end-to-end losses, the gains) are the wrapped criterion's.
    """

    def __init__(self, task, distiller: Distiller):
        self.task = task
        self.distiller = distiller

    def __getattr__(self, name):
        if name in {"task", "distiller"} or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.task, name)

    def __reduce__(self):  # a pickled or deep-copied student carries the plain criterion, never the teacher
        return _same, (self.task,)

    def __call__(self, preds, batch):
        loss, items = self.task(preds, batch)
        d = self.distiller
        term = d.term(preds, batch["img"])
        d.total, d.count = d.total + term.detach(), d.count + 1  # a tensor: no host sync per step
        extra = (d.cfg.weight * term * batch["img"].shape[0]).to(loss.dtype)
        return torch.cat([loss.reshape(-1), extra.reshape(1)]), items


def build_distiller(student_float: nn.Module, weights: nn.Module | None, from_qat: bool, cfg: DistillConfig) -> Distiller:
    """The run's teacher: from the float ``weights``, or (a QAT checkpoint: resume) from the float file it records."""
    if weights is None:
        raise QATError(
            "qat.distill needs the float weights the run starts from: pass model=<float>.pt (a .yaml model starts "
            "untrained, so its teacher would teach noise), or set qat.distill.weight=0"
        )
    if not from_qat:
        src_nc, nc = class_count(weights), class_count(student_float)
        if cfg.loss != "feat" and None not in (src_nc, nc) and src_nc != nc:
            raise QATError(
                f"qat.distill.loss={cfg.loss} needs a teacher trained on this dataset's classes, but the float model "
                f"predicts {src_nc} classes and the dataset has {nc}; fine-tune it in float on this data first and "
                "distil from that, or use qat.distill.loss=feat (neck features only)"
            )
        return Distiller.from_float(student_float, weights, cfg)
    path = getattr(weights, "pt_path", None)
    ckpt = torch.load(path, map_location="cpu", weights_only=False) if path and Path(path).is_file() else {}
    return Distiller.from_entry(student_float, ckpt.get("qat"), cfg, path or "the QAT checkpoint")
