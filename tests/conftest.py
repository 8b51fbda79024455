"""Test setup: hermetic Ultralytics (no network) before anything imports it, shared datasets and a trained run."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in tests (read at decoration)
_CFG = Path(tempfile.mkdtemp(prefix="ultralytics_qat_tests_"))

from ultralytics_qat.utils import make_hermetic  # noqa: E402  (imports no Ultralytics)

make_hermetic(_CFG)

import pytest  # noqa: E402

from qat_test_utils import TRAIN_ARGS  # noqa: E402


@pytest.fixture(scope="session")
def coco8(tmp_path_factory) -> Path:
    """Data yaml of a writable copy of the bundled coco8."""
    from ultralytics_qat.data import bundled_coco8

    return bundled_coco8(tmp_path_factory.mktemp("coco8"))


@pytest.fixture(scope="session")
def qat_run(coco8, tmp_path_factory) -> Path:
    """save_dir of a finished 2-epoch W4A4 QAT run (best.pt, last.pt, results.csv)."""
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer

    project = tmp_path_factory.mktemp("runs")
    model = YOLO("yolov8n.yaml")
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(project), name="qat", **TRAIN_ARGS)
    return Path(model.trainer.save_dir)
