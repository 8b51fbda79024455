"""Tests for the synthetic shapes dataset generator (ultralytics_qat.data.shapes)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest

from ultralytics_qat.data import shapes
from ultralytics_qat.data.shapes import CLASS_NAMES, make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, IMGSZ = 24, 8, 160


def _read_labels(root: Path) -> dict[str, bytes]:
    """Map 'split/name.txt' -> raw bytes for every label file under root."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((root / "labels").glob("*/*.txt"))}


def _read_images(root: Path) -> dict[str, np.ndarray]:
    """Map 'split/name.png' -> decoded BGR array for every image under root."""
    return {f"{p.parent.name}/{p.name}": cv2.imread(str(p)) for p in sorted((root / "images").glob("*/*.png"))}


def _parse(text: bytes) -> np.ndarray:
    """Parse YOLO label text into an (n, 5) float array."""
    return np.array([[float(v) for v in line.split()] for line in text.decode().splitlines()]).reshape(-1, 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One small dataset shared by the read-only tests; returns its yaml path."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", n_train=N_TRAIN, n_val=N_VAL, imgsz=IMGSZ)


def test_layout_and_yaml(dataset):
    root = dataset.parent
    assert dataset == root / "data.yaml" and dataset.is_absolute()
    assert len(list((root / "images/train").glob("*.png"))) == N_TRAIN
    assert len(list((root / "images/val").glob("*.png"))) == N_VAL
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        imgs = sorted(p.stem for p in (root / "images" / split).glob("*.png"))
        assert imgs == sorted(p.stem for p in (root / "labels" / split).glob("*.txt")) and len(imgs) == n
    text = dataset.read_text()
    assert f"path: {json.dumps(str(root))}\n" in text
    assert "train: images/train\n" in text and "val: images/val\n" in text
    for i, name in enumerate(CLASS_NAMES):
        assert f"  {i}: {name}\n" in text
    assert len(CLASS_NAMES) >= 4
    img = cv2.imread(str(next((root / "images/train").glob("*.png"))))
    assert img.shape == (IMGSZ, IMGSZ, 3) and img.dtype == np.uint8


def test_deterministic(dataset, tmp_path):
    root = dataset.parent
    again = make_shapes_dataset(tmp_path / "again", n_train=N_TRAIN, n_val=N_VAL, imgsz=IMGSZ).parent
    assert _read_labels(again) == _read_labels(root)
    a, b = _read_images(root), _read_images(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    other = make_shapes_dataset(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, imgsz=IMGSZ, seed=1).parent
    la, lo = _read_labels(root), _read_labels(other)
    assert la.keys() == lo.keys() and sum(la[k] != lo[k] for k in la) > len(la) // 2
    io = _read_images(other)
    assert not any(np.array_equal(a[k], io[k]) for k in a)
    # train and val come from different per-image streams
    assert la["train/train_00000.txt"] != la["val/val_00000.txt"]


def test_labels_valid(dataset):
    labels = _read_labels(dataset.parent)
    sides, classes = [], set()
    for name, text in labels.items():
        assert text.endswith(b"\n")
        lab = _parse(text)
        assert 1 <= len(lab) <= 6, name
        cls, xywh = lab[:, 0], lab[:, 1:]
        assert np.all(cls == cls.astype(int)) and np.all((cls >= 0) & (cls < len(CLASS_NAMES)))
        assert np.all((xywh > 0) & (xywh <= 1)), name
        x1, y1 = xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 1] - xywh[:, 3] / 2
        x2, y2 = xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2
        assert np.all((x1 > -1e-6) & (y1 > -1e-6) & (x2 < 1 + 1e-6) & (y2 < 1 + 1e-6)), name
        # boxes are whole pixels
        px = np.stack([x1, y1, x2, y2], 1) * IMGSZ
        assert np.allclose(px, np.round(px), atol=1e-3), name
        sides += (xywh[:, 2:].max(1) * IMGSZ).tolist()
        classes |= set(cls.astype(int).tolist())
    assert min(sides) <= 12 and max(sides) >= 40  # small and large objects both present
    assert classes == set(range(len(CLASS_NAMES)))


def test_files_match_renderer(dataset):
    """Files on disk are exactly what the per-image renderer produces for (seed, split, index)."""
    root = dataset.parent
    for split_id, split in enumerate(("train", "val")):
        for i in (0, 1):
            img, boxes, _ = shapes._render_image(np.random.default_rng([0, split_id, i]), IMGSZ)
            stem = f"{split}_{i:05d}"
            assert np.array_equal(cv2.imread(str(root / "images" / split / f"{stem}.png")), img)
            assert (root / "labels" / split / f"{stem}.txt").read_text() == shapes._label_text(boxes, IMGSZ)


def _isolated(boxes: np.ndarray, j: int, margin: int) -> bool:
    """True if box j, grown by margin px, touches no other box."""
    x1, y1, x2, y2 = boxes[j, 1:] + (-margin, -margin, margin, margin)
    others = np.delete(boxes[:, 1:], j, 0)
    return not np.any((others[:, 0] < x2) & (others[:, 2] > x1) & (others[:, 1] < y2) & (others[:, 3] > y1))


def test_boxes_tight_without_clutter():
    """On a flat background every object pixel is inside its box and each border row/col holds object pixels."""
    checked = 0
    for s in range(40):
        img, boxes, colors = shapes._render_image(np.random.default_rng([123, s]), IMGSZ, clutter=False)
        for j, (cls, x1, y1, x2, y2) in enumerate(boxes):
            if not _isolated(boxes, j, 1):
                continue
            is_obj = np.all(img == colors[j].astype(np.uint8), axis=2)
            inner = is_obj[y1:y2, x1:x2]
            assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()
            assert inner.sum() == is_obj.sum()  # no pixel of the object lies outside its box
            checked += 1
    assert checked >= 30


def test_boxes_tight_on_disk(dataset):
    """On the noisy images, every border row/col of an isolated box holds pixels clearly unlike the surroundings."""
    root, checked = dataset.parent, 0
    for lbl in sorted((root / "labels/train").glob("*.txt")):
        img = cv2.imread(str(root / "images/train" / f"{lbl.stem}.png")).astype(np.float32)
        lab = _parse(lbl.read_bytes())
        cx, cy, w, h = lab[:, 1:].T * IMGSZ
        xyxy = np.round(np.c_[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]).astype(int)
        boxes = np.c_[lab[:, :1].astype(int), xyxy]
        for j, (_, x1, y1, x2, y2) in enumerate(boxes):
            if not _isolated(boxes, j, 3) or min(x1, y1) < 2 or max(x2, y2) > IMGSZ - 2:
                continue
            outer = img[y1 - 2 : y2 + 2, x1 - 2 : x2 + 2].reshape(-1, 3)
            inside = np.zeros((y2 - y1 + 4, x2 - x1 + 4), bool)
            inside[2:-2, 2:-2] = True
            bg = np.median(outer[~inside.ravel()], axis=0)
            far = np.linalg.norm(img[y1:y2, x1:x2] - bg, axis=2) > 40
            assert far[0].any() and far[-1].any() and far[:, 0].any() and far[:, -1].any(), lbl.name
            checked += 1
    assert checked >= 10


def test_cached_and_regenerated(tmp_path):
    root = tmp_path / "ds"
    yaml = make_shapes_dataset(root, n_train=4, n_val=2, imgsz=64)
    manifest = json.loads((root / "shapes.json").read_text())
    assert manifest["complete"] is True and manifest["seed"] == 0 and manifest["imgsz"] == 64
    img0 = root / "images/train/train_00000.png"
    stamp = img0.stat().st_mtime_ns, (root / "shapes.json").stat().st_mtime_ns
    (root / "labels/train.cache").write_text("stale")  # like the cache ultralytics writes

    # same parameters: returned as is
    assert make_shapes_dataset(root, n_train=4, n_val=2, imgsz=64) == yaml
    assert (img0.stat().st_mtime_ns, (root / "shapes.json").stat().st_mtime_ns) == stamp
    assert (root / "labels/train.cache").exists()

    # different parameters: old files and caches are removed first
    old = _read_labels(root)
    assert make_shapes_dataset(root, n_train=3, n_val=2, imgsz=64, seed=5) == yaml
    assert not (root / "labels/train.cache").exists()
    assert len(list((root / "images/train").glob("*"))) == 3 and len(list((root / "labels/train").glob("*"))) == 3
    assert _read_labels(root) != old and json.loads((root / "shapes.json").read_text())["seed"] == 5

    # overwrite=True regenerates identical content even when nothing changed
    (root / "images/train/extra.png").write_bytes(b"")
    new = _read_labels(root)
    make_shapes_dataset(root, n_train=3, n_val=2, imgsz=64, seed=5, overwrite=True)
    assert not (root / "images/train/extra.png").exists() and _read_labels(root) == new

    # missing files or an unfinished run (manifest not complete) trigger regeneration
    (root / "images/val/val_00001.png").unlink()
    make_shapes_dataset(root, n_train=3, n_val=2, imgsz=64, seed=5)
    assert (root / "images/val/val_00001.png").exists()
    m = json.loads((root / "shapes.json").read_text())
    (root / "shapes.json").write_text(json.dumps({**m, "complete": False}))
    make_shapes_dataset(root, n_train=3, n_val=2, imgsz=64, seed=5)
    assert json.loads((root / "shapes.json").read_text())["complete"] is True


def test_refuses_foreign_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/mine.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_shapes_dataset(tmp_path, n_train=1, n_val=1, imgsz=32)
    assert (tmp_path / "images/mine.jpg").exists()
    make_shapes_dataset(tmp_path, n_train=1, n_val=1, imgsz=32, overwrite=True)
    assert not (tmp_path / "images/mine.jpg").exists()


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"n_train": 0}, "n_train", "0"),
        ({"n_val": -3}, "n_val", "-3"),
        ({"imgsz": 100}, "imgsz", "100"),
        ({"imgsz": 0}, "imgsz", "0"),
        ({"imgsz": 160.0}, "imgsz", "160.0"),
        ({"n_train": True}, "n_train", "True"),
        ({"seed": -1}, "seed", "-1"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name, value):
    with pytest.raises(ValueError) as e:
        make_shapes_dataset(tmp_path / "ds", **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}={value} ") and "expected" in msg
    if name == "imgsz":
        assert "multiple of 32" in msg
    assert not (tmp_path / "ds").exists()  # validated before touching the disk


def test_cli(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "scripts/make_shapes.py"))["main"]
    root = tmp_path / "cli"
    args = ["--root", str(root), "--n-train", "2", "--n-val", "1", "--imgsz", "64", "--seed", "3"]
    yaml = main(args)
    assert capsys.readouterr().out.strip() == str(root.resolve() / "data.yaml") == str(yaml)
    assert json.loads((root / "shapes.json").read_text())["seed"] == 3
    main([*args, "--overwrite"])
    with pytest.raises(SystemExit):
        main(["--root", str(root), "--imgsz", "33"])
    assert "imgsz=33" in capsys.readouterr().err


def test_reexported():
    from ultralytics_qat.data import make_shapes_dataset as reexported

    assert reexported is make_shapes_dataset


def test_ultralytics_accepts_dataset(dataset):
    """The real consumers: check_det_dataset parses the yaml and YOLODataset loads train and val items."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(dataset))
    assert data["nc"] == len(CLASS_NAMES) and data["names"] == dict(enumerate(CLASS_NAMES))
    assert Path(data["train"]) == dataset.parent / "images/train" and Path(data["val"]).is_dir()

    cfg = get_cfg(overrides={"imgsz": IMGSZ, "workers": 0})
    val = build_yolo_dataset(cfg, data["val"], batch=4, data=data, mode="val")
    assert len(val) == N_VAL and len(val.labels) == N_VAL
    item = val[0]
    assert tuple(item["img"].shape) == (3, IMGSZ, IMGSZ)
    want = _parse((dataset.parent / "labels/val/val_00000.txt").read_bytes())
    assert np.array_equal(item["cls"].numpy().ravel(), want[:, 0])
    assert np.allclose(item["bboxes"].numpy(), want[:, 1:], atol=1e-5)

    train = build_yolo_dataset(cfg, data["train"], batch=4, data=data, mode="train")
    assert len(train) == N_TRAIN
    item = train[0]  # mosaic + random affine pipeline
    assert tuple(item["img"].shape) == (3, IMGSZ, IMGSZ) and item["bboxes"].shape[1] == 4
