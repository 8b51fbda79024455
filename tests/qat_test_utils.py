"""Constants shared by the tests (a uniquely named module: tests/ and tests/ops/ both have a conftest)."""

# A short QAT run: yolov8n from yaml on the bundled coco8 at a tiny image size; nbs=batch so every batch steps.
TRAIN_ARGS = dict(epochs=2, imgsz=64, batch=4, nbs=4, workers=0, plots=False, val=True, seed=0, deterministic=True)
