"""Demo dataset generator: determinism, annotation sanity, atomic writes."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from stageinteractor.d2.data import demo_dataset as dd
from stageinteractor.d2.data.demo_dataset import (
    DEMO_CLASSES,
    DemoDatasetSpec,
    ensure_demo_dataset,
    generate_demo_dataset,
    render_demo_image,
)
from stageinteractor.d2.data.validate import validate_coco_json

SMALL = DemoDatasetSpec(num_train=6, num_val=3)


def _digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_same_seed_same_bytes(tmp_path):
    a = generate_demo_dataset(str(tmp_path / "a"), SMALL)
    b = generate_demo_dataset(str(tmp_path / "b"), SMALL)
    da, db = _digest_tree(a), _digest_tree(b)
    assert len(da) == 6 + 3 + 2 + 1  # images, two jsons, DONE
    assert da == db
    c = generate_demo_dataset(str(tmp_path / "c"), DemoDatasetSpec(num_train=6, num_val=3, seed=1))
    dc = _digest_tree(c)
    assert dc["train/000000.jpg"] != da["train/000000.jpg"]


def test_image_i_independent_of_split_size(tmp_path):
    a = _digest_tree(generate_demo_dataset(str(tmp_path / "a"), SMALL))
    b = _digest_tree(generate_demo_dataset(str(tmp_path / "b"),
                                           DemoDatasetSpec(num_train=3, num_val=1)))
    for k in ("train/000000.jpg", "train/000002.jpg", "val/000000.jpg"):
        assert a[k] == b[k]


def test_annotations_inside_images_and_valid(tmp_path):
    root = generate_demo_dataset(str(tmp_path / "d"), DemoDatasetSpec(num_train=20, num_val=2))
    js = os.path.join(root, "annotations", "instances_train.json")
    stats = validate_coco_json(js, os.path.join(root, "train"), tol=0.0)
    assert stats["images"] == 20 and stats["categories"] == len(DEMO_CLASSES)
    data = json.load(open(js))
    assert [c["name"] for c in data["categories"]] == list(DEMO_CLASSES)
    assert stats["annotations"] >= 20  # at least one object per image
    for img in data["images"]:
        with Image.open(os.path.join(root, "train", img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
            assert 128 <= im.size[0] <= 192 and 128 <= im.size[1] <= 192
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 5
        assert 0 < a["area"] <= w * h  # visible pixels inside the tight box


def test_bbox_is_tight_around_object_pixels():
    """Boxes lie inside the image and are not degenerate (the exact mask->box step is
    checked on hand-made masks in test_mask_to_box_by_hand_with_occlusion)."""
    rng = np.random.default_rng([5, 0, 0])
    image, objects = render_demo_image(rng, SMALL)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert objects
    for o in objects:
        x, y, w, h = o["bbox"]
        assert x >= 0 and y >= 0 and x + w <= image.shape[1] and y + h <= image.shape[0]
        assert w >= 4 and h >= 4


def test_shape_masks_hand_checked():
    # circle of diameter 20 centred at (20, 20) in a 40x40 canvas: centre in, corners out
    m = dd._shape_mask(0, 40, 40, 20.0, 20.0, 20.0, 0.0)
    assert m[20, 20] and not m[0, 0] and not m[11, 11]
    ys, xs = np.nonzero(m)
    assert abs(xs.min() - 10) <= 1 and abs(xs.max() - 29) <= 1
    # ring: centre is empty, the band is filled
    r = dd._shape_mask(4, 40, 40, 20.0, 20.0, 20.0, 0.0)
    assert not r[20, 20] and r[20, 11]


def test_atomic_write_crash_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "stageinteractor_demo"
    real = dd._write_split

    def crash(out_dir, split, spec):
        if split == "val":
            raise KeyboardInterrupt("killed mid-write")
        return real(out_dir, split, spec)

    monkeypatch.setattr(dd, "_write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(str(out), SMALL)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too
    monkeypatch.setattr(dd, "_write_split", real)
    assert ensure_demo_dataset(str(tmp_path), SMALL) == str(out)
    assert (out / "DONE").is_file()


def test_incomplete_directory_is_never_used(tmp_path):
    out = tmp_path / "stageinteractor_demo"
    (out / "train").mkdir(parents=True)  # e.g. a copy interrupted by hand
    with pytest.raises(FileExistsError, match="not a complete stageinteractor demo dataset"):
        ensure_demo_dataset(str(tmp_path), SMALL)


def test_existing_complete_dataset_is_reused(tmp_path):
    out = generate_demo_dataset(str(tmp_path / "x"), SMALL)
    before = os.stat(os.path.join(out, "DONE")).st_mtime_ns
    generate_demo_dataset(out, SMALL)
    assert os.stat(os.path.join(out, "DONE")).st_mtime_ns == before
    # a different spec under the same directory is refused, not silently mixed
    with pytest.raises(FileExistsError):
        generate_demo_dataset(out, DemoDatasetSpec(num_train=7, num_val=3))


def test_default_root_follows_detectron2_datasets(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert dd.demo_dataset_dir() == os.path.join(str(tmp_path), "stageinteractor_demo")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert dd.demo_dataset_dir() == os.path.join(repo, "datasets", "stageinteractor_demo")


def test_make_demo_dataset_tool(tmp_path, capsys):
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "_make_demo_dataset", os.path.join(repo, "tools", "make_demo_dataset.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "stageinteractor_demo") in out and '"images": 2' in out


def _rect(mask, rows, cols):
    mask[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True  # inclusive pixel ranges


def test_mask_to_box_by_hand_with_occlusion(monkeypatch):
    """The mask -> COCO box/area step on hand-made masks (the shapes' masks replaced): boxes are
    [x0, y0, x1 - x0 + 1, y1 - y0 + 1] of the first/last object pixel (tight, last row and column
    included), areas count the visible pixels, a later object occludes an earlier one, and an
    object with fewer than 16 visible pixels is dropped."""
    spec = DemoDatasetSpec(min_image_size=40, max_image_size=40, min_objects=3, max_objects=3,
                           min_object_size=8, max_object_size=16, max_overlap_iou=1.0, num_clutter=0)
    masks = []
    # A: an L -- rows 5-14 x cols 3-8, plus rows 12-14 x cols 3-20
    a = np.zeros((40, 40), bool)
    _rect(a, (5, 14), (3, 8))
    _rect(a, (12, 14), (3, 20))
    # B: rows 10-19 x cols 15-24, drawn after A: hides A's pixels rows 12-14 x cols 15-20
    b = np.zeros((40, 40), bool)
    _rect(b, (10, 19), (15, 24))
    # C: the diagonal (i, i), i = 22..37: 16 pixels, a 16 x 16 box; fully visible
    c = np.zeros((40, 40), bool)
    c[np.arange(22, 38), np.arange(22, 38)] = True
    queue = [a, b, c]
    classes = []

    def fake_mask(cls, h, w, cx, cy, size, rot):
        assert (h, w) == (40, 40)
        classes.append(cls)
        return queue[len(classes) - 1].copy()

    monkeypatch.setattr(dd, "_shape_mask", fake_mask)
    image, objects = render_demo_image(np.random.default_rng(0), spec)
    assert image.shape == (40, 40, 3) and len(classes) == 3
    assert [o["bbox"] for o in objects] == [[3, 5, 12, 10], [15, 10, 10, 10], [22, 22, 16, 16]]
    assert [o["area"] for o in objects] == [10 * 6 + 3 * 6, 100, 16]
    assert [o["category_id"] for o in objects] == [k + 1 for k in classes]

    # one more object D (rows 30-39 x cols 37-39) hides C's pixel (37, 37): C keeps 15 pixels
    # and is dropped; D stays
    d = np.zeros((40, 40), bool)
    _rect(d, (30, 39), (37, 39))
    queue[:] = [a, b, c, d]
    classes.clear()
    spec4 = DemoDatasetSpec(**{**spec.__dict__, "min_objects": 4, "max_objects": 4})
    _, objects = render_demo_image(np.random.default_rng(0), spec4)
    assert [o["bbox"] for o in objects] == [[3, 5, 12, 10], [15, 10, 10, 10], [37, 30, 3, 10]]
    assert [o["area"] for o in objects] == [78, 100, 30]
