"""The whole-checkpoint converter without detectron2 (stageinteractor.official.checkpoint and
tools/convert_official_checkpoint.py without --config): any number of classes and queries, both
directions, bit for bit; the decoder part loads strictly into our core decoder built with the
same numbers (an independent check of the shapes). The per-backbone checks against the configs'
models are in tests/d2/test_official_checkpoint.py."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from stageinteractor.core import StageInteractorDecoder
from stageinteractor.official.checkpoint import (
    ConversionError,
    convert_official_to_ours,
    convert_ours_to_official,
    official_layout,
)
from stageinteractor.official.layout import DecoderHParams

ROOT = Path(__file__).resolve().parents[2]


def _official(num_queries, num_classes, seed=0):
    """Random values in the authors' R50 layout (dead layers zero: they are checked)."""
    g = torch.Generator().manual_seed(seed)
    hp = DecoderHParams(num_queries=num_queries, num_classes=num_classes)
    out = {}
    for k, shape in official_layout("r50", num_queries, hp).items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros(shape, dtype=torch.int64)
        elif "subbox_score_list" in k:
            out[k] = torch.zeros(shape)
        elif k.endswith("iou_snyc_statistics.running_mean"):
            out[k] = torch.full(shape, 0.5)
        elif k.endswith("iou_snyc_statistics.running_var"):
            out[k] = torch.zeros(shape)
        elif k == "rpn_head.init_proposal_bboxes":
            out[k] = torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(*shape).clone()
        else:
            out[k] = torch.rand(shape, generator=g) - 0.5
    return out


@pytest.mark.parametrize("num_queries,num_classes", [(7, 3), (100, 80)])
def test_any_number_of_classes_round_trips_and_loads_into_our_decoder(num_queries, num_classes):
    official = _official(num_queries, num_classes)
    ours, report = convert_official_to_ours(official)
    assert (report.backbone, report.num_queries, report.num_classes) == ("r50", num_queries, num_classes)
    assert f"queries: {num_queries}, classes: {num_classes}" in report.summary()
    assert ours["decoder.stages.5.cls_logits.weight"].shape == (num_classes, 256)

    dec = StageInteractorDecoder(num_classes=num_classes, num_queries=num_queries, num_stages=6,
                                 feature_strides=(4, 8, 16, 32))
    part = {k[len("decoder."):]: v for k, v in ours.items() if k.startswith("decoder.")}
    result = dec.load_state_dict(part, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    back = convert_ours_to_official(ours)
    assert list(back) == list(official)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in official.items())


def test_a_classifier_of_another_width_in_one_stage_is_named():
    official = _official(7, 3)
    official["roi_head.bbox_head.4.fc_cls.weight"] = torch.zeros(5, 256)
    with pytest.raises(ConversionError, match=r"'roi_head\.bbox_head\.4\.fc_cls\.weight': found \[5, 256\], "
                                              r"expected \[3, 256\]"):
        convert_official_to_ours(official)


def test_tool_converts_both_ways_without_detectron2(tmp_path, capsys, monkeypatch):
    """The command line, loaded from its file, with ``import detectron2`` failing: nothing of
    detectron2 is needed without --config."""
    monkeypatch.setitem(sys.modules, "detectron2", None)  # any import of it raises ImportError
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert_official_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    official = _official(7, 3)
    src, dst, rev = tmp_path / "epoch_1.pth", tmp_path / "ours.pth", tmp_path / "theirs.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": official}, src)
    assert tool.main([str(src), str(dst)]) == 0
    assert "queries: 7, classes: 3" in capsys.readouterr().out
    assert tool.main(["--reverse", str(dst), str(rev)]) == 0
    back = torch.load(rev, weights_only=True)["state_dict"]
    assert list(back) == list(official) and all(torch.equal(back[k], v) for k, v in official.items())
