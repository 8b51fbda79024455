"""The qat.yaml schema: defaults, validation with one-line errors, loading and dotted overrides.

A :class:`QATConfig` is a tree of small dataclasses. Every leaf is declared with :func:`option`, which records its
type, allowed values or range, and a one-line description; validation, the error messages and the README's key
reference all come from those declarations, so they cannot drift apart.

Examples:
    >>> cfg = QATConfig.load("qat.yaml", overrides={"weight.bits": 3})
    >>> cfg.weight.bits
    3
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import QATConfigError

CFG_DIR = Path(__file__).parent / "cfg"
DEFAULT_QAT_YAML = CFG_DIR / "qat.yaml"


def option(default: Any, kind: type | tuple, doc: str, choices=None, low=None, high=None, nullable=False):
    """Declare one qat.yaml leaf: its default, type, allowed values and one-line description."""
    return field(
        default_factory=(lambda: type(default)(default)) if isinstance(default, (dict, list)) else MISSING,
        default=MISSING if isinstance(default, (dict, list)) else default,
        metadata={"kind": kind, "doc": doc, "choices": choices, "low": low, "high": high, "nullable": nullable},
    )


@dataclass
class WeightQuantConfig:
    """How convolution weights are fake-quantized."""

    bits: int = option(4, int, "weight bit width", low=2, high=8)
    granularity: str = option("channel", str, "one scale per output channel or per tensor", ("channel", "tensor"))
    narrow_range: bool = option(
        True, bool, "symmetric grid [-(2^(b-1)-1), 2^(b-1)-1]: BN folds exactly into per-channel scales at export"
    )
    init: str = option("lsq", str, "scale init: LSQ 2*mean|w|/sqrt(qp), MSE search, or max|w|/qp", ("lsq", "mse", "minmax"))


@dataclass
class ActivationQuantConfig:
    """How convolution inputs are fake-quantized (always one scale per tensor)."""

    bits: int | None = option(4, int, "activation bit width; null keeps activations in float (e.g. W4A16)", low=2, high=8, nullable=True)
    grid: str = option(
        "auto",
        str,
        "auto: unsigned if calibration saw no negatives, else an integer zero point covering [min, max]",
        ("auto", "signed", "unsigned"),
    )
    init: str = option("mse", str, "scale init from calibration batches", ("mse", "minmax", "ema_minmax"))


@dataclass
class CalibrationConfig:
    """The calibration pass that initialises scales before training (skipped for QAT checkpoints)."""

    batches: int = option(8, int, "training batches run (no gradient) to initialise activation scales", low=1)


@dataclass
class OptimConfig:
    """Optimizer treatment of the learned quantizer scales."""

    scale_lr_mult: float = option(
        1.0, float, "learning-rate multiplier of the scale parameter group (an Adam step moves a scale by about "
        "lr * mult: at 1.0 small weight scales crossed zero; the bundled qat.yaml sets 0.1)", low=0.0, high=100.0,
    )
    scale_weight_decay: float = option(0.0, float, "weight decay of the scale parameter group", low=0.0)


@dataclass
class ScheduleConfig:
    """Staged bit widths: stage i runs from milestones[i-1] (epoch, 0-based) to milestones[i]."""

    milestones: list = option([], list, "epochs at which the next stage starts, e.g. [2, 4]; [] = one stage")
    weight_bits: list = option([], list, "weight bits per stage, e.g. [8, 6, 4]; [] = weight.bits throughout")
    activation_bits: list = option([], list, "activation bits per stage, e.g. [8, 8, 4]; [] = activation.bits throughout")
    rewarmup_epochs: float = option(0.0, float, "linear LR re-warm-up after each stage step, in epochs", low=0.0)


@dataclass
class EMAConfig:
    """The EMA model that is validated, saved and exported (latent weights, BN and quantizer scales)."""

    decay: float = option(0.9999, float, "EMA decay (WACV'24 and Ultralytics: 0.9999)", low=0.0, high=1.0)
    tau: float = option(2000.0, float, "EMA warm-up ramp in optimizer steps (Ultralytics: 2000)", low=1.0)


@dataclass
class EADConfig:
    """EMA-aware distance (seed 002, IV-B): smooth latent weights by their distance to the grid, and the scales."""

    start: float | None = option(
        None, float, "fraction of training after which EAD runs (paper: last 20 of 100 epochs = 0.8); null = off",
        low=0.0, high=1.0, nullable=True,
    )
    k: float = option(1.0, float, "alpha = k * |w/s - round(w/s)| (distance in grid steps, alpha bounded below 1)", low=0.0, high=2.0)
    mu_init: float = option(0.1, float, "initial scale smoothing mu, annealed linearly to 0 at the last epoch", low=0.0, high=1.0)


@dataclass
class BNConfig:
    """BatchNorm statistics under oscillating weights (ICML'22)."""

    reestimate: bool = option(True, bool, "re-estimate BN statistics of the EMA model before each validation")
    batches: int = option(8, int, "training batches used per re-estimation (capped at one pass over the data)", low=1)
    freeze_epoch: int | None = option(None, int, "from this epoch on keep BN in eval mode while training; null = never", low=0, nullable=True)


@dataclass
class OscillationConfig:
    """Oscillation tracking, dampening and iterative freezing of weights (ICML'22, Nagel et al.)."""

    track: bool = option(True, bool, "track per-weight oscillation frequency of layers with <= max_bits weights")
    max_bits: int = option(4, int, "only layers at this weight width or lower are tracked", low=2, high=8)
    momentum: float = option(0.01, float, "EMA momentum m of the oscillation frequency", low=1e-6, high=1.0)
    dampen_lambda: float = option(0.0, float, "final dampening loss weight, cosine-annealed up from 0; 0 = off", low=0.0)
    dampen_start: float = option(0.25, float, "fraction of training before dampening starts", low=0.0, high=1.0)
    freeze_threshold: float | None = option(None, float, "initial freezing threshold (paper 0.1); null = no freezing", low=0.0, high=1.0, nullable=True)
    freeze_final_threshold: float = option(0.01, float, "threshold at the end of training (cosine annealed)", low=0.0, high=1.0)
    freeze_start: float = option(0.25, float, "fraction of training before freezing starts", low=0.0, high=1.0)


@dataclass
class ScaleGradConfig:
    """ScaleGrad (seed 002, IV-A): PulseSmooth scale gradient and distance-aware weight gradient."""

    delta: float = option(0.0, float, "PulseSmooth width delta in (0, 0.5); 0 = off", low=0.0, high=0.49)
    k: float = option(0.0, float, "weight gradient * exp(-k |w/s - round(w/s)|); 0 = off", low=0.0)


@dataclass
class QCConfig:
    """Quantization Correction (WACV'24): one post-QAT epoch learning per-channel output scale and shift."""

    enabled: bool = option(False, bool, "run QC after the last QAT epoch and fold it into BN")
    epochs: int = option(1, int, "QC epochs (paper: 1)", low=1)
    lr: float = option(1e-3, float, "QC learning rate (Adam)", low=0.0)


@dataclass
class AFWConfig:
    """Adaptive finetuning of frozen oscillating weights (seed 002, IV-C): learned integer offsets in {-1, 0, 1}."""

    enabled: bool = option(False, bool, "run AFW after the last QAT epoch (needs oscillation tracking)")
    epochs: int = option(1, int, "AFW epochs (paper: 10)", low=1)
    gamma: float = option(1.1, float, "offset g = clip(gamma * tanh(theta), -1, 1)", low=1.0)
    lam: float = option(0.1, float, "weight of the regulariser g^2 (1 - g^2)^2", low=0.0)
    lr: float = option(1e-3, float, "AFW learning rate (Adam)", low=0.0)
    min_frequency: float = option(0.005, float, "weights oscillating more often than this (or frozen) are finetuned", low=0.0, high=1.0)


@dataclass
class FinetuneConfig:
    """Ultralytics training arguments QAT chooses when it starts from a trained float checkpoint (not a yaml, a QAT
    checkpoint or a resume), unless the user set them; null = Ultralytics' own choice, the measured best so far
    (BENCHMARKS.md "QAT fine-tune defaults"), hence the default everywhere."""

    optimizer: str | None = option(None, str, "optimizer (Ultralytics' auto picks one and an lr for training from scratch)", nullable=True)
    lr0: float | None = option(None, float, "initial learning rate (an Adam step moves a weight by about lr)", low=0.0, nullable=True)
    warmup_epochs: float | None = option(None, float, "linear lr warm-up epochs", low=0.0, nullable=True)
    warmup_bias_lr: float | None = option(None, float, "bias lr at the warm-up start (Ultralytics 0.1: a spike on a trained model)", low=0.0, nullable=True)
    mosaic: float | None = option(None, float, "mosaic augmentation probability", low=0.0, high=1.0, nullable=True)
    close_mosaic: int | None = option(None, int, "epochs at the end without mosaic", low=0, nullable=True)


@dataclass
class CollapseConfig:
    """The collapse guard: peak-then-drop of validation fitness detected, logged to qat_events.jsonl, acted on."""

    enabled: bool = option(True, bool, "watch validation fitness for a collapse (README 'Collapse guard')")
    drop: float = option(0.1, float, "a validation counts as a drop when fitness < (1 - drop) * best fitness so far", low=0.01, high=0.99)
    patience: int = option(2, int, "consecutive dropped validations that make a collapse", low=1)
    min_epochs: int = option(2, int, "first epoch (1-based) whose validation may count as a drop; earlier ones only set the best", low=1)
    action: str = option(
        "restore", str, "warn: log only; restore: best EMA state back, BN re-estimated, lr x lr_factor; freeze: best "
        "EMA state back, then all quantized weights' integer codes frozen", ("warn", "restore", "freeze"),
    )
    lr_factor: float = option(0.1, float, "restore multiplies every learning rate (and its schedule) by this", low=1e-4, high=1.0)


@dataclass
class DistillConfig:
    """Distillation from the float teacher: the frozen float model the run starts from supervises the QAT student."""

    weight: float = option(
        0.0, float, "weight of the distillation term added to the detection loss (1 = the size of the detection "
        "loss's own terms, both per batch); 0 = off", low=0.0, high=100.0,
    )
    loss: str = option(
        "head", str, "head: class KL + box-distribution (DFL) KL per anchor, weighted by the teacher's confidence; "
        "feat: MSE of the neck features (the head inputs) in the teacher's per-channel units; both: their sum",
        ("head", "feat", "both"),
    )
    temperature: float = option(1.0, float, "softening temperature T of the head terms (multiplied back by T^2)", low=0.1, high=20.0)


@dataclass
class BudgetConfig:
    """Mixed precision under a size budget: per-layer weight bits chosen from a layer-sensitivity file."""

    avg_weight_bits: float | None = option(
        None, float, "average weight bits over all quantized weight elements (first/last layers and overrides at "
        "their own bits included) that the chosen widths must not exceed; null = off", low=2.0, high=8.0, nullable=True,
    )
    sensitivity: str | None = option(
        None, str, "sensitivity.json of 'yolo-qat sensitivity' (same model and layer policy); its measured widths are "
        "the candidates", nullable=True,
    )
    choice: dict = option(
        {}, dict, "conv name -> weight bits: filled in by the run from the two keys above and saved in checkpoints "
        "(resume and export reuse it); leave empty",
    )


@dataclass
class QATConfig:
    """Complete QAT recipe. Build with :meth:`load` (yaml + overrides) or :meth:`from_dict`."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    first_layer_bits: int | None = option(8, int, "weight and activation bits of the first conv; null = like the rest", low=2, high=8, nullable=True)
    last_layer_bits: int | None = option(
        8, int, "bits of the last quantized convs before the float head outputs; null = like the rest", low=2, high=8, nullable=True
    )
    exclude: list = option([], list, "globs of conv names (e.g. 'model.22.*') left in float")
    overrides: dict = option({}, dict, "glob -> {weight_bits, activation_bits} per-layer bit widths")
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: bool = option(False, bool, "allow mixed precision during QAT (GPU); quantizers always compute in fp32")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    ead: EADConfig = field(default_factory=EADConfig)
    bn: BNConfig = field(default_factory=BNConfig)
    oscillation: OscillationConfig = field(default_factory=OscillationConfig)
    scalegrad: ScaleGradConfig = field(default_factory=ScaleGradConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    afw: AFWConfig = field(default_factory=AFWConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, source: str = "qat") -> QATConfig:
        """Validate a nested dict (as read from qat.yaml) into a config; unknown keys and bad values raise."""
        return _build(cls, data or {}, prefix="", source=source)

    @classmethod
    def load(cls, qat: str | Path | dict | QATConfig | None = None, overrides: dict | None = None) -> QATConfig:
        """Load a config from a yaml path, a bundled recipe name, a dict or a config, then apply dotted overrides.

        Args:
            qat: Path to a qat.yaml, the name of a bundled recipe (e.g. ``"qat.yaml"``), a dict, a QATConfig, or
                None for the bundled default.
            overrides: Dotted keys to values, e.g. ``{"weight.bits": 3}`` (from ``qat.weight.bits=3`` on the CLI).
        """
        if isinstance(qat, QATConfig):
            data, source = qat.to_dict(), "qat"
        elif isinstance(qat, dict):
            data, source = qat, "qat"
        elif qat is not None and not isinstance(qat, (str, Path)):
            raise QATConfigError(
                f"qat={_show(qat)} ({type(qat).__name__}) is not a qat config; pass a qat.yaml path, a bundled recipe "
                f"name ({', '.join(bundled_recipes())}), a dict or a QATConfig"
            )
        else:
            path = resolve_qat_yaml(qat)
            data, source = _read_yaml(path), path.name
        merged = _apply_overrides(data, overrides or {})
        try:
            return cls.from_dict(merged, source=source)
        except QATConfigError as e:
            if not overrides or _fails(cls, data, source):
                raise
            msg = str(e).removeprefix(f"{source}: ")  # the file was fine: blame what the overrides changed
            keys = ", ".join(f"qat.{k}" for k in overrides)
            raise QATConfigError(f"override {keys}: {msg}") from None

    def to_dict(self) -> dict:
        """Plain nested dict (yaml/pickle friendly); ``QATConfig.from_dict(cfg.to_dict()) == cfg``."""
        return asdict(self)


def _fails(cls, data: dict, source: str) -> bool:
    try:
        cls.from_dict(data, source=source)
    except QATConfigError:
        return True
    return False


def resolve_qat_yaml(qat: str | Path | None) -> Path:
    """Find a qat.yaml: an existing path, else a bundled recipe by name (``stable``, ``recipes/lsq.yaml``)."""
    if qat is None:
        return DEFAULT_QAT_YAML
    path = Path(qat)
    if path.is_file():
        return path
    name = path.name if path.suffix in {".yaml", ".yml"} else f"{path.name}.yaml"
    for candidate in (CFG_DIR / name, CFG_DIR / "recipes" / name):
        if candidate.is_file() and (len(path.parts) == 1 or path.parent.name in {"cfg", "recipes"}):
            return candidate
    raise QATConfigError(
        f"qat file '{qat}' not found; pass an existing path or a bundled recipe: {', '.join(bundled_recipes())}"
    )


def bundled_recipes() -> list[str]:
    """Names that :func:`resolve_qat_yaml` finds without a path (``qat`` = the default qat.yaml)."""
    return sorted(p.stem for p in (*CFG_DIR.glob("*.yaml"), *(CFG_DIR / "recipes").glob("*.yaml")))


def describe_options(cls=QATConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every leaf, in declaration order: the README's reference table."""
    rows = []
    for f in fields(cls):
        key = prefix + f.name
        if _is_section(f):
            rows += describe_options(f.default_factory, key + ".")
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
            rows.append((key, default, _allowed(f) + f.metadata["doc"]))
    return rows


# --------------------------------------------------------------------------------------------------------------------
def _is_section(f) -> bool:
    return f.default_factory is not MISSING and is_dataclass(f.default_factory)


def _leaf_keys(cls, prefix="") -> list[str]:
    return [k for k, _, _ in describe_options(cls, prefix)]


def _allowed(f) -> str:
    m = f.metadata
    if m["choices"]:
        return f"one of {'|'.join(m['choices'])}: "
    if m["low"] is not None and m["high"] is not None:
        return f"{m['low']}..{m['high']}{' or null' if m['nullable'] else ''}: "
    if m["low"] is not None:
        return f">= {m['low']}: "
    return ""


def _show(value: Any) -> str:
    """A short repr for messages: bounded in length and depth, safe for self-referencing YAML aliases."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 40, 40, 40


def read_yaml_file(path: Path, error: type[Exception], name: str, kind: str, nesting_hint: str):
    """``yaml.safe_load`` of a file, every way it can fail turned into one-line ``error`` naming ``name``."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{name} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise error(f"{name} could not be read ({e.strerror}); pass a readable {kind}") from None
    except RecursionError:
        raise error(f"{name} is nested too deeply; {nesting_hint}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}: {getattr(e, 'problem', e)})" if mark else ""
        raise error(f"{name} is not valid YAML{where}; fix the syntax") from None


def _read_yaml(path: Path) -> dict:
    """The mapping of qat keys in a qat.yaml (unwrapping a lone ``qat:`` block), or a one-line error."""
    data = read_yaml_file(path, QATConfigError, str(path), "qat.yaml", "qat keys are at most 3 levels deep")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QATConfigError(f"{path} must hold a mapping of qat keys, got {type(data).__name__} {_show(data)}")
    if set(data) != {"qat"}:
        return data
    if not isinstance(data["qat"], dict):
        raise QATConfigError(
            f"{path}: the 'qat:' block must hold a mapping of qat keys, got {type(data['qat']).__name__} "
            f"{_show(data['qat'])}; indent keys under it (e.g. 'qat:' then '  weight: {{bits: 4}}') or drop the block"
        )
    return data["qat"]


def _apply_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys (``weight.bits``) in a copy of the nested dict; only the dicts on each key's path are copied."""
    data = dict(data)
    for key, value in overrides.items():
        parts = _override_path(str(key))
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise QATConfigError(f"qat override '{key}': '{part}' is not a section")
            node[part] = child = dict(child or {})
            node = child
        node[parts[-1]] = value
    return data


def _override_path(key: str) -> list[str]:
    """Split a dotted key, keeping a per-layer glob whole: ``overrides.model.1.conv.weight_bits`` has 3 parts."""
    parts = key.split(".")
    if parts[0] != "overrides" or len(parts) < 3:
        return parts
    if difflib.get_close_matches(parts[-1], _OVERRIDE_KEYS, n=1, cutoff=0.6):  # a bits key, maybe misspelt
        return [parts[0], ".".join(parts[1:-1]), parts[-1]]
    return [parts[0], ".".join(parts[1:])]  # overrides.model.1.conv={weight_bits: 6}


def _unknown_key_error(key: str, valid: list[str], source: str) -> QATConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1] if "." not in valid[0] else key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return QATConfigError(f"{source}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        what = f"'{prefix.rstrip('.')}'" if prefix else "a qat config"
        raise QATConfigError(f"{source}: {what} must be a mapping of keys, got {type(data).__name__} {_show(data)}")
    by_name = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in by_name:
            raise _unknown_key_error(prefix + str(key), _leaf_keys(QATConfig), source)
    kwargs = {}
    for name, f in by_name.items():
        key = prefix + name
        if _is_section(f):
            section = data.get(name, {})
            if not isinstance(section, dict):
                raise _section_value_error(key, section, f.default_factory, source)
            kwargs[name] = _build(f.default_factory, section, key + ".", source)
        elif name in data:
            kwargs[name] = _check_value(key, data[name], f, source)
    cfg = cls(**kwargs)
    if cls is QATConfig:
        _check_overrides(cfg, source)
    return cfg


# Switches that turn a section's feature off: the hint when a section is given a value (qat.qc=0, qat.ead=null).
_SECTION_OFF = {
    "schedule": "qat.schedule.milestones=[]",
    "ead": "qat.ead.start=null",
    "bn": "qat.bn.reestimate=false",
    "oscillation": "qat.oscillation.freeze_threshold=null (freezing) or qat.oscillation.track=false (tracking)",
    "scalegrad": "qat.scalegrad.delta=0 and qat.scalegrad.k=0",
    "qc": "qat.qc.enabled=false",
    "afw": "qat.afw.enabled=false",
    "collapse": "qat.collapse.enabled=false",
    "finetune": "null for each key, e.g. qat.finetune.lr0=null",
    "distill": "qat.distill.weight=0",
    "budget": "qat.budget.avg_weight_bits=null",
}


def _section_value_error(key: str, value: Any, cls, source: str) -> QATConfigError:
    """A section (``qc``, ``oscillation``) given a value instead of keys: name the key that does what was meant."""
    if key in _SECTION_OFF:
        hint = f"to switch it off use {_SECTION_OFF[key]}"
    else:
        first, default, _ = describe_options(cls, key + ".")[0]
        hint = f"set its keys instead, e.g. qat.{first}={_yaml_text(default)}"
    return QATConfigError(f"{source}: '{key}' is a section of keys, not a value (got {_show(value)}); {hint}")


def _yaml_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings: 1e-4, 2E3, 1.0e3 (1.1 wants a dot and a signed exponent).
_EXP_FLOAT = re.compile(r"[-+]?(\.\d+|\d+\.?\d*)[eE][-+]?\d+")


def _as_kind(value: Any, kind: type) -> Any:
    """Coerce what YAML gives into ``kind`` where that loses nothing (3 -> 3.0, 4.0 -> 4, '1e-4' -> 0.0001)."""
    if kind is float and isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
        return float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # OverflowError for ints beyond float range: the caller reports it
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_value(key: str, value: Any, f, source: str) -> Any:
    m = f.metadata
    kind = m["kind"]
    allowed = _allowed(f).rstrip(": ") or kind.__name__
    example = f"(e.g. '{key}={_yaml_text(f.default) if f.default is not MISSING else f.default_factory()}')"
    if value is None:
        if m["nullable"]:
            return None
        raise QATConfigError(f"{source}: '{key}' may not be null; allowed: {allowed} {example}")
    try:
        value = _as_kind(value, kind)
    except OverflowError:
        raise QATConfigError(
            f"{source}: '{key}={_show(value)}' is too large for a float; allowed: {allowed} {example}"
        ) from None
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise QATConfigError(
            f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {_show(value)}; "
            f"allowed: {allowed} {example}"
        )
    if kind is float and not math.isfinite(value):
        raise QATConfigError(f"{source}: '{key}={value}' is not a finite number; allowed: {allowed} {example}")
    if m["choices"] and value not in m["choices"]:
        raise QATConfigError(f"{source}: '{key}={value}' is not allowed; use one of {', '.join(m['choices'])}")
    if (m["low"] is not None and value < m["low"]) or (m["high"] is not None and value > m["high"]):
        raise QATConfigError(f"{source}: '{key}={value}' is out of range; allowed: {allowed}")
    return value


_OVERRIDE_KEYS = {"weight_bits", "activation_bits"}


def _check_schedule(cfg: QATConfig, source: str) -> None:
    sch = cfg.schedule
    stages = len(sch.milestones) + 1
    ms = sch.milestones
    if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in ms) or ms != sorted(set(ms)):
        raise QATConfigError(f"{source}: 'schedule.milestones={_show(ms)}' must be increasing epochs >= 1, e.g. [2, 4]")
    for key in ("weight_bits", "activation_bits"):
        bits = getattr(sch, key)
        if not bits:
            continue
        if len(bits) != stages:
            raise QATConfigError(
                f"{source}: 'schedule.{key}' needs {stages} entries (one per stage: len(milestones) + 1), got {_show(bits)}"
            )
        if any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8 for b in bits):
            raise QATConfigError(f"{source}: 'schedule.{key}={_show(bits)}' must hold bit widths in 2..8")
    if sch.activation_bits and cfg.activation.bits is None:
        raise QATConfigError(f"{source}: 'schedule.activation_bits' needs quantized activations; set activation.bits")
    if (sch.weight_bits or sch.activation_bits) and not ms:
        raise QATConfigError(f"{source}: a bit schedule needs 'schedule.milestones', e.g. [2, 4] for 3 stages")


def _check_budget(cfg: QATConfig, source: str) -> None:
    b = cfg.budget
    for name, bits in b.choice.items():
        if not isinstance(name, str) or not (isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8):
            raise QATConfigError(f"{source}: 'budget.choice' maps conv names to bits in 2..8, got {_show(name)}: "
                                 f"{_show(bits)}; leave it empty, the run fills it in")
    if b.avg_weight_bits is not None and b.sensitivity is None and not b.choice:
        raise QATConfigError(
            f"{source}: 'budget.avg_weight_bits' needs 'budget.sensitivity', a sensitivity.json made by 'yolo-qat "
            "sensitivity model=<float>.pt data=<data.yaml>'"
        )


def _check_overrides(cfg: QATConfig, source: str) -> None:
    _check_schedule(cfg, source)
    _check_budget(cfg, source)
    _check_exclude(cfg.exclude, source)
    for glob, spec in cfg.overrides.items():
        if not isinstance(glob, str):
            raise QATConfigError(
                f"{source}: 'overrides' keys must be glob strings of conv names like 'model.1.conv', got "
                f"{type(glob).__name__} {_show(glob)}; write globs as quoted strings, e.g. 'model.1.conv': {{weight_bits: 6}}"
            )
        if not isinstance(spec, dict):
            raise QATConfigError(
                f"{source}: 'overrides.{glob}' must map to {{weight_bits, activation_bits}}, got {_show(spec)}"
            )
        for k, v in spec.items():
            if k not in _OVERRIDE_KEYS:
                raise _unknown_key_error(f"overrides.{glob}.{k}", sorted(_OVERRIDE_KEYS), source)
            if not (v is None or (isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8)):
                raise QATConfigError(
                    f"{source}: 'overrides.{glob}.{k}={_show(v)}' is out of range; allowed: 2..8 or null (float)"
                )


def _check_exclude(globs: list, source: str) -> None:
    """Glob strings only, and none that leaves every conv in float (that trains a float model, not a QAT one)."""
    for glob in globs:
        if not isinstance(glob, str):
            raise QATConfigError(
                f"{source}: 'exclude' entries must be glob strings like 'model.22.*', got {type(glob).__name__} "
                f"{_show(glob)}"
            )
        if glob and set(glob) == {"*"}:
            raise QATConfigError(
                f"{source}: 'exclude' pattern '{glob}' leaves every conv in float, which is not QAT; to train a float "
                "model use plain 'yolo train', else exclude only some layers, e.g. qat.exclude=[model.22.*]"
            )
