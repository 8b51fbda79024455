"""Layer sensitivity: how much the detection loss grows when one conv's weights alone are quantized to b bits.

For every conv that QAT would quantize (the same policy as :func:`plan_layers`), and every bit width b, the conv's
weights are fake-quantized in place (per output channel or per tensor, the config's grid and scale init, everything
else float), the detection loss of the float model is measured on a fixed set of batches (of the val split unless
``split`` says otherwise), and the weights are put back. The reported sensitivity is
``delta = loss_quantized - loss_float`` (per image, the loss Ultralytics trains on: box + cls + dfl with its gains).

Why the loss change and not mAP: mAP needs a full validation pass per (layer, bits) pair (57 layers x 3 widths = 171
passes for YOLOv8n), and it is coarse on the few images a cheap pass could afford (a single box flips it). The loss is
smooth in the weight perturbation, reads every anchor of every image, and for the small perturbations one layer
makes it tracks the fitness change (it is the quantity QAT itself minimises). A pass costs ``layers x widths x batches``
forward passes without gradient. Activations stay float: the per-layer input quantizers need calibration, so their
sensitivity is a different measurement (not done here).

Output (:func:`write_report`): ``sensitivity.json`` (machine-readable; ``qat.budget.sensitivity`` reads it),
``sensitivity.csv``, ``sensitivity.png`` and the printed table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from ..config import QATConfig
from .inject import plan_layers
from .quantizer import LSQQuantizer

FORMAT = 1


@torch.no_grad()
def detection_loss(model: nn.Module, criterion, batches: list[dict]) -> float:
    """Mean detection loss per image over ``batches`` (the model in eval mode: BN statistics fixed)."""
    total, images = 0.0, 0
    for batch in batches:
        loss, _ = criterion(model(batch["img"]), batch)
        total += float(loss.sum())
        images += batch["img"].shape[0]
    return total / max(images, 1)


@torch.no_grad()
def fake_quantized_weight(w: torch.Tensor, bits: int, cfg: QATConfig) -> torch.Tensor:
    """``w`` on the config's weight grid at ``bits`` (scale from the config's weight init)."""
    channels = w.shape[0] if cfg.weight.granularity == "channel" else 1
    q = LSQQuantizer(bits, "weight", channels, narrow_range=cfg.weight.narrow_range, init=cfg.weight.init).to(w.device)
    q.init_weight(w)
    codes = q.quantized_int(w.float())  # plain torch: no kernel launch or compile for a one-off snap
    s = q.scale.detach().float().clamp_min(1e-8)
    return (codes * (s.view(-1, *[1] * (w.dim() - 1)) if channels > 1 else s)).to(w.dtype)


def layer_sensitivity(model: nn.Module, batches: list[dict], bits=(2, 3, 4), cfg: QATConfig | None = None,
                      progress=None) -> dict:
    """Per-layer loss change when one layer's weights are quantized (see module docstring).

    Args:
        model: A float Ultralytics detection model with ``model.args`` (loss gains); left unchanged.
        batches: Preprocessed batches (``img`` in [0, 1], labels) the loss is measured on.
        bits: Weight widths to measure.
        cfg: The qat config whose layer policy (exclude, first/last layers) and weight grid are used.
        progress: Optional callable ``(done, total)``.

    Returns:
        ``{"format", "float_loss", "bits", "layers": [{"name", "params", "role", "loss": {b: loss},
        "delta": {b: loss - float_loss}}]}`` (bit keys are strings, as JSON has them).
    """
    cfg = cfg or QATConfig()
    model.eval()
    criterion = model.init_criterion()
    base = detection_loss(model, criterion, batches)
    plans = plan_layers(model, cfg)
    modules = dict(model.named_modules())
    rows, done, total = [], 0, len(plans) * len(bits)
    for p in plans:
        conv = modules[p.name]
        saved = conv.weight.detach().clone()
        row = {"name": p.name, "params": conv.weight.numel(), "role": p.role, "loss": {}, "delta": {}}
        try:
            for b in bits:
                with torch.no_grad():
                    conv.weight.copy_(fake_quantized_weight(saved, b, cfg))
                loss = detection_loss(model, criterion, batches)
                row["loss"][str(b)], row["delta"][str(b)] = loss, loss - base
                done += 1
                if progress:
                    progress(done, total)
        finally:
            with torch.no_grad():
                conv.weight.copy_(saved)
        rows.append(row)
    return {"format": FORMAT, "float_loss": base, "bits": [int(b) for b in bits], "layers": rows}


def ranking(result: dict, bits: int) -> list[str]:
    """Layer names, most sensitive first, at ``bits``."""
    return [r["name"] for r in sorted(result["layers"], key=lambda r: -r["delta"][str(bits)])]


def format_table(result: dict, top: int | None = None) -> str:
    """The printed table: one row per layer (most sensitive at the lowest width first)."""
    bits = result["bits"]
    rows = sorted(result["layers"], key=lambda r: -r["delta"][str(min(bits))])[:top]
    width = max([10] + [len(r["name"]) for r in rows]) + 2
    head = f"{'layer':<{width}}{'params':>9}{'role':>8}" + "".join(f"{f'dLoss W{b}':>12}" for b in bits)
    lines = [head]
    for r in rows:
        lines.append(f"{r['name']:<{width}}{r['params']:>9}{r['role'] or '-':>8}"
                     + "".join(f"{r['delta'][str(b)]:>12.4f}" for b in bits))
    lines.append(f"float loss {result['float_loss']:.4f} per image; dLoss = loss with that layer alone quantized - float")
    return "\n".join(lines)


def write_report(result: dict, out: str | Path) -> dict[str, Path]:
    """sensitivity.json, sensitivity.csv and sensitivity.png in folder ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sensitivity.json", "csv": out / "sensitivity.csv", "png": out / "sensitivity.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    bits = result["bits"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "params", "role", *[f"delta_w{b}" for b in bits], *[f"loss_w{b}" for b in bits]])
        for r in result["layers"]:
            w.writerow([r["name"], r["params"], r["role"], *[r["delta"][str(b)] for b in bits],
                        *[r["loss"][str(b)] for b in bits]])
    _plot(result, paths["png"])
    return paths


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 4), tight_layout=True)
    x = range(len(layers))
    for b in result["bits"]:
        ax.plot(x, [r["delta"][str(b)] for r in layers], marker="o", ms=3, label=f"W{b}")
    ax.set_xticks(list(x), [r["name"].removesuffix(".conv") for r in layers], rotation=90, fontsize=6)
    ax.set_ylabel("loss change (per image)")
    ax.set_title(f"layer sensitivity (float loss {result['float_loss']:.3f})")
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(path: str | Path) -> dict:
    """A sensitivity.json, checked; a one-line QATConfigError if it is not one."""
    from ..errors import QATConfigError

    p = Path(path)
    if not p.is_file():
        raise QATConfigError(f"sensitivity file '{path}' not found; make one with 'yolo-qat sensitivity model=<float>.pt "
                             "data=<data.yaml>' (it writes <run>/sensitivity.json)")
    try:
        data = json.loads(p.read_text())
        ok = data.get("format") == FORMAT and all({"name", "params", "delta"} <= set(r) for r in data["layers"])
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise QATConfigError(f"'{path}' is not a sensitivity.json of 'yolo-qat sensitivity'; make one with it")
    return data


def split_batches(data: str, imgsz: int, batch: int, batches: int, seed: int, stride: int, device, split: str = "val"
                  ) -> list[dict]:
    """``batches`` preprocessed batches of the dataset's ``split``, drawn in a ``seed``-shuffled order (no augmentation)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from ..errors import QATConfigError

    info = check_det_dataset(data)
    if not info.get(split):
        raise QATConfigError(f"split={split!r}: the dataset '{data}' has no such split; use split=val or split=train")
    cfg = get_cfg(overrides={"data": data, "imgsz": imgsz, "batch": batch, "mode": "val", "task": "detect"})
    dataset = build_yolo_dataset(cfg, info[split], batch, info, mode="val", stride=stride)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                                         collate_fn=dataset.collate_fn, generator=torch.Generator().manual_seed(seed))
    out = []
    for b in loader:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        b["img"] = b["img"].float() / 255
        out.append(b)
        if len(out) >= batches:
            break
    return out


def _bit_list(bits) -> list[int]:
    from ..errors import QATConfigError

    if isinstance(bits, str):
        import yaml

        bits = yaml.safe_load(bits if bits.strip().startswith("[") else f"[{bits}]")
    bits = [bits] if isinstance(bits, int) else bits
    if not isinstance(bits, (list, tuple)) or not bits or any(
            not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8 for b in bits):
        raise QATConfigError(f"bits={bits!r} must be weight widths in 2..8, e.g. bits=[2,3,4]")
    return sorted(set(bits))


def run_sensitivity(model: nn.Module, data: str, qat=None, overrides: dict | None = None, bits=(2, 3, 4),
                    batches: int = 4, imgsz: int = 640, batch: int = 16, seed: int = 0, split: str = "val", device=None,
                    project=None, name=None, exist_ok: bool = False) -> dict[str, Path]:
    """Measure and write a sensitivity report of the float ``model`` on a split of ``data`` (see module doc).

    ``split="train"`` keeps the validation images out of the layer choice the budget makes from this report.
    """
    from types import SimpleNamespace

    from ultralytics.cfg import get_save_dir
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace
    from ultralytics.utils.torch_utils import select_device

    from ..errors import QATConfigError
    from ..utils import LOGGER

    if any(isinstance(m, LSQQuantizer) for m in model.modules()) or getattr(model, "qat_config", None) is not None:
        raise QATConfigError("sensitivity measures a float model; pass the float .pt that QAT starts from")
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise QATConfigError(f"batches={batches!r} must be an int >= 1 (validation batches the loss is measured on)")
    cfg = QATConfig.load(qat, overrides)
    bits = _bit_list(bits)
    dev = select_device(device if device is not None else "", verbose=False)
    model = model.float().to(dev)
    train_args = model.args if isinstance(getattr(model, "args", None), dict) else vars(getattr(model, "args", {}) or {})
    model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **train_args})  # the loss gains it was trained with
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    val = split_batches(str(data), int(imgsz), int(batch), batches, int(seed), stride, dev, str(split))
    LOGGER.info(f"QAT sensitivity: {len(val)} {split} batches of {batch} at imgsz {imgsz}, weight widths {bits}")
    result = layer_sensitivity(model, val, bits, cfg)
    result.update(data=str(data), split=str(split), batches=len(val), batch=int(batch), imgsz=int(imgsz),
                  seed=int(seed))
    save_dir = get_save_dir(SimpleNamespace(project=project, name=name or "sensitivity", task="detect",
                                            mode="sensitivity", exist_ok=exist_ok, save_dir=None))
    return write_report(result, save_dir)
