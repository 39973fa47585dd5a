"""The usual user mistakes, through the tools' own command lines (issue 22).

Each mistake must end in ONE line ``<tool>: error: ...`` on stderr, exit status 2, no traceback,
and nothing written where the tool would have written its output. The fail-fast cases stop
before a model is built (a few seconds each, mostly imports); the cases that build or run a
model are marked slow.
"""
import os
import socket

import pytest
import torch

from tool_helpers import make_custom_dataset, run_cli, serve_folder, tool_env

DEMO_CFG = "configs/demo/stageinteractor_demo.py"
CUSTOM_CFG = "tests/d2/configs/demo_custom.py"  # demo model, 2 categories, custom COCO json


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Datasets root, a custom dataset (train + val) and bad checkpoints, made once."""
    root = tmp_path_factory.mktemp("mistakes")
    make_custom_dataset(root / "custom")
    make_custom_dataset(root / "valonly", splits=("val",))
    torch.save({"model": {"w": torch.arange(10000.0)}}, root / "full.pth")
    data = (root / "full.pth").read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    t = torch.zeros(2, 2)
    torch.save({"meta": {"epoch": 36, "mmdet_version": "2.12.0"},
                "state_dict": {"backbone.conv1.weight": t,
                               "rpn_head.init_proposal_bboxes.weight": t,
                               "roi_head.bbox_head.0.fc_cls.weight": t},
                "optimizer": {}}, root / "epoch_36.pth")
    (root / "d2datasets").mkdir()
    return root


def _env(work, **extra):
    return tool_env(work / "d2datasets", **dict({"CUSTOM_DATASET_ROOT": work / "custom"}, **extra))


def one_line_error(result, tool, *pieces):
    """Assert exit status 2, no traceback, exactly one stderr line ``<tool>: error: ...``
    containing every piece; returns the line."""
    rc, out, err = result
    assert rc == 2, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{tool}: error: "), lines[0]
    for piece in pieces:
        assert piece in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ overrides and config values
def test_demo_misspelt_override(work, tmp_path):
    out = tmp_path / "vis"
    one_line_error(run_cli("demo", ["--config-file", DEMO_CFG, "--input", work / "custom/val",
                                    "--output", out, f"train.init_checkpont={work}/full.pth"],
                           _env(work)),
                   "demo", "unknown config key 'train.init_checkpont'",
                   "did you mean 'train.init_checkpoint'?")
    assert not out.exists()


def test_export_onnx_misspelt_override(work, tmp_path):
    out = tmp_path / "model.onnx"
    one_line_error(run_cli("export_onnx", ["--config-file", DEMO_CFG, "--output", out,
                                           f"train.init_checkpont={work}/full.pth"], _env(work)),
                   "export_onnx", "unknown config key 'train.init_checkpont'",
                   "did you mean 'train.init_checkpoint'?")
    assert not out.exists()


def test_train_net_bad_switch_value_before_anything_is_written(work, tmp_path):
    out = tmp_path / "out"
    one_line_error(run_cli("train_net", ["--config-file", DEMO_CFG, f"train.output_dir={out}",
                                         "model.decoder.sampler=grouepd"], _env(work)),
                   "train_net", "model.decoder.sampler='grouepd' is not allowed: sampler must be "
                   "one of ('grouped', '3d', '3d_group_init'), got 'grouepd'")
    assert not out.exists()  # no config.yaml, no log.txt


def test_train_net_num_classes_below_the_dataset_categories(work, tmp_path):
    out = tmp_path / "out"
    one_line_error(run_cli("train_net", ["--config-file", CUSTOM_CFG, f"train.output_dir={out}",
                                         "model.decoder.num_classes=1"], _env(work)),
                   "train_net", "model.decoder.num_classes=1 but dataset 'custom_train' has 2 "
                   "categories (cat, dog): set model.decoder.num_classes=2")
    assert not out.exists()


# ------------------------------------------------------------------ checkpoints
def test_demo_truncated_checkpoint_names_the_file(work, tmp_path):
    one_line_error(run_cli("demo", ["--config-file", DEMO_CFG, "--input", work / "custom/val",
                                    "--output", tmp_path / "vis",
                                    f"train.init_checkpoint={work}/truncated.pth"], _env(work)),
                   "demo", f"checkpoint file {work}/truncated.pth is corrupt or truncated")
    assert not (tmp_path / "vis").exists()


def test_train_net_authors_checkpoint_gives_the_converter_command(work, tmp_path):
    ck = work / "epoch_36.pth"
    one_line_error(run_cli("train_net", ["--config-file", CUSTOM_CFG,
                                         f"train.output_dir={tmp_path / 'out'}",
                                         f"train.init_checkpoint={ck}"], _env(work)),
                   "train_net", f"checkpoint file {ck} is a checkpoint of the authors' code",
                   f"`python tools/convert_official_checkpoint.py {ck} "
                   f"{work}/epoch_36_converted.pth --config {CUSTOM_CFG}`",
                   f"train.init_checkpoint={work}/epoch_36_converted.pth")


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_net_url_offline_says_what_to_download_where(work, tmp_path):
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{_closed_port()}/ckpt/R-50.pkl"
    one_line_error(run_cli("train_net", ["--config-file", CUSTOM_CFG,
                                         f"train.output_dir={tmp_path / 'out'}",
                                         f"train.init_checkpoint={url}"],
                           _env(work, FVCORE_CACHE=cache)),
                   "train_net", f"cannot download checkpoint {url}",
                   f"download {url} yourself and put it at {cache}/ckpt/R-50.pkl")
    left = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files]
    assert left == []  # no 0-byte lock file, no partial download
    assert not (tmp_path / "out").exists()


def test_train_net_resume_from_a_truncated_checkpoint_names_the_intact_one(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    good = (work / "full.pth").read_bytes()
    bad = (work / "truncated.pth").read_bytes()
    files = {"model_0000001.pth": good, "model_0000003.pth": good, "model_0000005.pth": bad,
             "model_final.pth": bad, "last_checkpoint": b"model_final.pth"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    one_line_error(run_cli("train_net", ["--config-file", CUSTOM_CFG, f"train.output_dir={out}",
                                         "--resume"], _env(work)),
                   "train_net", f"--resume: the latest checkpoint {out}/model_final.pth is "
                   "corrupt or truncated", f"the newest intact checkpoint is "
                   f"{out}/model_0000003.pth", f"`echo model_0000003.pth > {out}/last_checkpoint`")
    assert sorted(os.listdir(out)) == sorted(files)  # nothing written, nothing removed


# ------------------------------------------------------------------ tools without a model
def test_plot_instability_folder_without_metrics(tmp_path):
    one_line_error(run_cli("plot_instability", [tmp_path / "nope", "--output", tmp_path / "x.png"],
                           tool_env(tmp_path)),
                   "plot_instability", f"'{tmp_path / 'nope'}': no metrics.json")
    assert not (tmp_path / "x.png").exists()


def test_make_demo_dataset_will_not_overwrite_another_dataset(tmp_path):
    from stageinteractor.d2.data.demo_dataset import DemoDatasetSpec, generate_demo_dataset

    target = tmp_path / "stageinteractor_demo"
    generate_demo_dataset(str(target), DemoDatasetSpec(num_train=2, num_val=1))
    before = sorted(os.listdir(target / "train"))
    one_line_error(run_cli("make_demo_dataset", ["--root", tmp_path, "--num-train", "3",
                                                 "--num-val", "1"], tool_env(tmp_path)),
                   "make_demo_dataset", f"{target} exists but is not a complete stageinteractor "
                   "demo dataset", "remove it to regenerate")
    assert sorted(os.listdir(target / "train")) == before


# ------------------------------------------------------------------ slower: build or run a model
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["demo", "export_onnx"])
def test_missing_config_file(tool, work, tmp_path):
    args = ["--config-file", "configs/demo/nope.py", "--output", tmp_path / "o"]
    if tool == "demo":
        args += ["--input", work / "custom/val"]
    one_line_error(run_cli(tool, args, _env(work)), tool,
                   "config file 'configs/demo/nope.py' does not exist")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["export_onnx", "train_net"])
def test_truncated_checkpoint(tool, work, tmp_path):
    args = ["--config-file", CUSTOM_CFG, f"train.init_checkpoint={work}/truncated.pth"]
    args += ["--output", tmp_path / "m.onnx"] if tool == "export_onnx" else [
        f"train.output_dir={tmp_path / 'out'}"]
    one_line_error(run_cli(tool, args, _env(work)), tool,
                   f"checkpoint file {work}/truncated.pth is corrupt or truncated")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_authors_checkpoint(work, tmp_path):
    ck = work / "epoch_36.pth"
    one_line_error(run_cli("demo", ["--config-file", CUSTOM_CFG, "--input", work / "custom/val",
                                    "--output", tmp_path / "vis", f"--checkpoint={ck}"],
                           _env(work)),
                   "demo", f"`python tools/convert_official_checkpoint.py {ck} ")


@pytest.mark.slow
def test_eval_only_reads_only_the_test_split(work, tmp_path):
    """Only val.json on disk: --eval-only validates and evaluates it; the CPU run logs its
    torch thread count."""
    rc, out, err = run_cli("train_net", ["--config-file", CUSTOM_CFG, "--eval-only",
                                         f"train.output_dir={tmp_path / 'out'}"],
                           _env(work, CUSTOM_DATASET_ROOT=work / "valonly"))
    log = out + err
    assert rc == 0, log[-3000:]
    assert "dataset 'custom_val' ok" in log and "custom_train" not in log
    assert "torch threads: 1 of" in log
    assert "copypaste: AP,AP50" in log


@pytest.mark.slow
def test_demo_labels_custom_categories_by_name(work, tmp_path):
    rc, out, err = run_cli("demo", ["--config-file", CUSTOM_CFG, "--input",
                                    work / "custom/val/val_0.png", "--output", tmp_path / "vis",
                                    "--confidence-threshold", "0"], _env(work))
    assert rc == 0, err[-3000:]
    line = [x for x in out.splitlines() if "val_0.png:" in x][0]
    # 20 queries, threshold 0: all 20 drawn, each labelled with a json category name
    counts = line.split("(", 1)[1].split(")", 1)[0]
    parsed = dict(part.rsplit(" ", 1) for part in counts.split(", "))
    assert set(parsed) <= {"cat", "dog"} and sum(map(int, parsed.values())) == 20, line
    assert (tmp_path / "vis" / "val_0.jpg").is_file()


@pytest.mark.slow
def test_train_net_url_checkpoint_is_fetched_once_without_a_lock_file(work, tmp_path):
    served, cache, out = tmp_path / "served", tmp_path / "cache", tmp_path / "out"
    (served / "ckpt").mkdir(parents=True)
    torch.save({"model": {}}, served / "ckpt" / "init.pth")  # loads, with every key missing
    with serve_folder(served) as base:
        rc, stdout, err = run_cli("train_net", [
            "--config-file", CUSTOM_CFG, f"train.output_dir={out}", "train.max_iter=1",
            f"train.init_checkpoint={base}/ckpt/init.pth"], _env(work, FVCORE_CACHE=cache))
    assert rc == 0, (stdout + err)[-3000:]
    assert f"Loading from {cache}/ckpt/init.pth ..." in stdout + err  # the cached file
    left = sorted(os.path.relpath(os.path.join(d, f), cache)
                  for d, _, files in os.walk(cache) for f in files)
    assert left == ["ckpt/init.pth"]
    assert (out / "model_final.pth").is_file()
