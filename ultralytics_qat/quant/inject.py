"""Which convs of a YOLO detection model get fake quantizers, at which bit widths, and the swap itself.

Policy: every ``Conv.conv`` (``DWConv`` included) is quantized. Left in float by default, as in Ultralytics' own INT8
QAT: the DFL conv (fixed arange weights on a softmax input) and the head's bare final 1x1 convs (the box and class
outputs), which are plain ``nn.Conv2d`` outside any ``Conv``. Also left in float: the branches of ``RepVGGDW``
(YOLOv10), which Ultralytics merges into one conv at inference — two quantized grids cannot be merged exactly.
The first conv (the image input) and the last quantized convs before the float head outputs take
``first_layer_bits`` / ``last_layer_bits``; ``overrides`` and ``exclude`` adjust layers by name glob.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..config import QATConfig
from ..errors import QATConfigError
from .qconv import QConv2d
from .quantizer import LSQQuantizer

_HEAD_BRANCHES = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")


@dataclass
class LayerPlan:
    """What one conv becomes: its name, weight and activation bits (None = float) and role."""

    name: str
    weight_bits: int | None
    activation_bits: int | None
    granularity: str
    role: str = ""


def _conv_classes():
    from ultralytics.nn.modules.block import RepVGGDW
    from ultralytics.nn.modules.conv import Conv

    return Conv, RepVGGDW


def candidate_convs(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` inside every Ultralytics ``Conv`` (``model.0.conv``, ...), in module order."""
    conv_cls, rep_cls = _conv_classes()
    rep = {n for n, m in model.named_modules() if isinstance(m, rep_cls)}
    names = []
    for name, m in model.named_modules():
        if isinstance(m, conv_cls) and isinstance(getattr(m, "conv", None), nn.Conv2d):
            if not any(name.startswith(r + ".") for r in rep):
                names.append(f"{name}.conv")
    return names


def _head(model: nn.Module) -> nn.Module | None:
    """The detection head: the last module of an Ultralytics model's ``model`` Sequential (None otherwise)."""
    inner = getattr(model, "model", model)
    return inner[-1] if isinstance(inner, nn.Sequential) else None


def class_count(model: nn.Module) -> int | None:
    """How many classes the detection head predicts (None for a model without one)."""
    return getattr(_head(model), "nc", None)


def last_convs(model: nn.Module) -> set[str]:
    """Names of the last ``Conv.conv`` of each detection-head branch, the ones feeding the float 1x1 outputs."""
    conv_cls, _ = _conv_classes()
    head = _head(model)
    if head is None:
        return set()
    head_name = next((n for n, m in model.named_modules() if m is head), "")
    out = set()
    for attr in _HEAD_BRANCHES:
        branches = getattr(head, attr, None)
        if not isinstance(branches, nn.ModuleList):
            continue
        for i, branch in enumerate(branches):
            convs = [n for n, m in branch.named_modules() if isinstance(m, conv_cls)]
            if convs:
                out.add(f"{head_name}.{attr}.{i}.{convs[-1]}.conv")
    return out


def plan_layers(model: nn.Module, cfg: QATConfig) -> list[LayerPlan]:
    """Decide the bit widths of every candidate conv; globs that match nothing raise :class:`QATConfigError`."""
    names = candidate_convs(model)
    if not names:
        raise QATConfigError("the model has no Ultralytics Conv layers to quantize; pass a YOLO detection model")
    for key, globs in (("exclude", cfg.exclude), ("overrides", list(cfg.overrides))):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(n.rsplit(".", 1)[0], glob) for n in names):
                raise QATConfigError(
                    f"qat '{key}' glob '{glob}' matches no quantizable conv; names look like "
                    f"'{names[0]}' ... '{names[-1]}' (a glob may also name the parent, e.g. 'model.0')"
                )
    unknown = sorted(set(cfg.budget.choice) - set(names))
    if unknown:
        raise QATConfigError(f"qat 'budget.choice' names '{unknown[0]}', which is not a quantizable conv of this model; "
                             "it belongs to another model: leave budget.choice empty")
    last = last_convs(model)
    plans = []
    for i, name in enumerate(names):
        parent = name.rsplit(".", 1)[0]
        match = lambda g: fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(parent, g)  # noqa: E731
        if any(match(g) for g in cfg.exclude):
            continue
        wb, ab, role = cfg.weight.bits, cfg.activation.bits, ""
        if i == 0 and cfg.first_layer_bits is not None:
            wb, ab, role = cfg.first_layer_bits, cfg.first_layer_bits, "first"
        elif name in last and cfg.last_layer_bits is not None:
            wb, role = cfg.last_layer_bits, "last"
            ab = None if cfg.activation.bits is None else cfg.last_layer_bits
        for glob, spec in cfg.overrides.items():
            if match(glob):
                wb = spec.get("weight_bits", wb)
                ab = spec.get("activation_bits", ab)
                role = role or "override"
        if not role and name in cfg.budget.choice:  # mixed precision chosen under qat.budget (layers without a role)
            wb, role = cfg.budget.choice[name], "budget"
        if wb is None:  # an override set weight_bits: null -> the layer stays float
            continue
        plans.append(LayerPlan(name, wb, ab, cfg.weight.granularity, role))
    return plans


def quantize_model(model: nn.Module, cfg: QATConfig) -> list[LayerPlan]:
    """Swap the planned convs for :class:`QConv2d` in place; returns the plan. Scales still need calibration."""
    if any(isinstance(m, QConv2d) for m in model.modules()):
        raise QATConfigError("model is already quantized; load it as a QAT checkpoint instead of quantizing again")
    plans = plan_layers(model, cfg)
    if not plans and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise QATConfigError(
            f"qat.exclude={cfg.exclude} leaves every conv in float, which is not QAT; exclude fewer layers, or train "
            "a float model with plain 'yolo train'"
        )
    modules = dict(model.named_modules())
    for p in plans:
        parent_name, attr = p.name.rsplit(".", 1)
        conv = getattr(modules[parent_name], attr)
        channels = conv.out_channels if p.granularity == "channel" else 1
        wq = LSQQuantizer(p.weight_bits, "weight", channels, narrow_range=cfg.weight.narrow_range, init=cfg.weight.init)
        aq = None
        if p.activation_bits is not None:
            grid = "unsigned" if p.role == "first" and cfg.activation.grid == "auto" else cfg.activation.grid
            aq = LSQQuantizer(p.activation_bits, "activation", 1, grid=grid, init=cfg.activation.init)
            aq.scheduled = not p.role
        wq.scheduled = not p.role
        setattr(modules[parent_name], attr, QConv2d.from_conv(conv, wq, aq))
    return plans


def format_plan(plans: list[LayerPlan], total_convs: int | None = None) -> str:
    """A compact table of quantized layers (consecutive identical rows collapsed) and totals."""
    rows, prev = [], None
    for p in plans:
        key = (p.weight_bits, p.activation_bits, p.granularity, p.role)
        if prev is not None and prev[0] == key:
            prev[1].append(p.name)
            continue
        prev = (key, [p.name])
        rows.append(prev)
    width = max([42] + [len(f"{n[0]} .. {n[-1]} ({len(n)})") if len(n) > 1 else len(n[0]) for _, n in rows]) + 1
    lines = [f"{'layers':<{width}}{'W bits':>7}{'A bits':>8}  {'weights':<12}{'role'}"]
    for (wb, ab, gran, role), names in rows:
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        lines.append(f"{label:<{width}}{wb:>7}{ab if ab is not None else 'float':>8}  {'per-' + gran:<12}{role}".rstrip())
    n_w = {b: sum(p.weight_bits == b for p in plans) for b in sorted({p.weight_bits for p in plans})}
    summary = ", ".join(f"{n} at W{b}" for b, n in n_w.items())
    float_acts = sum(p.activation_bits is None for p in plans)
    total = f" of {total_convs} convs" if total_convs is not None else ""
    lines.append(f"quantized {len(plans)}{total}: {summary}; {float_acts} with float inputs")
    return "\n".join(lines)
