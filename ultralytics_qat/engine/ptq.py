"""PTQ baseline: quantize and calibrate exactly as a QAT run starts, then validate with no training step."""

from __future__ import annotations

from pathlib import Path


def ptq_metrics(weights: str | Path, train_args: dict, val_args: dict | None = None) -> dict:
    """Validation metrics of the float ``weights`` after QAT's quantizer insertion and calibration alone.

    Args:
        weights: The float .pt QAT would start from.
        train_args: Trainer overrides (``data``, ``imgsz``, ``batch``, ``qat.*`` keys, ``project``/``name``): the
            calibration batches come from this run's training loader, as in QAT.
        val_args: Validator arguments (default: ``data``, ``imgsz``, ``batch`` of ``train_args``, plots off).
    """
    from .trainer import QATDetectionTrainer
    from .validator import QATDetectionValidator

    trainer = QATDetectionTrainer(overrides={**train_args, "model": str(weights), "epochs": 1})
    trainer._setup_train()  # builds the model from the float weights, quantizes and calibrates (pretrain end)
    if val_args is None:
        val_args = {k: train_args[k] for k in ("data", "imgsz", "batch", "project") if k in train_args}
        val_args.update(plots=False, verbose=False, name=f"{train_args.get('name', 'ptq')}-val")
    return QATDetectionValidator(args=val_args)(model=trainer.ema.ema)
