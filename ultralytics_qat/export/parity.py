"""Parity of an export with the PyTorch QAT model it came from: raw outputs on bundled coco8 images, mAP on ``data=``.

Every export prints it, so a runtime that reads the graph differently (a zero point, a rounding mode, a reduced
float precision) shows up at once instead of as a silent mAP drop after deployment.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils import LOGGER

PREFIX = "QAT export:"
N_IMAGES = 4  # the 4 bundled coco8 val images: real content, a second or two at 640 on a CPU
CONFIDENT = 0.25  # Ultralytics' default predict conf: anchors that become detections


@dataclass
class Parity:
    """Largest differences of an export's raw outputs from the QAT model's (boxes in input pixels, scores 0..1)."""

    images: int
    box_max: float
    box_mean: float
    score_max: float
    confident: int  # anchors whose QAT score reaches CONFIDENT
    confident_box_max: float  # largest box difference among them (0 when there are none)

    def line(self, runtime: str) -> str:
        conf = (f"; {self.confident} anchors scored >= {CONFIDENT} (detections): boxes max {self.confident_box_max:.3g} px"
                if self.confident else f"; no anchor scored >= {CONFIDENT}")
        return (f"{PREFIX} parity vs the PyTorch QAT model on {self.images} coco8 images ({runtime}): boxes max "
                f"{self.box_max:.3g} px (mean {self.box_mean:.2g} px), scores max {self.score_max:.3g}{conf}")


def sample_images(shape, n: int = N_IMAGES) -> np.ndarray:
    """``n`` bundled coco8 images letterboxed to ``shape`` (h, w) as Ultralytics does: float32 BCHW RGB in [0, 1]."""
    import cv2
    from ultralytics.data.augment import LetterBox

    from ..data.bundled import ASSET

    h, w = (shape, shape) if isinstance(shape, int) else shape
    paths = sorted((ASSET / "images" / "val").glob("*.jpg")) + sorted((ASSET / "images" / "train").glob("*.jpg"))
    ims = []
    for p in paths[:n]:
        im = LetterBox((h, w), auto=False)(image=cv2.imread(str(p)))[..., ::-1].transpose(2, 0, 1)
        ims.append(np.ascontiguousarray(im, dtype=np.float32) / 255)
    return np.stack(ims)


def run_batched(runner, x: np.ndarray, batch: int) -> np.ndarray:
    """``runner`` on ``x`` in chunks of the exported batch size (the last chunk padded with copies of its last image)."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        outs.append(np.asarray(runner(chunk))[: batch - pad])
    return np.concatenate(outs)


def compare(got: np.ndarray, ref: np.ndarray) -> Parity:
    """Differences of (B, 4 + classes, anchors) detection outputs: xywh boxes, then class scores."""
    box = np.abs(got[:, :4] - ref[:, :4]).max(1)  # per anchor
    score = np.abs(got[:, 4:] - ref[:, 4:])
    confident = ref[:, 4:].max(1) >= CONFIDENT
    return Parity(len(ref), float(box.max()), float(box.mean()), float(score.max()), int(confident.sum()),
                  float(box[confident].max()) if confident.any() else 0.0)


def reference_outputs(qat_model, x: np.ndarray) -> np.ndarray:
    """The PyTorch QAT model's raw outputs (fake quantization, unfolded BN), one image at a time."""
    import os

    import torch

    from ..ops.cpu_compile import CPU_COMPILE_ENV

    saved = os.environ.get(CPU_COMPILE_ENV)
    os.environ[CPU_COMPILE_ENV] = "off"  # a few forwards: compiling each new shape would cost more than it saves
    try:
        with torch.no_grad():
            return np.concatenate([qat_model(torch.from_numpy(x[i : i + 1]))[0].numpy() for i in range(len(x))])
    finally:
        if saved is None:
            os.environ.pop(CPU_COMPILE_ENV)
        else:
            os.environ[CPU_COMPILE_ENV] = saved


def report_parity(prepared, runner, shape, batch: int = 1, data: str | None = None, exported: Path | None = None,
                  n: int = N_IMAGES) -> Parity:
    """Log the parity line (and the mAP line when ``data`` is given); returns the measured differences."""
    x = sample_images(shape, n)
    p = compare(run_batched(runner, x, batch), reference_outputs(prepared.qat_model, x))
    LOGGER.info(p.line(runner.name))
    if data is not None:
        if exported is None:
            LOGGER.info(f"{PREFIX} mAP: Ultralytics cannot run this format; validate the onnx export on data={data}")
        else:
            LOGGER.info(map_line(prepared.qat_model, exported, data, shape, runner.name))
    return p


def validate(model, data: str, shape, batch: int = 1) -> float:
    """mAP50-95 of a QAT module or an exported model path with Ultralytics' validator, quietly, rect=False."""
    import logging

    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import LOGGER as UL_LOGGER

    imgsz = shape if isinstance(shape, int) else max(shape)
    with tempfile.TemporaryDirectory(prefix="qat_export_val_") as tmp:
        args = dict(data=str(data), imgsz=imgsz, batch=batch, rect=False, plots=False, verbose=False, device="cpu",
                    project=tmp, name="val", mode="val", save_json=False)
        if not isinstance(model, (str, Path)):
            args["model"] = None
        else:
            args["model"] = str(model)
        validator = DetectionValidator(args=args)
        level = UL_LOGGER.level
        UL_LOGGER.setLevel(logging.WARNING)
        try:
            validator(model=None if isinstance(model, (str, Path)) else model)
        finally:
            UL_LOGGER.setLevel(level)
    return float(validator.metrics.box.map)


def map_line(qat_model, exported: Path, data: str, shape, runtime: str) -> str:
    ours = validate(exported, data, shape)
    ref = validate(qat_model, data, shape)
    return (f"{PREFIX} mAP50-95 on data={data}: {ours:.4f} {runtime} vs {ref:.4f} PyTorch QAT "
            f"({(ours - ref) * 100:+.2f} points; rect=False, batch 1)")
