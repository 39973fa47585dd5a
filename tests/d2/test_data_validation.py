"""Dataset validation: one clear message per bad-input kind (file, id, value, expectation)."""
import copy
import json
import os

import pytest
from PIL import Image

from stageinteractor.d2.data import register_coco_json
from stageinteractor.d2.data.validate import (
    DatasetValidationError,
    validate_coco_json,
    validate_dataset_dicts,
    validate_registered_dataset,
)

GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
               {"id": 2, "file_name": "b.jpg", "width": 20, "height": 50}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 8], "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 50], "iscrowd": 0},
    ],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
}


@pytest.fixture()
def ds(tmp_path):
    for name, (w, h) in (("a.jpg", (40, 30)), ("b.jpg", (20, 50))):
        Image.new("RGB", (w, h)).save(tmp_path / name)

    def write(data, raw=None):
        p = tmp_path / "ann.json"
        p.write_text(raw if raw is not None else json.dumps(data))
        return str(p), str(tmp_path)

    return write


def _err(ds, mutate=None, raw=None):
    data = copy.deepcopy(GOOD)
    if mutate:
        mutate(data)
    js, root = ds(data, raw)
    with pytest.raises(DatasetValidationError) as e:
        validate_coco_json(js, root)
    msg = str(e.value)
    assert msg.startswith(js)  # always names the file
    return msg


def test_good_dataset_passes(ds):
    js, root = ds(GOOD)
    assert validate_coco_json(js, root) == {"images": 2, "annotations": 2, "categories": 2}


def test_malformed_json(ds):
    msg = _err(ds, raw='{"images": [1, 2,\n ]')
    assert "malformed JSON" in msg and "line 2" in msg


def test_missing_top_level_key(ds):
    msg = _err(ds, lambda d: d.pop("annotations"))
    assert "missing top-level key 'annotations'" in msg


def test_missing_image_key(ds):
    msg = _err(ds, lambda d: d["images"][1].pop("height"))
    assert "image id 2" in msg and "'height'" in msg


def test_missing_annotation_key(ds):
    msg = _err(ds, lambda d: d["annotations"][0].pop("bbox"))
    assert "annotation id 10" in msg and "'bbox'" in msg


def test_missing_image_file(ds, tmp_path):
    os.remove(tmp_path / "b.jpg")
    msg = _err(ds)
    assert "image id 2" in msg and str(tmp_path / "b.jpg") in msg and "does not exist" in msg


def test_negative_box_size(ds):
    def m(d):
        d["annotations"][0]["bbox"] = [5, 5, -3, 4]
    msg = _err(ds, m)
    assert "annotation id 10" in msg and "[5, 5, -3, 4]" in msg and "w=-3" in msg
    assert "expected w > 0 and h > 0" in msg


def test_zero_box_size(ds):
    def m(d):
        d["annotations"][1]["bbox"] = [3, 3, 4, 0]
    msg = _err(ds, m)
    assert "annotation id 11 (image id 2)" in msg and "h=0" in msg


def test_box_outside_image(ds):
    def m(d):
        d["annotations"][0]["bbox"] = [35, 2, 10, 8]  # x1 = 45 > width 40
    msg = _err(ds, m)
    assert "annotation id 10" in msg and "x1=45" in msg and "width 40" in msg


def test_box_within_tolerance_passes(ds):
    data = copy.deepcopy(GOOD)
    data["annotations"][0]["bbox"] = [30.5, 2, 10.2, 8]  # exceeds by 0.7 px
    js, root = ds(data)
    validate_coco_json(js, root)


def test_unknown_category(ds):
    def m(d):
        d["annotations"][1]["category_id"] = 99
    msg = _err(ds, m)
    assert "annotation id 11" in msg and "unknown 'category_id' 99" in msg and "[3, 7]" in msg


def test_unknown_image_id(ds):
    def m(d):
        d["annotations"][1]["image_id"] = 5
    msg = _err(ds, m)
    assert "annotation id 11" in msg and "'image_id' 5" in msg


def test_more_problems_are_counted(ds):
    def m(d):
        d["annotations"][0]["category_id"] = 99
        d["annotations"][1]["category_id"] = 98
    msg = _err(ds, m)
    assert "and 1 more problem" in msg


def test_crowd_box_geometry_is_ignored(ds):
    data = copy.deepcopy(GOOD)
    data["annotations"][0].update(iscrowd=1, bbox=[0, 0, 0, 0])
    js, root = ds(data)
    validate_coco_json(js, root)


def test_missing_json_file(tmp_path):
    with pytest.raises(DatasetValidationError, match="does not exist"):
        validate_coco_json(str(tmp_path / "nope.json"), str(tmp_path))


def test_dataset_dicts(tmp_path):
    img = tmp_path / "x.jpg"
    Image.new("RGB", (10, 10)).save(img)
    good = [{"file_name": str(img), "image_id": 4, "width": 10, "height": 10,
             "annotations": [{"bbox": [1, 1, 5, 5], "bbox_mode": 0, "category_id": 0}]}]
    assert validate_dataset_dicts("mine", good, num_classes=1)["annotations"] == 1
    bad = copy.deepcopy(good)
    bad[0]["annotations"][0]["bbox"] = [5, 5, 1, 1]  # XYXY with x1 < x0
    with pytest.raises(DatasetValidationError, match=r"dataset 'mine': image id 4.*w=-4"):
        validate_dataset_dicts("mine", bad)
    bad[0]["annotations"][0].update(bbox=[1, 1, 5, 5], category_id=3)
    with pytest.raises(DatasetValidationError, match="unknown category_id 3"):
        validate_dataset_dicts("mine", bad, num_classes=1)


def test_registered_dataset_and_conflicts(ds, tmp_path):
    js, root = ds(GOOD)
    name = register_coco_json("test_validation_ds", js, root)
    assert name == "test_validation_ds"
    assert register_coco_json(name, js, root) == name  # idempotent
    assert validate_registered_dataset(name)["images"] == 2
    with pytest.raises(ValueError, match="already registered"):
        register_coco_json(name, js, str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetValidationError, match="not registered"):
        validate_registered_dataset("no_such_dataset_xyz")
