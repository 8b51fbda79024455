"""Constants shared by the tests (a uniquely named module: tests/ and tests/ops/ both have a conftest)."""

# A short QAT run: yolov8n from yaml on the bundled coco8 at a tiny image size; nbs=batch so every batch steps.
TRAIN_ARGS = dict(epochs=2, imgsz=64, batch=4, nbs=4, workers=0, plots=False, val=True, seed=0, deterministic=True)


def train_stopped_after_first_epoch(data, project, name: str, **train_args):
    """Run a QAT training that is interrupted right after epoch 1 is saved; returns its last.pt (to resume from)."""
    import pytest
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer

    def stop(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(KeyboardInterrupt):
        model.train(trainer=QATDetectionTrainer, data=str(data), project=str(project), name=name, **train_args)
    return model.trainer.last


def load_script(name: str):
    """A module of scripts/ (not a package) imported by path, for tests of its pure logic."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_some_image_agrees(got, ref) -> None:
    """Runtime vs PyTorch detections, (images, 4 + classes, anchors): some image agrees on every anchor to float noise.

    A summation-order difference can move one 4-bit activation across a rounding boundary and the flip cascades, so
    some images legitimately differ; a wrong zero point, scale or axis anywhere moves every box of every image.
    """
    import numpy as np

    box = np.abs(got[:, :4] - ref[:, :4]).max(1)  # (images, anchors), pixels
    score = np.abs(got[:, 4:] - ref[:, 4:]).max(1)
    exact = (box.max(1) < 0.01) & (score.max(1) < 1e-3)
    print(f"images agreeing everywhere: {exact.sum()} of {len(exact)}; per image max box error {box.max(1).round(3)} px")
    assert exact.any()
    assert score.max() < 0.05  # even where a cascade moves boxes, class scores stay close
