"""Converter for the authors' checkpoints (issue 8): every backbone, the CLI and bad inputs.

For each backbone (R50, R101, X101-DCN, Swin-S) a state dict in the authors' layout is built from
the layout spec (random values; dead layers zero; constant buffers at their official values),
converted, and loaded into the model of the matching config with every key accounted for; the
reverse conversion reproduces it key for key, bit for bit. Models are built on the meta device
(shapes only), so no memory or init time is spent on 140-160M parameters.
"""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402

from stageinteractor.d2.backbone.swin import PatchMerging, relative_position_index  # noqa: E402
from stageinteractor.d2.config_model import build_config_model  # noqa: E402
from stageinteractor.official.checkpoint import (  # noqa: E402
    ConversionError,
    check_against_model,
    convert_official_to_ours,
    convert_ours_to_official,
    detect_backbone,
    key_maps,
    official_layout,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "r50": "configs/stageinteractor/stageinteractor_r50_100q_1x.py",
    "r101": "configs/stageinteractor/stageinteractor_r101_300q_crop_mstrain_3x.py",
    "x101_dcn": "configs/stageinteractor/stageinteractor_x101_dcn_300q_crop_mstrain_3x.py",
    "swin_s": "configs/stageinteractor/stageinteractor_swin_s_300q_crop_mstrain_3x.py",
}
# official parameter counts (official_checkpoint_layout.md §3, §8; buffers excluded)
OFFICIAL_PARAMS = {"r50": 137_277_256, "r101": 156_320_584, "x101_dcn": 158_520_932, "swin_s": 162_044_626}


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint",
                                                  ROOT / "tools" / "convert_official_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta_model(kind):
    """The config's model, on the meta device where its modules allow it (else CPU)."""
    cfg = LazyConfig.load(str(ROOT / CONFIGS[kind]))
    return build_config_model(str(ROOT / CONFIGS[kind])), int(cfg.model.decoder.num_queries)


def _value(key, shape, gen):
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith("relative_position_index"):
        return relative_position_index(7)
    if key.endswith("init_proposal_bboxes"):
        return torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(*shape).clone()
    if key.endswith("iou_snyc_statistics.running_mean"):
        return torch.full(shape, 0.5)
    if "subbox_score_list" in key or key.endswith("iou_snyc_statistics.running_var"):
        return torch.zeros(shape)
    return torch.rand(shape, generator=gen) - 0.5


_DECODER_CACHE = {}


def random_official_state_dict(kind, num_queries, seed=0):
    """Random values in the authors' layout; the decoder part (same for every backbone) is
    generated once per (num_queries, seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in official_layout(kind, num_queries).items():
        if k.startswith(("rpn_head.", "roi_head.")):
            cache = _DECODER_CACHE.setdefault((num_queries, seed), {})
            if k not in cache:
                cache[k] = _value(k, s, gen)
            out[k] = cache[k]
        else:
            out[k] = _value(k, s, gen)
    return out


def _n_params(sd):
    buffers = ("num_batches_tracked", "running_mean", "running_var", "relative_position_index",
               "init_proposal_bboxes")
    return sum(v.numel() for k, v in sd.items() if not k.endswith(buffers))


@pytest.mark.parametrize("kind", ["r50", "r101", "x101_dcn", "swin_s"])
def test_each_backbone_converts_loads_and_round_trips(kind):
    model, nq = _meta_model(kind)
    official = random_official_state_dict(kind, nq)
    assert _n_params(official) == OFFICIAL_PARAMS[kind]
    assert detect_backbone(official) == kind

    ours, report = convert_official_to_ours(official)
    assert report.backbone == kind and report.num_queries == nq and not report.warnings
    check_against_model(ours, model.state_dict())
    result = model.load_state_dict(ours, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(report.mapped) + len(report.dropped) == len(official)
    assert all(("subbox_score_list" in k or "iou_snyc" in k or k.endswith("num_batches_tracked")
                or k == "rpn_head.init_proposal_bboxes") for k in report.dropped)

    back = convert_ours_to_official(ours)
    assert list(back) == list(official)
    for k, v in official.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_parameter_counts_match_the_authors():
    for kind in ("r101", "x101_dcn", "swin_s"):
        lay = official_layout(kind, 300)
        n = sum(torch.Size(s).numel() for k, s in lay.items() if not k.endswith(
            ("num_batches_tracked", "running_mean", "running_var", "relative_position_index",
             "init_proposal_bboxes")))
        assert n == OFFICIAL_PARAMS[kind], kind
    lay = official_layout("r50", 100)
    assert len(lay) == 662


def test_swin_patch_merging_reorder_matches_unfold_semantics():
    """The authors' Swin merges 2x2 patches with nn.Unfold (channel-major, kernel position
    kh*2+kw); ours concatenates in Microsoft order. Converted weights give the same output."""
    torch.manual_seed(0)
    C, H, W = 6, 4, 6
    x = torch.randn(2, H * W, C)
    w_off = torch.randn(2 * C, 4 * C)
    g_off, b_off = torch.randn(4 * C), torch.randn(4 * C)
    # authors' computation
    u = F.unfold(x.view(2, H, W, C).permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    ref = F.linear(F.layer_norm(u, (4 * C,), g_off, b_off), w_off)
    # ours, with converted weights
    m = next(m for m in key_maps("swin_s", 300) if getattr(m, "official", "").endswith("stages.0.downsample.reduction.weight"))
    n = next(m for m in key_maps("swin_s", 300) if getattr(m, "official", "").endswith("stages.0.downsample.norm.weight"))
    pm = PatchMerging(C)
    with torch.no_grad():
        pm.reduction.weight.copy_(m.to_ours(w_off))
        pm.norm.weight.copy_(n.to_ours(g_off))
        pm.norm.bias.copy_(n.to_ours(b_off))
    assert torch.allclose(pm(x, H, W), ref, atol=1e-5)
    assert torch.equal(m.to_official(m.to_ours(w_off)), w_off)


# ------------------------------------------------------------------------------ key errors

@pytest.fixture(scope="module")
def r50_official():
    return random_official_state_dict("r50", 100)


@pytest.fixture(scope="module", autouse=True)
def _free_decoder_cache():
    yield
    _DECODER_CACHE.clear()


def test_unknown_key_names_key_and_shapes(r50_official):
    sd = dict(r50_official)
    sd["roi_head.bbox_head.0.extra.weight"] = torch.zeros(3, 2)
    with pytest.raises(ConversionError, match=r"unknown key 'roi_head\.bbox_head\.0\.extra\.weight' \(shape \[3, 2\]\)"):
        convert_official_to_ours(sd)


def test_missing_key_names_key_and_expected_shape(r50_official):
    sd = dict(r50_official)
    del sd["roi_head.bbox_head.3.dynamic_conv.M_score_list.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'roi_head\.bbox_head\.3\.dynamic_conv\.M_score_list\.weight' \(found: none, expected shape \[1024, 256\]\)"):
        convert_official_to_ours(sd)


def test_shape_mismatch_names_found_and_expected(r50_official):
    sd = dict(r50_official)
    sd["neck.lateral_convs.2.conv.weight"] = torch.zeros(256, 512, 1, 1)
    with pytest.raises(ConversionError, match=r"'neck\.lateral_convs\.2\.conv\.weight': found \[256, 512, 1, 1\], expected \[256, 1024, 1, 1\]"):
        convert_official_to_ours(sd)


def test_nonzero_dead_layer_warns_with_its_name(r50_official):
    sd = dict(r50_official)
    sd["roi_head.bbox_head.4.dynamic_conv.subbox_score_list.1.bias"] = torch.ones(128)
    _, report = convert_official_to_ours(sd)
    assert len(report.warnings) == 1 and "roi_head.bbox_head.4.dynamic_conv.subbox_score_list.1.bias" in report.warnings[0]


# ------------------------------------------------------------------------------ CLI and files

def test_cli_end_to_end_with_detectron2_checkpointer(tmp_path, r50_official, capsys):
    tool = _load_tool()
    src, dst, rev = tmp_path / "epoch_12.pth", tmp_path / "converted.pth", tmp_path / "official_again.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person",)}, "state_dict": r50_official,
                "optimizer": {"state": {}, "param_groups": []}}, src)
    assert tool.main([str(src), str(dst), "--config", str(ROOT / CONFIGS["r50"])]) == 0
    out = capsys.readouterr().out
    assert "mapped: 570 keys -> 514 keys of ours" in out and "dropped: 92 keys" in out
    assert "all zero (checked)" in out and "optimizer" in out

    model, _ = _meta_model("r50")
    try:  # the checkpointer tools/train_net.py uses for train.init_checkpoint
        from stageinteractor.d2.engine import AtomicCheckpointer as Checkpointer
    except ImportError:  # pragma: no cover
        Checkpointer = DetectionCheckpointer
    ckpt = Checkpointer(model)
    assert isinstance(ckpt, DetectionCheckpointer)
    seen = {}
    orig = ckpt._load_model
    ckpt._load_model = lambda c: seen.setdefault("r", orig(c))
    with warnings.catch_warnings():  # copying into a meta model is a no-op (shapes are checked)
        warnings.simplefilter("ignore", UserWarning)
        ckpt.load(str(dst))  # what train.init_checkpoint does
    r = seen["r"]
    assert not r.missing_keys and not r.unexpected_keys and not r.incorrect_shapes

    assert tool.main(["--reverse", str(dst), str(rev)]) == 0
    back = torch.load(rev, weights_only=True)["state_dict"]
    assert list(back) == list(r50_official)
    assert all(torch.equal(back[k], v) for k, v in r50_official.items())


def _expect_one_error(tool, capsys, args, pattern, dst):
    assert tool.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert pattern in err, err
    assert not Path(dst).exists()
    assert not [p for p in Path(dst).parent.iterdir() if p.name.startswith(".tmp_convert_")]


def test_bad_inputs_one_message_and_no_output(tmp_path, capsys):
    tool = _load_tool()
    dst = tmp_path / "out.pth"
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    _expect_one_error(tool, capsys, [str(text), str(dst)], "not a PyTorch checkpoint", dst)

    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    _expect_one_error(tool, capsys, [str(tensor_file), str(dst)], "not a checkpoint", dst)

    frcnn = tmp_path / "faster_rcnn.pth"
    torch.save({"meta": {"config": "model = dict(\n    type='FasterRCNN',\n    backbone=dict())"},
                "state_dict": {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
                               "rpn_head.rpn_conv.weight": torch.zeros(256, 256, 3, 3),
                               "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 1024)}}, frcnn)
    _expect_one_error(tool, capsys, [str(frcnn), str(dst)], "not a StageInteractor checkpoint (looks like FasterRCNN)", dst)

    truncated = tmp_path / "truncated.pth"
    data = frcnn.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _expect_one_error(tool, capsys, [str(truncated), str(dst)], "truncated or corrupt", dst)

    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    legacy.write_bytes(data[: len(data) // 2])
    _expect_one_error(tool, capsys, [str(legacy), str(dst)], "truncated or corrupt", dst)

    _expect_one_error(tool, capsys, [str(tmp_path / "absent.pth"), str(dst)], "no such file", dst)


def test_key_error_through_cli_writes_nothing(tmp_path, capsys, r50_official):
    tool = _load_tool()
    sd = dict(r50_official)
    sd["backbone.layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    src, dst = tmp_path / "bad_shape.pth", tmp_path / "out.pth"
    torch.save({"state_dict": sd}, src)
    _expect_one_error(tool, capsys, [str(src), str(dst)],
                      "'backbone.layer1.0.conv1.weight': found [64, 64, 3, 3], expected [64, 64, 1, 1]", dst)


@pytest.mark.parametrize("kind", ["x101_dcn", "swin_s"])
def test_released_configs_use_the_authors_test_settings(kind):
    """Released models (README of the authors): 300 queries, top-300 (query, class) pairs per
    image (max_per_img = 300), single-scale resize short 800 / long <= 1333, no flip, no NMS."""
    from detectron2.config import instantiate
    from detectron2.data import transforms as T

    cfg = LazyConfig.load(str(ROOT / CONFIGS[kind]))
    assert cfg.model.decoder.num_queries == 300
    assert cfg.model.max_detections_per_image in (None, 300)  # None = num_queries
    assert "nms" not in str(cfg.model).lower()
    augs = instantiate(cfg.dataloader.test.mapper.augmentations)
    assert len(augs) == 1 and isinstance(augs[0], T.ResizeShortestEdge)
    assert tuple(augs[0].short_edge_length) == (800, 800) and augs[0].max_size == 1333
    assert cfg.dataloader.test.mapper.is_train is False
