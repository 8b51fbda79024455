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

    scale_lr_mult: float = option(1.0, float, "learning-rate multiplier of the scale parameter group", low=0.0)
    scale_weight_decay: float = option(0.0, float, "weight decay of the scale parameter group", low=0.0)


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
        else:
            path = resolve_qat_yaml(qat)
            data, source = _read_yaml(path), path.name
        data = _apply_overrides(data, overrides or {})
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict:
        """Plain nested dict (yaml/pickle friendly); ``QATConfig.from_dict(cfg.to_dict()) == cfg``."""
        return asdict(self)


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
    bundled = sorted(p.stem for p in (*CFG_DIR.glob("*.yaml"), *(CFG_DIR / "recipes").glob("*.yaml")))
    raise QATConfigError(f"qat file '{qat}' not found; pass an existing path or a bundled recipe: {', '.join(bundled)}")


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


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise QATConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QATConfigError(f"{path} must hold a mapping of qat keys, got {type(data).__name__}")
    return data.get("qat", data) if set(data) == {"qat"} else data


def _apply_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys (``weight.bits``) in a copy of the nested dict."""
    data = _deepcopy_dict(data)
    for key, value in overrides.items():
        node = data
        parts = str(key).split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise QATConfigError(f"qat override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy_dict(d):
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def _unknown_key_error(key: str, valid: list[str], source: str) -> QATConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1] if "." not in valid[0] else key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return QATConfigError(f"{source}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise QATConfigError(f"{source}: '{prefix.rstrip('.')}' must be a mapping of keys, got {data!r}")
    by_name = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in by_name:
            raise _unknown_key_error(prefix + str(key), _leaf_keys(QATConfig), source)
    kwargs = {}
    for name, f in by_name.items():
        key = prefix + name
        if _is_section(f):
            kwargs[name] = _build(f.default_factory, data.get(name) or {}, key + ".", source)
        elif name in data:
            kwargs[name] = _check_value(key, data[name], f, source)
    cfg = cls(**kwargs)
    if cls is QATConfig:
        _check_overrides(cfg, source)
    return cfg


def _check_value(key: str, value: Any, f, source: str) -> Any:
    m = f.metadata
    kind = m["kind"]
    allowed = _allowed(f).rstrip(": ") or kind.__name__
    if value is None:
        if m["nullable"]:
            return None
        raise QATConfigError(f"{source}: '{key}' may not be null; allowed: {allowed} (e.g. '{key}={f.default}')")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise QATConfigError(
            f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}; "
            f"allowed: {allowed} (e.g. '{key}={f.default}')"
        )
    if m["choices"] and value not in m["choices"]:
        raise QATConfigError(f"{source}: '{key}={value}' is not allowed; use one of {', '.join(m['choices'])}")
    if (m["low"] is not None and value < m["low"]) or (m["high"] is not None and value > m["high"]):
        raise QATConfigError(f"{source}: '{key}={value}' is out of range; allowed: {allowed}")
    return value


_OVERRIDE_KEYS = {"weight_bits", "activation_bits"}


def _check_overrides(cfg: QATConfig, source: str) -> None:
    for glob in cfg.exclude:
        if not isinstance(glob, str):
            raise QATConfigError(f"{source}: 'exclude' entries must be glob strings like 'model.22.*', got {glob!r}")
    for glob, spec in cfg.overrides.items():
        if not isinstance(spec, dict):
            raise QATConfigError(f"{source}: 'overrides.{glob}' must map to {{weight_bits, activation_bits}}, got {spec!r}")
        for k, v in spec.items():
            if k not in _OVERRIDE_KEYS:
                raise _unknown_key_error(f"overrides.{glob}.{k}", sorted(_OVERRIDE_KEYS), source)
            if not (v is None or (isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8)):
                raise QATConfigError(f"{source}: 'overrides.{glob}.{k}={v}' is out of range; allowed: 2..8 or null (float)")
