"""The command-line front in-process: stageinteractor.errors.run_tool, stageinteractor.d2.cli,
stageinteractor.d2.checkpoint_files and the config side of d2/data/validate.py."""
import os

import pytest
import torch
from detectron2.config import LazyConfig

from stageinteractor.d2.checkpoint_files import (
    check_checkpoint,
    check_resume,
    newest_intact_checkpoint,
    official_layout_hint,
    url_cache_path,
)
from stageinteractor.d2.cli import (
    check_num_classes,
    check_switches,
    load_config,
    num_classes_keys,
    reclaim_overrides,
    split_overrides,
)
from stageinteractor.d2.data.validate import dataset_categories, dataset_names
from stageinteractor.errors import CheckpointFileError, ConfigError, UserError, run_tool
from tool_helpers import REPO, make_custom_dataset, serve_folder

DEMO_CFG = str(REPO / "configs/demo/stageinteractor_demo.py")


# ------------------------------------------------------------------ run_tool
def test_run_tool_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise ConfigError("bad value\n  for key x")

    assert run_tool(main, [], tool="t") == 2
    assert capsys.readouterr().err == "t: error: bad value for key x\n"
    assert run_tool(lambda argv: None, [], tool="t") == 0
    assert run_tool(lambda argv: 1, [], tool="t") == 1


def test_run_tool_lets_a_bug_keep_its_traceback():
    def main(argv):
        raise KeyError("a bug")  # not a UserError

    with pytest.raises(KeyError, match="a bug"):
        run_tool(main, [], tool="t")


def test_split_overrides_keeps_flags_with_equals():
    flags, ovs = split_overrides(["a.b=1", "--resume", "--dist-url=tcp://x", "c=2", "x.py"])
    assert flags == ["--resume", "--dist-url=tcp://x", "x.py"] and ovs == ["a.b=1", "c=2"]


def _list_option_parser():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--input", nargs="+")
    p.add_argument("--output")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    return p


def test_reclaim_overrides_takes_back_what_a_list_option_swallowed(tmp_path):
    """``--input`` last: split_overrides puts the overrides after its values, argparse gives
    them to --input; reclaimed, they are overrides again (order kept), an existing file whose
    name holds '=' stays an input."""
    eq_file = tmp_path / "k=v.png"
    eq_file.write_bytes(b"")
    argv = ["--output", "o", "a.b=1", "--input", "x.png", str(eq_file), "c=2"]
    flags, ovs = split_overrides(argv)
    args = _list_option_parser().parse_args(flags + ovs)
    assert args.input == ["x.png", "a.b=1", str(eq_file), "c=2"] and args.opts == []  # swallowed
    reclaim_overrides(args, "input")
    assert args.input == ["x.png", str(eq_file)] and args.opts == ["a.b=1", "c=2"]


def test_reclaim_overrides_leaves_an_absent_option_and_remainder_alone():
    args = _list_option_parser().parse_args(["--output", "o", "a.b=1"])
    reclaim_overrides(args, "input")
    assert args.input is None and args.opts == ["a.b=1"]
    args = _list_option_parser().parse_args(["--input", "a.b=1"])
    reclaim_overrides(args, "input")
    assert args.input == [] and args.opts == ["a.b=1"]


# ------------------------------------------------------------------ config checks
@pytest.mark.parametrize("override, key, value", [
    ("model.decoder.sampler=grouepd", "model.decoder.sampler", "'grouepd'"),
    ("model.decoder.filter_usage=adaptor", "model.decoder.filter_usage", "'adaptor'"),
    ("model.decoder.first_stage_points=48", "model.decoder.first_stage_points", "48"),
    ("model.decoder.dynamic_bias=1", "model.decoder.dynamic_bias", "1"),
])
def test_bad_switch_names_key_and_choices(override, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CFG, [override])
    name = key.rsplit(".", 1)[1]
    assert str(e.value).startswith(f"{key}={value} is not allowed: {name} must be one of (")


def test_switch_rule_between_keys_names_the_node():
    # reuse=False with a reuse-only switch set: no single key is wrong
    with pytest.raises(ConfigError, match=r"^model\.decoder\.max_reused_channel_filters=2 "
                                          r"is not allowed: .*reuse=False"):
        load_config(DEMO_CFG, ["model.decoder.reuse=False",
                               "model.decoder.max_reused_channel_filters=2"])


def test_good_switches_pass_and_check_can_be_skipped():
    cfg = load_config(DEMO_CFG, ["model.decoder.sampler=3d", "model.decoder.refine_mode=2z"])
    assert cfg.model.decoder.sampler == "3d"
    load_config(str(REPO / "configs/adamixer/adamixer_r50_100q_1x.py"))
    cfg = load_config(DEMO_CFG, ["model.decoder.sampler=nope"], check=False)
    assert cfg.model.decoder.sampler == "nope"
    cfg.model.decoder.sampler = "nope"
    with pytest.raises(ConfigError, match="sampler"):
        check_switches(cfg)


def test_missing_config_file():
    with pytest.raises(ConfigError, match=r"^config file 'nope\.py' does not exist$"):
        load_config("nope.py")


def test_num_classes_keys_skip_interpolations():
    cfg = LazyConfig.load(DEMO_CFG)
    # criterion and assigner interpolate the decoder's value: only its source is named
    assert num_classes_keys(cfg) == [("model.decoder.num_classes", 5)]


def test_num_classes_against_a_registered_dataset(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from stageinteractor.d2.data import register_coco_json

    root = make_custom_dataset(tmp_path / "data", splits=("train",))
    name = f"test_cli_{os.getpid()}"
    register_coco_json(name, str(root / "annotations/train.json"), str(root / "train"))
    try:
        assert dataset_categories(name) == ["cat", "dog"]  # json ids 3, 7 in id order
        cfg = LazyConfig.load(DEMO_CFG)
        cfg.model.decoder.num_classes = 2
        check_num_classes(cfg, [name])  # equal: fine
        cfg.model.decoder.num_classes = 1
        with pytest.raises(ConfigError, match=rf"^model\.decoder\.num_classes=1 but dataset "
                                              rf"'{name}' has 2 categories \(cat, dog\): set "
                                              rf"model\.decoder\.num_classes=2$"):
            check_num_classes(cfg, [name])
        check_num_classes(cfg, ["not_registered"])  # unknown categories: nothing to compare
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_dataset_names_per_use():
    cfg = LazyConfig.load(str(REPO / "configs/common/data/demo.py"))
    assert dataset_names(cfg) == ["stageinteractor_demo_train", "stageinteractor_demo_val"]
    assert dataset_names(cfg, eval_only=True) == ["stageinteractor_demo_val"]
    assert dataset_names(cfg, train_only=True) == ["stageinteractor_demo_train"]


# ------------------------------------------------------------------ checkpoint files
def test_official_layout_hint():
    t = torch.zeros(1)
    authors = {"meta": {"epoch": 36}, "state_dict": {"backbone.conv1.weight": t,
                                                     "roi_head.bbox_head.0.x": t}}
    assert official_layout_hint(authors) == ("mmdet layout: 'state_dict' + 'meta', keys "
                                             "roi_head.*")
    assert official_layout_hint({"rpn_head.a": t}) == "mmdet layout: state dict, keys rpn_head.*"
    # open-mmlab ImageNet backbones share the wrapper but are ours to map
    assert official_layout_hint({"meta": {}, "state_dict": {"conv1.weight": t}}) is None
    assert official_layout_hint({"model": {"decoder.x": t}}) is None


def _save(path, good=True):
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    if not good:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])


def test_newest_intact_checkpoint_order(tmp_path):
    for name, good in [("model_0000001.pth", True), ("model_0000010.pth", True),
                       ("model_0000002.pth", True), ("model_0000011.pth", False),
                       ("model_final.pth", False), ("model_0000012.pth.tmp-3", True)]:
        _save(tmp_path / name, good)
    (tmp_path / "other.pth").write_bytes(b"")
    # numeric order (10 after 2), corrupt ones skipped, temporaries and other names ignored
    assert newest_intact_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000010.pth")
    assert newest_intact_checkpoint(str(tmp_path),
                                    exclude=str(tmp_path / "model_0000010.pth")) \
        == str(tmp_path / "model_0000002.pth")


def test_check_resume(tmp_path):
    assert check_resume(str(tmp_path)) is None  # nothing to resume
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    assert check_resume(str(tmp_path)) is None  # dangling tag: the checkpointer starts over
    _save(tmp_path / "model_0000004.pth", good=False)
    with pytest.raises(CheckpointFileError, match="no other checkpoint .* is intact"):
        check_resume(str(tmp_path))
    _save(tmp_path / "model_0000002.pth")
    with pytest.raises(CheckpointFileError, match="newest intact checkpoint is .*model_0000002"):
        check_resume(str(tmp_path))
    _save(tmp_path / "model_0000004.pth")
    assert check_resume(str(tmp_path)) == str(tmp_path / "model_0000004.pth")


def test_local_checkpoint_problems(tmp_path):
    assert check_checkpoint("") == ""
    with pytest.raises(CheckpointFileError, match="does not exist"):
        check_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointFileError, match="is a folder"):
        check_checkpoint(str(tmp_path))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"empty \(0 bytes\)"):
        check_checkpoint(str(tmp_path / "empty.pth"))
    _save(tmp_path / "ok.pth")
    assert check_checkpoint(str(tmp_path / "ok.pth")) == str(tmp_path / "ok.pth")
    assert issubclass(CheckpointFileError, UserError)


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    (served / "ckpt").mkdir(parents=True)
    with serve_folder(served) as base:
        yield served, base


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


def test_url_is_downloaded_into_the_cache_without_a_lock_file(http_server, tmp_path,
                                                               monkeypatch):
    served, base = http_server
    _save(served / "ckpt" / "m.pth")
    cache = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    url = f"{base}/ckpt/m.pth"
    assert url_cache_path(url) == str(cache / "ckpt" / "m.pth")
    local = check_checkpoint(url)
    assert local == str(cache / "ckpt" / "m.pth")
    assert (cache / "ckpt" / "m.pth").read_bytes() == (served / "ckpt" / "m.pth").read_bytes()
    assert _files(cache) == ["ckpt/m.pth"]  # no m.pth.lock
    with pytest.raises(CheckpointFileError) as e:
        check_checkpoint(f"{base}/ckpt/missing.pkl")
    assert "HTTP Error 404" in str(e.value)
    assert f"put it at {cache}/ckpt/missing.pkl" in str(e.value)
    assert _files(cache) == ["ckpt/m.pth"]


def test_detectron2_url_maps_to_its_file_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    assert url_cache_path("detectron2://ImageNetPretrained/torchvision/R-50.pkl") == str(
        tmp_path / "detectron2/ImageNetPretrained/torchvision/R-50.pkl")
