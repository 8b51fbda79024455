"""The no-argument demo (``yolo-qat train``): what 4-bit QAT keeps that 4-bit PTQ loses, in a few CPU minutes.

1. a float yolov8n trained on the bundled synthetic shapes set (cached in Ultralytics' ``weights_dir`` and reused);
2. PTQ: the same weights quantized to W4A4 and calibrated, no training;
3. QAT: W4A4 fine-tuning of the float model with the default recipe;
4. the QAT model exported to ONNX (Q/DQ, INT4 weights) and validated in onnxruntime.
One table compares them (mAP50-95, % of float, file size), every row validated the same way: ``rect=False``, as a
static-shape export must be (Ultralytics' default rect batches pad 128 px images to 160 px, which alone moves the
float model's mAP50-95 by several points). Runs go where Ultralytics puts them (``runs_dir``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .utils import LOGGER

MAP = "metrics/mAP50-95(B)"


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of the demo; the default finishes in about 3 minutes on 2 CPU cores (README's quick start)."""

    n_train: int = 128
    n_val: int = 32
    imgsz: int = 128
    batch: int = 16
    fp_epochs: int = 60
    qat_epochs: int = 5
    bits: int = 4

    @property
    def cache_name(self) -> str:
        """File name of the cached float model: every setting that shapes it is in the name."""
        return f"yolov8n-shapes{self.n_train}-{self.imgsz}px-e{self.fp_epochs}.pt"


@dataclass
class DemoRow:
    model: str
    map50_95: float
    size_mb: float
    file: Path | None = None


def run_demo(profile: DemoProfile = DemoProfile(), project: str | Path | None = None, name: str = "qat-demo",
             cache_dir: str | Path | None = None, data_dir: str | Path | None = None) -> list[DemoRow]:
    """Run the four steps and print the comparison table; returns its rows (float first).

    Defaults follow ``yolo settings``: runs in ``runs_dir``/detect, the float model cached in ``weights_dir``, the
    dataset in ``datasets_dir``.
    """
    from ultralytics.utils import SETTINGS

    from .data import make_shapes_dataset
    from .data.bundled import default_data_root

    project = Path(project) if project is not None else Path(SETTINGS["runs_dir"]) / "detect"
    cache = Path(cache_dir) if cache_dir is not None else Path(SETTINGS["weights_dir"]) / "ultralytics-qat"
    data_dir = Path(data_dir) if data_dir is not None else default_data_root() / f"shapes-demo-{profile.imgsz}"
    data = str(make_shapes_dataset(data_dir, profile.n_train,
                                   profile.n_val, profile.imgsz, seed=0))
    common = dict(data=data, imgsz=profile.imgsz, batch=profile.batch, nbs=profile.batch, workers=0, seed=0,
                  deterministic=True, project=str(project), plots=False)
    fp_weights = _float_model(profile, common, cache / profile.cache_name, name)
    val = {k: common[k] for k in ("data", "imgsz", "batch", "project", "plots")} | {"rect": False, "verbose": False}
    rows = [DemoRow("float (fp32 .pt)", _validate(fp_weights, val), _mb(fp_weights), fp_weights)]
    rows.append(DemoRow(f"PTQ W{profile.bits}A{profile.bits} (calibration only)", _ptq(fp_weights, profile, common, val, name),
                        float("nan")))
    qat_dir = _qat(fp_weights, profile, common, name)
    best = qat_dir / "weights" / "best.pt"
    rows.append(DemoRow(f"QAT W{profile.bits}A{profile.bits}, default recipe (.pt)", _validate(best, val, qat=True),
                        _mb(best), best))
    onnx_file = _export(best, profile.imgsz)
    rows.append(DemoRow(f"QAT W{profile.bits}A{profile.bits} ONNX (onnxruntime)", _validate(onnx_file, val), _mb(onnx_file),
                        onnx_file))
    print(table(rows, profile, qat_dir))
    return rows


def table(rows: list[DemoRow], profile: DemoProfile, qat_dir: Path) -> str:
    fp = rows[0].map50_95
    lines = [f"\nyolo-qat demo: yolov8n on the synthetic shapes set ({profile.n_train} train / {profile.n_val} val "
             f"images, imgsz {profile.imgsz})",
             f"{'model':<40}{'mAP50-95':>10}{'% of float':>12}{'size MB':>10}"]
    for r in rows:
        pct = f"{100 * r.map50_95 / fp:.1f}" if fp > 0 else "-"
        size = f"{r.size_mb:.2f}" if r.size_mb == r.size_mb else "-"
        lines.append(f"{r.model:<40}{r.map50_95:>10.3f}{pct:>12}{size:>10}")
    lines.append("every row validated alike (rect=False, as a static-shape export); PTQ writes no file")
    lines.append(f"QAT run: {qat_dir}  (validate: yolo-qat val model={qat_dir / 'weights' / 'best.pt'} data=...)")
    report = qat_dir / "report.md"
    if report.exists():
        lines.append(f"Report:  {report}")
    return "\n".join(lines)


def _float_model(profile: DemoProfile, common: dict, cached: Path, name: str) -> Path:
    """The cached float model, or train it (and cache its best.pt)."""
    if cached.is_file():
        LOGGER.info(f"yolo-qat demo: reusing the cached float model {cached} (delete it to retrain)")
        return cached
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    LOGGER.info(f"yolo-qat demo: training the float yolov8n ({profile.fp_epochs} epochs); it is cached for next time")
    model = YOLO("yolov8n.yaml")
    model.train(trainer=DetectionTrainer, epochs=profile.fp_epochs, name=f"{name}-float", **common)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    shutil.copyfile(Path(model.trainer.save_dir) / "weights" / "best.pt", tmp)
    tmp.replace(cached)  # a killed copy never leaves a half file under the cached name
    return cached


def _validate(weights: Path, val: dict, qat: bool = False) -> float:
    """mAP50-95 of a float .pt, a QAT .pt (its exact state) or an exported model, with the demo's validation args."""
    from ultralytics import YOLO

    if qat:
        from .checkpoint import load_qat_yolo
        from .engine import QATDetectionValidator

        return float(load_qat_yolo(weights).val(validator=QATDetectionValidator, **val, name="qat-demo-val")
                     .results_dict[MAP])
    return float(YOLO(str(weights), task="detect").val(**val, name="qat-demo-val").results_dict[MAP])


def _ptq(fp_weights: Path, profile: DemoProfile, common: dict, val: dict, name: str) -> float:
    from .engine.ptq import ptq_metrics

    bits = {"qat.weight.bits": profile.bits, "qat.activation.bits": profile.bits}
    return float(ptq_metrics(fp_weights, {**common, "name": f"{name}-ptq", **bits}, {**val, "name": "qat-demo-val"})[MAP])


def _qat(fp_weights: Path, profile: DemoProfile, common: dict, name: str) -> Path:
    from ultralytics import YOLO

    from .engine import QATDetectionTrainer

    model = YOLO(str(fp_weights))
    model.train(trainer=QATDetectionTrainer, epochs=profile.qat_epochs, name=name, optimizer="AdamW", lr0=2e-4,
                warmup_epochs=0, mosaic=0.0, close_mosaic=0,
                **{"qat.weight.bits": profile.bits, "qat.activation.bits": profile.bits}, **common)
    return Path(model.trainer.save_dir)


def _export(best: Path, imgsz: int) -> Path:
    from .export import export_onnx

    return export_onnx(best, imgsz=imgsz)



def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6
