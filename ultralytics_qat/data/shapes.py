"""Deterministic synthetic "shapes" detection dataset in YOLO format.

QAT recipe benchmarks need a detection dataset that trains in minutes on a small CPU, needs no network and is
byte-for-byte reproducible, yet is not trivial: several classes, small and large objects, coloured clutter and noise.
This module draws such a dataset with OpenCV and NumPy only.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "make_shapes_dataset"]

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle", "cross")
"""Class names; the index in this tuple is the YOLO class id."""

GENERATOR_VERSION = 1
"""Bump when the drawing code changes, so cached datasets on disk are regenerated."""

_MANIFEST = "shapes.json"
_SPLITS = ("train", "val")
_SIZE_RANGES = ((6, 12), (14, 36), (40, 70))  # small, medium, large nominal extents in px at imgsz 160
_SIZE_PROBS = (0.4, 0.3, 0.3)
_MAX_IOU = 0.3  # reject a placement whose box IoU with an earlier object exceeds this
_MAX_IOA = 0.5  # ... or which covers more than this fraction of either box (hides small objects inside big ones)
_SHIFT = 4  # cv2 fixed-point fractional bits for sub-pixel vertex positions
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]


def _check_int(name: str, value, minimum: int, multiple: int | None = None) -> int:
    """Return `value` as an int, or raise a one-line ValueError naming the argument, the value and what is allowed."""
    allowed = f"an integer >= {minimum}" + (f" that is a multiple of {multiple}" if multiple else "")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")
    value = int(value)
    if value < minimum or (multiple and value % multiple):
        raise ValueError(f"{name}={value} is invalid: expected {allowed}")
    return value


def _shape_polygon(cls: int, size: float, rng: np.random.Generator) -> np.ndarray | None:
    """Return the (N, 2) float vertices of a polygonal class centred on the origin, or None for a circle.

    Args:
        cls (int): Class id into CLASS_NAMES.
        size (float): Nominal extent of the shape in pixels.
        rng (np.random.Generator): Source of the shape's aspect ratio and rotation.

    Returns:
        (np.ndarray | None): Vertices in pixels relative to the shape centre; None for circles.
    """
    h = size / 2
    if cls == 0:
        return None
    if cls == 1:  # rectangle, aspect 0.5..1, mild rotation so it stays recognisably a rectangle
        a = rng.uniform(0.5, 1.0)
        pts = np.array([[-h, -h * a], [h, -h * a], [h, h * a], [-h, h * a]])
        theta = rng.uniform(-np.pi / 9, np.pi / 9)
    elif cls == 2:  # triangle, any orientation, slightly irregular
        ang = np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.15, 0.15, 3)
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * h
        theta = rng.uniform(0, 2 * np.pi)
    else:  # cross ("plus"): 12-vertex outline, arm half-width 15..20% of the extent
        t = h * rng.uniform(0.3, 0.4)
        pts = np.array(
            [[-t, -h], [t, -h], [t, -t], [h, -t], [h, t], [t, t], [t, h], [-t, h], [-t, t], [-h, t], [-h, -t], [-t, -t]]
        )
        theta = rng.uniform(-np.pi / 9, np.pi / 9)
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _draw_mask(mask: np.ndarray, cls: int, size: float, cx: float, cy: float, poly: np.ndarray | None) -> None:
    """Rasterise one shape as 255s into `mask` (hard edges, so its pixel extent is the exact box)."""
    one = 1 << _SHIFT
    if poly is None:
        center = (round(cx * one), round(cy * one))
        cv2.circle(mask, center, max(round(size / 2 * one), one), 255, -1, cv2.LINE_8, _SHIFT)
    else:
        pts = np.round((poly + (cx, cy)) * one).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, _SHIFT)


def _box_overlap(a: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return IoU and max intersection-over-area (of either box) between box `a` and each row of `boxes` (xyxy)."""
    iw = np.clip(np.minimum(a[2], boxes[:, 2]) - np.maximum(a[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], boxes[:, 3]) - np.maximum(a[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / (area_a + area_b - inter)
    ioa = inter / np.minimum(area_a, area_b)
    return iou, ioa


def _pick_color(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 110.0) -> np.ndarray:
    """Draw a random BGR colour far (Euclidean) from every colour in `avoid`; after 50 tries keep the farthest."""
    best, best_d = None, -1.0
    for _ in range(50):
        c = rng.integers(0, 256, 3).astype(np.float64)
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=np.inf)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _render_image(
    rng: np.random.Generator, imgsz: int, clutter: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image and its objects.

    Objects are drawn largest first on top of the clutter, and their boxes are the exact pixel extent of their own
    rasterised mask (clipped to the image), so labels are tight and unaffected by clutter or noise.

    Args:
        rng (np.random.Generator): Per-image generator; the only source of randomness.
        imgsz (int): Image side in pixels.
        clutter (bool): Add background gradient, thin lines, specks and Gaussian noise. False gives a flat
            background, which tests use to check box tightness.

    Returns:
        (tuple[np.ndarray, np.ndarray, np.ndarray]): BGR uint8 image (imgsz, imgsz, 3); int boxes (n, 5) as
            `cls x1 y1 x2 y2` in pixels with exclusive x2/y2, in drawing order; float BGR colours (n, 3).
    """
    scale = imgsz / 160
    bg = rng.integers(0, 256, 3).astype(np.float64)
    img = np.empty((imgsz, imgsz, 3), np.float32)
    img[:] = bg
    if clutter:  # linear colour gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-0.5, 0.5, imgsz, dtype=np.float32)
        g = ramp[None, :] * math.cos(ang) + ramp[:, None] * math.sin(ang)
        img += g[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if clutter:  # thin lines and 1-2 px specks: unlabelled, and too thin/small to be confused with a shape
        for _ in range(int(rng.integers(0, 5))):
            p1, p2 = (tuple(int(v) for v in rng.integers(-imgsz // 4, imgsz + imgsz // 4, 2)) for _ in range(2))
            cv2.line(img, p1, p2, tuple(int(v) for v in rng.integers(0, 256, 3)), 1, cv2.LINE_AA)
        for _ in range(int(rng.integers(0, 11))):
            x, y = (int(v) for v in rng.integers(0, imgsz, 2))
            k = int(rng.integers(1, 3))
            img[y : y + k, x : x + k] = rng.integers(0, 256, 3)

    # Sample objects: class, size, geometry and a non-overlapping position.
    n_obj = int(rng.integers(1, 7))
    objs = []  # (cls, size, cx, cy, poly, approx_box)
    placed = np.zeros((0, 4))
    for _ in range(n_obj):
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        lo, hi = _SIZE_RANGES[int(rng.choice(3, p=_SIZE_PROBS))]
        size = rng.uniform(lo, hi) * scale
        poly = _shape_polygon(cls, size, rng)
        ext = np.array([-size / 2, -size / 2, size / 2, size / 2]) if poly is None else np.r_[poly.min(0), poly.max(0)]
        for _ in range(30):  # up to 30 placements; at most 25% of the extent may leave the image on each side
            cx, cy = rng.uniform(size / 4, imgsz - size / 4, 2)
            box = np.clip(ext + (cx, cy, cx, cy), 0, imgsz)
            if min(box[2] - box[0], box[3] - box[1]) < 3:
                continue
            if len(placed):
                iou, ioa = _box_overlap(box, placed)
                if (iou > _MAX_IOU).any() or (ioa > _MAX_IOA).any():
                    continue
            objs.append((cls, size, cx, cy, poly, box))
            placed = np.vstack([placed, box])
            break

    # Draw largest first so smaller objects are never hidden under bigger ones; colours contrast with the
    # background and with every object they overlap.
    objs.sort(key=lambda o: -o[1])
    boxes, colors = [], []
    mask = np.zeros((imgsz, imgsz), np.uint8)
    for i, (cls, size, cx, cy, poly, abox) in enumerate(objs):
        mask[:] = 0
        _draw_mask(mask, cls, size, cx, cy, poly)
        x, y, w, h = cv2.boundingRect(mask)
        if w == 0 or h == 0:
            continue
        touching = [colors[j] for j, b in enumerate(boxes) if _box_overlap(abox, np.array([b[1:]], float))[0][0] > 0]
        color = _pick_color(rng, [bg, *touching])
        img[mask > 0] = color.astype(np.uint8)
        boxes.append((cls, x, y, x + w, y + h))
        colors.append(color)

    if clutter:  # sensor-like Gaussian noise, sigma 0..8
        noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 8)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img, np.array(boxes, np.int64).reshape(-1, 5), np.array(colors, np.float64).reshape(-1, 3)


def _label_text(boxes: np.ndarray, imgsz: int) -> str:
    """Format pixel boxes (cls x1 y1 x2 y2) as YOLO label lines `cls cx cy w h`, normalised to (0, 1]."""
    lines = []
    for cls, x1, y1, x2, y2 in boxes.tolist():
        cx, cy, w, h = (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz, (x2 - x1) / imgsz, (y2 - y1) / imgsz
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def _yaml_text(root: Path) -> str:
    """Return the data.yaml contents; JSON-quoted strings are valid YAML scalars, so no YAML library is needed."""
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES))
    return f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\nnames:\n{names}"


def _is_complete(root: Path, params: dict, counts: dict[str, int]) -> bool:
    """Return True if `root` holds a finished dataset made with exactly `params` (manifest plus file counts)."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest != {**params, "complete": True} or not (root / "data.yaml").is_file():
        return False
    for split, n in counts.items():
        for sub, ext in (("images", ".png"), ("labels", ".txt")):
            d = root / sub / split
            if not d.is_dir() or sum(1 for p in d.iterdir() if p.suffix == ext) != n:
                return False
    return True


def make_shapes_dataset(
    root: str | Path,
    n_train: int = 256,
    n_val: int = 64,
    imgsz: int = 160,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate (or reuse) the synthetic shapes detection dataset under `root`.

    Writes `images/{train,val}/*.png`, `labels/{train,val}/*.txt` (YOLO `cls cx cy w h`), `data.yaml` with an
    absolute `path:` and a `shapes.json` manifest of the parameters. A finished dataset with the same parameters
    is reused as is unless `overwrite`; otherwise old images, labels and label caches are deleted first. Each image
    uses its own generator seeded by (seed, split, index), so output is identical for a given seed.

    Args:
        root (str | Path): Dataset directory; created if missing.
        n_train (int): Number of training images, >= 1.
        n_val (int): Number of validation images, >= 1.
        imgsz (int): Square image side in pixels, >= 32 and a multiple of 32.
        seed (int): Non-negative base seed.
        overwrite (bool): Regenerate even if a matching dataset exists. Also required to replace `images/` or
            `labels/` folders under `root` that this function did not create.

    Returns:
        (Path): Absolute path to `root/data.yaml`.

    Raises:
        ValueError: If an argument is out of range.
        FileExistsError: If `root` holds images/labels without a shapes manifest and `overwrite` is False.
    """
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    imgsz = _check_int("imgsz", imgsz, 32, 32)
    seed = _check_int("seed", seed, 0)
    root = Path(root).expanduser().resolve()
    yaml_file = root / "data.yaml"
    params = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "imgsz": imgsz, "seed": seed}
    counts = {"train": n_train, "val": n_val}

    if not overwrite and _is_complete(root, params, counts):
        if yaml_file.read_text() != _yaml_text(root):  # root was moved or copied: refresh the absolute path
            yaml_file.write_text(_yaml_text(root))
        return yaml_file

    manifest = root / _MANIFEST
    ours = manifest.is_file()
    for sub in ("images", "labels"):
        d = root / sub
        if d.exists():
            if not (ours or overwrite):
                raise FileExistsError(
                    f"{d} exists but {root} has no {_MANIFEST}; pass overwrite=True to replace it with shapes data"
                )
            shutil.rmtree(d)  # also removes ultralytics' labels/*.cache files
    root.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({**params, "complete": False}, indent=2) + "\n")  # marks a partial dataset

    for split_id, split in enumerate(_SPLITS):
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_id, i])
            img, boxes, _ = _render_image(rng, imgsz)
            stem = f"{split}_{i:05d}"
            if not cv2.imwrite(str(img_dir / f"{stem}.png"), img, _PNG_PARAMS):
                raise OSError(f"failed to write {img_dir / f'{stem}.png'}")
            (lbl_dir / f"{stem}.txt").write_text(_label_text(boxes, imgsz))

    yaml_file.write_text(_yaml_text(root))
    manifest.write_text(json.dumps({**params, "complete": True}, indent=2) + "\n")
    return yaml_file
