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
    checked on hand-made masks in test_shape_masks_hand_checked)."""
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
