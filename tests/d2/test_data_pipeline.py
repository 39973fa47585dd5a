"""Mapper / augmentation policies (hand-computed boxes) and the resumable loader."""
import itertools

import numpy as np
import pytest
from PIL import Image

from detectron2.structures import BoxMode

from stageinteractor.d2.data.loader import (
    ResumableTrainLoader,
    _BatchSchedule,
    _BatchStream,
    _landscape,
    global_batch_indices,
)
from stageinteractor.d2.data.mapper import (
    MSTRAIN_SHORT_EDGES,
    DetectionMapper,
    RandomBranch,
    build_augmentations,
)
from detectron2.data import transforms as T


@pytest.fixture()
def img_dict(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # red top-left pixel (RGB)
    p = tmp_path / "im.png"
    Image.fromarray(arr).save(p)
    return {"file_name": str(p), "image_id": 3, "height": 20, "width": 40,
            "annotations": [
                {"bbox": [4, 2, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
                 "iscrowd": 0},
                {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                 "iscrowd": 1},
            ]}


def test_mapper_resize_flip_boxes_hand_computed(img_dict):
    m = DetectionMapper(is_train=True, augmentations=[T.ResizeShortestEdge(40, 1333),
                                                      T.RandomFlip(prob=1.0)])
    out = m(img_dict)
    assert out["image"].dtype.is_floating_point is False and tuple(out["image"].shape) == (3, 40, 80)
    inst = out["instances"]
    assert inst.image_size == (40, 80)
    assert len(inst) == 1  # the crowd box is dropped
    # xyxy [4, 2, 14, 12] * 2 = [8, 4, 28, 24]; flipped in width 80 -> [52, 4, 72, 24]
    assert inst.gt_boxes.tensor.tolist() == [[52.0, 4.0, 72.0, 24.0]]
    assert inst.gt_classes.tolist() == [1]
    assert (out["height"], out["width"], out["image_id"]) == (20, 40, 3)
    assert "annotations" not in out


def test_mapper_rgb_order_and_eval_mode(img_dict):
    m = DetectionMapper(is_train=False, augmentations=build_augmentations("test", short_edge=20))
    out = m(img_dict)
    assert out["image"][:, 0, 0].tolist() == [255, 0, 0]  # RGB, channel-first
    assert "instances" not in out and "annotations" not in out


def test_policies():
    assert MSTRAIN_SHORT_EDGES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    a = build_augmentations("1x")
    assert a[0].short_edge_length == (800, 800) and a[0].max_size == 1333
    ms = build_augmentations("mstrain")[0]
    assert tuple(ms.short_edge_length) == MSTRAIN_SHORT_EDGES and ms.sample_style == "choice"
    crop = build_augmentations("crop_mstrain")
    assert isinstance(crop[0], T.RandomFlip) and isinstance(crop[1], RandomBranch)
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        build_augmentations("4x")


def test_crop_policy_uses_both_branches():
    augs = T.AugmentationList(build_augmentations(
        "crop_mstrain", ms_short_edges=(64,), crop_resize_edges=(100,), crop_size=(30, 50),
        max_size=1000))
    np.random.seed(0)
    aspects = set()
    for _ in range(40):
        inp = T.AugInput(np.zeros((100, 200, 3), np.uint8),
                         boxes=np.array([[10.0, 10.0, 190.0, 90.0]]))
        augs(inp)
        h, w = inp.image.shape[:2]
        assert min(h, w) == 64
        aspects.add("A" if abs(w / h - 2.0) < 0.02 else "B")
        if abs(w / h - 2.0) >= 0.02:
            assert 30 / 50 - 0.02 <= w / h <= 50 / 30 + 0.02
    assert aspects == {"A", "B"}


def test_crop_mapper_clips_boxes_and_allows_empty(img_dict):
    """After a crop, boxes are clipped to the crop and emptied boxes dropped (G may be 0)."""
    m = DetectionMapper(is_train=True, augmentations=[T.CropTransform(20, 0, 20, 20)])
    out = m(img_dict)  # crop x in [20, 40): the box [4, 14) is outside -> dropped
    assert tuple(out["image"].shape) == (3, 20, 20) and len(out["instances"]) == 0
    m = DetectionMapper(is_train=True, augmentations=[T.CropTransform(8, 0, 20, 20)])
    out = m(img_dict)  # box [4, 2, 14, 12] -> shifted by -8 and clipped: [0, 2, 6, 12]
    assert out["instances"].gt_boxes.tensor.tolist() == [[0.0, 2.0, 6.0, 12.0]]


# ---------------------------------------------------------------------------- loader
def _dataset(n=23):
    rng = np.random.default_rng(0)
    return [{"id": i, "width": int(rng.integers(50, 100)), "height": int(rng.integers(50, 100))}
            for i in range(n)]


def _rand_mapper(d):
    return (d["id"], int(np.random.randint(1 << 30)))


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_loader_deterministic_and_grouped():
    ds = _dataset()
    L1 = ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4, seed=3)
    L2 = ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4, seed=3)
    b1, b2 = _take(L1, 12), _take(L2, 12)
    assert b1 == b2 and all(len(b) == 4 for b in b1)
    land = _landscape(ds)
    for b in b1:
        assert len({bool(land[i]) for i, _ in b}) == 1  # aspect-ratio grouped
    sched = _BatchSchedule(land, 4, 3, True)
    per_epoch = int(land.sum()) // 4 + int((~land).sum()) // 4
    assert sched.batches_per_epoch == per_epoch
    epoch0 = [i for b in range(per_epoch) for i in sched(b)]
    assert len(set(epoch0)) == len(epoch0) == 4 * per_epoch  # no repeats within an epoch
    L3 = ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4, seed=4)
    assert _take(L3, 3) != b1[:3]


def test_loader_start_iter_continues_the_stream():
    ds = _dataset()
    full = _take(ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4,
                                      seed=1), 10)
    L = ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4, seed=9)
    L.set_start_iter(6, seed=1)
    assert _take(L, 4) == full[6:10]


def test_loader_workers_match_main_process():
    ds = _dataset()
    ref = _take(ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4,
                                     seed=2), 7)
    L = ResumableTrainLoader(dataset=ds, mapper=_rand_mapper, total_batch_size=4, seed=2,
                             num_workers=2)
    L.set_start_iter(0)
    assert _take(L, 7) == ref


def test_loader_rank_shards_concatenate_to_global_batch():
    ds = _dataset()
    sched = _BatchSchedule(_landscape(ds), 4, 5, True)
    whole = list(itertools.islice(iter(_BatchStream(ds, _rand_mapper, sched, 0, 1, 0)), 5))
    r0 = list(itertools.islice(iter(_BatchStream(ds, _rand_mapper, sched, 0, 2, 0)), 5))
    r1 = list(itertools.islice(iter(_BatchStream(ds, _rand_mapper, sched, 1, 2, 0)), 5))
    assert [a + b for a, b in zip(r0, r1)] == whole  # augmentation RNG too


def test_loader_small_dataset_wraps_without_grouping():
    ds = _dataset(3)
    idx = [global_batch_indices(ds, 4, 0, b, aspect_ratio_grouping=True) for b in range(3)]
    stream = [i for b in idx for i in b]
    assert all(len(b) == 4 for b in idx)
    # epochs are permutations of range(3), concatenated
    assert sorted(stream[:3]) == [0, 1, 2] and sorted(stream[3:6]) == [0, 1, 2]


def test_loader_mapper_skip_is_deterministic():
    ds = _dataset()

    def skip_even(d):
        return None if d["id"] % 2 == 0 else _rand_mapper(d)

    a = _take(ResumableTrainLoader(dataset=ds, mapper=skip_even, total_batch_size=4, seed=0), 5)
    b = _take(ResumableTrainLoader(dataset=ds, mapper=skip_even, total_batch_size=4, seed=0), 5)
    assert a == b and all(i % 2 == 1 for batch in a for i, _ in batch)


def test_loader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="positive multiple"):
        ResumableTrainLoader(dataset=_dataset(), mapper=None, total_batch_size=0)


@pytest.mark.parametrize("name,policy", [("coco.py", "1x"), ("coco_mstrain.py", "mstrain"),
                                         ("coco_crop_mstrain.py", "crop_mstrain"),
                                         ("demo.py", "mstrain")])
def test_common_data_configs_build_mappers(name, policy):
    import os

    from detectron2.config import LazyConfig, instantiate

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dl = LazyConfig.load(os.path.join(repo, "configs", "common", "data", name)).dataloader
    assert dl.train.mapper.augmentations.policy == policy
    train_mapper, test_mapper = instantiate(dl.train.mapper), instantiate(dl.test.mapper)
    assert train_mapper.is_train and not test_mapper.is_train
    assert train_mapper.image_format == test_mapper.image_format == "RGB"
    assert dl.train.dataset.filter_empty is True and dl.test.dataset.filter_empty is False
    assert dl.evaluator.dataset_name == dl.test.dataset.names
    if name == "demo.py":
        assert dl.train.total_batch_size == 8
        assert dl.train.dataset.names == "stageinteractor_demo_train"
    else:
        assert dl.train.total_batch_size == 16 and dl.test.dataset.names == "coco_2017_val"
