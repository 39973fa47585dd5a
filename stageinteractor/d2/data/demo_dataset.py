"""A small, deterministic, synthetic COCO-format detection dataset ("stageinteractor_demo").

Images show 5 classes of filled shapes (circle, square, triangle, cross, ring) of varied size,
rotation and colour, on textured backgrounds (noise, stripes, gradients, checkerboards) with
small distractor clutter (thin lines and dots that are not objects). It is meant for smoke
training: a small detector learns it on a CPU in minutes.

Location: ``<root>/stageinteractor_demo/`` where ``root`` is ``$DETECTRON2_DATASETS`` when set,
otherwise ``<repository root>/datasets`` (the detectron2 convention). Layout::

    stageinteractor_demo/
      DONE                          JSON: generator version, seed and counts (written last)
      train/000000.jpg ...          RGB JPEG images (quality 95)
      val/000000.jpg ...
      annotations/instances_train.json, annotations/instances_val.json

Atomicity: everything is written into a hidden temporary sibling directory which is renamed
into place only once complete, so a half-written dataset is never visible under the final
name. Concurrent generators (e.g. several DDP workers) race harmlessly: the first rename wins
and the others discard their copy.

Determinism: image ``i`` of split ``s`` is drawn from ``np.random.default_rng([seed, s, i])``
only, so the same spec always produces byte-identical files (pure numpy + PIL drawing).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DEMO_CLASSES",
    "DEMO_DIRNAME",
    "DemoDatasetSpec",
    "default_datasets_root",
    "demo_dataset_dir",
    "render_demo_image",
    "generate_demo_dataset",
    "ensure_demo_dataset",
]

GENERATOR_VERSION = 1
DEMO_DIRNAME = "stageinteractor_demo"
DEMO_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class DemoDatasetSpec:
    """Generation parameters. All sizes are in pixels."""

    seed: int = 2023
    num_train: int = 600
    num_val: int = 100
    min_image_size: int = 128  # each side drawn independently from [min, max]
    max_image_size: int = 192
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 28  # side of the square the shape is inscribed in
    max_object_size: int = 72
    max_overlap_iou: float = 0.25  # between the boxes of two objects of one image
    num_clutter: int = 6  # upper bound of distractor strokes/dots per image
    jpeg_quality: int = 95


def default_datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` if set, else ``<repo root>/datasets``."""
    env = os.environ.get("DETECTRON2_DATASETS")
    if env:
        return env
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    return os.path.join(repo_root, "datasets")


def demo_dataset_dir(root: Optional[str] = None) -> str:
    return os.path.join(root if root is not None else default_datasets_root(), DEMO_DIRNAME)


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background (H, W, 3) float32 in [0, 255]."""
    kind = int(rng.integers(0, 4))
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # smooth gradient between two colours
        other = rng.uniform(40, 215, size=3)
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == 1:  # stripes
        period = rng.uniform(6, 20)
        ang = rng.uniform(0, np.pi)
        phase = (np.cos(ang) * xx + np.sin(ang) * yy) * (2 * np.pi / period)
        amp = rng.uniform(10, 35)
        img = base[None, None] + amp * np.sin(phase)[..., None]
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 24))
        board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32) * 2 - 1
        img = base[None, None] + rng.uniform(10, 30) * board[..., None]
    else:  # plain colour
        img = np.broadcast_to(base[None, None], (h, w, 3)).astype(np.float32)
    img = img + rng.normal(0, rng.uniform(3, 12), size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _regular_polygon(cx: float, cy: float, radius: float, n: int, rot: float) -> List[Tuple[float, float]]:
    angles = rot + np.arange(n) * (2 * np.pi / n)
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]


def _cross_polygon(cx: float, cy: float, radius: float, rot: float) -> List[Tuple[float, float]]:
    t = radius * 0.33  # half arm thickness
    pts = [(-t, -radius), (t, -radius), (t, -t), (radius, -t), (radius, t), (t, t),
           (t, radius), (-t, radius), (-t, t), (-radius, t), (-radius, -t), (-t, -t)]
    c, s = np.cos(rot), np.sin(rot)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in pts]


def _shape_mask(cls: int, h: int, w: int, cx: float, cy: float, size: float,
                rot: float) -> np.ndarray:
    """Boolean (H, W) mask of one shape inscribed in a square of side ``size`` at (cx, cy)."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2.0
    name = DEMO_CLASSES[cls]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r, 4, rot), fill=255)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, rot), fill=255)
    elif name == "cross":
        draw.polygon(_cross_polygon(cx, cy, r, rot), fill=255)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:  # pragma: no cover - DEMO_CLASSES is fixed
        raise ValueError(f"unknown demo class index {cls}")
    return np.asarray(canvas) > 127


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    for _ in range(50):
        col = rng.uniform(0, 255, size=3)
        if np.abs(col - bg_mean).sum() > 150:
            return col
    return 255.0 - bg_mean


def render_demo_image(rng: np.random.Generator, spec: DemoDatasetSpec = DemoDatasetSpec()
                      ) -> Tuple[np.ndarray, List[Dict]]:
    """Draw one image.

    Returns:
        image: (H, W, 3) uint8 RGB.
        objects: list of ``{"category_id": 1..5, "bbox": [x, y, w, h] (COCO, absolute pixels,
        tight around the visible pixels), "area": visible pixel count}``.
    """
    h = int(rng.integers(spec.min_image_size, spec.max_image_size + 1))
    w = int(rng.integers(spec.min_image_size, spec.max_image_size + 1))
    img = _background(rng, h, w)
    bg_mean = img.reshape(-1, 3).mean(0)

    # distractor clutter: thin strokes and small dots, never larger than half the min object
    clutter = Image.new("RGB", (w, h))
    cmask = Image.new("L", (w, h), 0)
    d_rgb, d_mask = ImageDraw.Draw(clutter), ImageDraw.Draw(cmask)
    for _ in range(int(rng.integers(0, spec.num_clutter + 1))):
        col = tuple(int(c) for c in rng.uniform(0, 255, size=3))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.uniform() < 0.5:
            ln = rng.uniform(6, spec.min_object_size * 0.5)
            a = rng.uniform(0, 2 * np.pi)
            xy = [x0, y0, x0 + ln * np.cos(a), y0 + ln * np.sin(a)]
            d_rgb.line(xy, fill=col, width=1)
            d_mask.line(xy, fill=255, width=1)
        else:
            rr = rng.uniform(1.5, 3.5)
            xy = [x0 - rr, y0 - rr, x0 + rr, y0 + rr]
            d_rgb.ellipse(xy, fill=col)
            d_mask.ellipse(xy, fill=255)
    cm = np.asarray(cmask) > 127
    img[cm] = np.asarray(clutter, dtype=np.float32)[cm]

    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    placed: List[Tuple[int, np.ndarray, List[float]]] = []  # (cls, mask, xyxy of full shape)
    for _ in range(n_obj):
        for _attempt in range(20):
            size = float(rng.uniform(spec.min_object_size,
                                     min(spec.max_object_size, 0.6 * min(h, w))))
            cx = float(rng.uniform(size / 2, w - size / 2))
            cy = float(rng.uniform(size / 2, h - size / 2))
            box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
            if all(_box_iou(box, other[2]) <= spec.max_overlap_iou for other in placed):
                break
        else:
            continue
        cls = int(rng.integers(0, len(DEMO_CLASSES)))
        rot = float(rng.uniform(0, 2 * np.pi))
        mask = _shape_mask(cls, h, w, cx, cy, size, rot)
        if not mask.any():
            continue
        colour = _contrasting_colour(rng, bg_mean)
        img[mask] = colour[None] + rng.normal(0, 6, size=(int(mask.sum()), 3))
        # later objects occlude earlier ones
        placed = [(c, m & ~mask, b) for c, m, b in placed]
        placed.append((cls, mask, box))

    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    objects = []
    for cls, mask, _ in placed:
        ys, xs = np.nonzero(mask)
        if len(xs) < 16:  # (almost) fully occluded: not an object any more
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(mask.sum())})
    return image, objects


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _split_size(spec: DemoDatasetSpec, split: str) -> int:
    return spec.num_train if split == "train" else spec.num_val


def _write_split(out_dir: str, split: str, spec: DemoDatasetSpec) -> Dict[str, int]:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(_split_size(spec, split)):
        rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split], i])
        image, objects = render_demo_image(rng, spec)
        file_name = f"{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(out_dir, split, file_name), format="JPEG",
                                    quality=spec.jpeg_quality)
        images.append({"id": i + 1, "file_name": file_name,
                       "height": int(image.shape[0]), "width": int(image.shape[1])})
        for obj in objects:
            annotations.append({"id": ann_id, "image_id": i + 1, "iscrowd": 0, **obj})
            ann_id += 1
    coco = {
        "info": {"description": "stageinteractor synthetic demo dataset",
                 "version": GENERATOR_VERSION, "seed": spec.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                       for k, n in enumerate(DEMO_CLASSES)],
    }
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f, sort_keys=True)
    return {"images": len(images), "annotations": len(annotations)}


def _done_record(spec: DemoDatasetSpec) -> Dict:
    return {"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}


def _is_complete(path: str, spec: DemoDatasetSpec) -> bool:
    done = os.path.join(path, "DONE")
    if not os.path.isfile(done):
        return False
    try:
        with open(done) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return {k: record.get(k) for k in ("generator_version", "spec")} == _done_record(spec)


def generate_demo_dataset(out_dir: str, spec: DemoDatasetSpec = DemoDatasetSpec()) -> str:
    """Write the dataset to ``out_dir`` atomically (temp dir + rename). Returns ``out_dir``.

    Raises FileExistsError if ``out_dir`` exists but holds a different or incomplete dataset.
    """
    out_dir = os.path.abspath(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir
    if os.path.exists(out_dir):
        raise FileExistsError(
            f"{out_dir} exists but is not a complete stageinteractor demo dataset for spec "
            f"{asdict(spec)} (no matching DONE file); remove it to regenerate")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        stats = {split: _write_split(tmp, split, spec) for split in ("train", "val")}
        record = {**_done_record(spec), "stats": stats}
        with open(os.path.join(tmp, "DONE"), "w") as f:
            json.dump(record, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # lost a race against a concurrent generator: use theirs if complete
            if not _is_complete(out_dir, spec):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_demo_dataset(root: Optional[str] = None,
                        spec: DemoDatasetSpec = DemoDatasetSpec()) -> str:
    """Return the dataset directory, generating it first if it is not there yet."""
    return generate_demo_dataset(demo_dataset_dir(root), spec)
