"""Parity: with own-stage scope (0, 0), IoU threshold 0 and detrex's num_boxes normaliser every
CSLA twin returns its detrex parent's loss dict, key for key (incl. _enc, _dn, _one2many)."""

import copy

import pytest
import torch

pytest.importorskip("detrex")

from detrex.modeling.criterion.criterion import SetCriterion  # noqa: E402
from projects.deformable_detr.modeling import DeformableCriterion  # noqa: E402
from projects.dino.modeling import DINOCriterion  # noqa: E402
from projects.dn_detr.modeling import DNCriterion  # noqa: E402
from projects.h_deformable_detr.modeling import (
    DeformableCriterion as HDeformableCriterion,
)  # noqa: E402

from detrex_csla_helpers import (  # noqa: E402
    assert_same_losses,
    cuda_calls_are_noops,
    hungarian,
    rand_decoder,
    rand_stage,
    rand_targets,
)
from stageinteractor.detrex_ext.criteria import (  # noqa: E402
    CSLADeformableCriterion,
    CSLADINOCriterion,
    CSLADNCriterion,
    CSLAHDeformableCriterion,
    CSLASetCriterion,
)

K, Q, S = 7, 12, 4
NUM_GTS = [3, 0, 5]  # includes an image without objects
PARITY = dict(csla_scope=(0, 0), csla_iou_threshold=0.0, csla_cls_norm="num_boxes")
WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _pair(parent, twin, **kw):
    base = parent(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS), **kw)
    ours = twin(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS), **PARITY, **kw)
    return base, ours


def _inputs(seed=0, enc=False):
    gen = torch.Generator().manual_seed(seed)
    outputs = rand_decoder(len(NUM_GTS), Q, K, S, gen)
    if enc:
        outputs["enc_outputs"] = rand_stage(len(NUM_GTS), 20, K, gen)
    return outputs, rand_targets(NUM_GTS, K, gen), gen


def test_set_criterion_parity():
    base, ours = _pair(SetCriterion, CSLASetCriterion)
    outputs, targets, _ = _inputs()
    want = base(outputs, targets)
    got = ours(outputs, targets)
    assert len(want) == 3 * S
    assert_same_losses(got, want)


def test_deformable_two_stage_parity():
    base, ours = _pair(DeformableCriterion, CSLADeformableCriterion)
    outputs, targets, _ = _inputs(seed=1, enc=True)
    want = base(outputs, copy.deepcopy(targets))
    got = ours(outputs, copy.deepcopy(targets))
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(got)
    assert_same_losses(got, want)


def _dino_dn_meta(gen, dn_num=2):
    single_padding = 2 * max(NUM_GTS)
    dn = rand_decoder(len(NUM_GTS), single_padding * dn_num, K, S, gen)
    return {"output_known_lbs_bboxes": dn, "dn_num": dn_num, "single_padding": single_padding}


def test_dino_parity_with_enc_and_dn():
    base, ours = _pair(DINOCriterion, CSLADINOCriterion, two_stage_binary_cls=False)
    outputs, targets, gen = _inputs(seed=2, enc=True)
    dn_meta = _dino_dn_meta(gen)
    with cuda_calls_are_noops():  # detrex's DINO criterion hard-codes .cuda()
        want = base(outputs, targets, dn_meta)
    got = ours(outputs, targets, dn_meta)  # ours needs no CUDA at all
    assert {"loss_class_dn", "loss_class_dn_0", "loss_bbox_enc"} <= set(got)
    assert len(got) == 3 * (S + 1 + S)  # stages + enc + dn stages
    assert_same_losses(got, want)


def test_dino_without_dn_gives_zero_dn_keys_on_cpu():
    _, ours = _pair(DINOCriterion, CSLADINOCriterion)
    outputs, targets, _ = _inputs(seed=3, enc=True)
    got = ours(outputs, targets, None)
    for suffix in ["_dn"] + [f"_dn_{i}" for i in range(S - 1)]:
        for name in ("loss_class", "loss_bbox", "loss_giou"):
            assert got[name + suffix].device.type == "cpu"
            assert got[name + suffix].item() == 0.0


def _dn_detr_outputs(seed, groups=3):
    outputs, targets, gen = _inputs(seed=seed)
    max_gt = max(NUM_GTS)
    dn = rand_decoder(len(NUM_GTS), max_gt * groups, K, S, gen)
    full = {"denoising_groups": torch.tensor(groups), "max_gt_num_per_image": torch.tensor(max_gt)}
    full.update(outputs)
    full["denoising_output"] = dn
    return full, targets


def test_dn_detr_parity_with_dn():
    base, ours = _pair(DNCriterion, CSLADNCriterion)
    outputs, targets = _dn_detr_outputs(seed=4)
    with cuda_calls_are_noops():
        want = base(outputs, targets)
    got = ours(outputs, targets)
    assert {"loss_class_dn", "loss_giou_dn_2"} <= set(got)
    assert_same_losses(got, want)


def test_dn_detr_without_dn_on_cpu():
    _, ours = _pair(DNCriterion, CSLADNCriterion)
    outputs, targets, _ = _inputs(seed=5)
    got = ours(outputs, targets)
    assert got["loss_class_dn"].item() == 0.0 and got["loss_bbox_dn_0"].device.type == "cpu"


def _h_detr_outputs(seed):
    gen = torch.Generator().manual_seed(seed)
    outputs = rand_decoder(len(NUM_GTS), Q, K, S, gen)
    many = rand_decoder(len(NUM_GTS), 3 * Q, K, S, gen)
    outputs["pred_logits_one2many"] = many["pred_logits"]
    outputs["pred_boxes_one2many"] = many["pred_boxes"]
    outputs["aux_outputs_one2many"] = many["aux_outputs"]
    outputs["enc_outputs"] = rand_stage(len(NUM_GTS), 20, K, gen)
    return outputs, rand_targets(NUM_GTS, K, gen)


def _train_hybrid(criterion, outputs, targets, k_one2many=2):
    """The two criterion calls of detrex's ``HDeformableDETR.train_hybrid``."""
    losses = criterion(outputs, targets)
    multi = copy.deepcopy(targets)
    for t in multi:
        t["boxes"] = t["boxes"].repeat(k_one2many, 1)
        t["labels"] = t["labels"].repeat(k_one2many)
    one2many = {
        "pred_logits": outputs["pred_logits_one2many"],
        "pred_boxes": outputs["pred_boxes_one2many"],
        "aux_outputs": outputs["aux_outputs_one2many"],
    }
    for k, v in criterion(one2many, multi).items():
        losses[k + "_one2many"] = v
    return losses


@pytest.mark.parametrize("on_one2many", [False, True])
def test_h_deformable_parity_incl_one2many(on_one2many):
    base, ours = _pair(HDeformableCriterion, CSLAHDeformableCriterion)
    ours.csla_on_one2many = on_one2many
    outputs, targets = _h_detr_outputs(seed=6)
    want = _train_hybrid(base, outputs, targets)
    got = _train_hybrid(ours, outputs, targets)
    assert {"loss_class_one2many", "loss_class_enc", "loss_giou_2_one2many"} <= set(got)
    assert_same_losses(got, want)


def test_csla_changes_only_decoder_classification():
    """Default CSLA: box, enc and dn keys equal the parent's; some class keys differ."""
    base = DINOCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    ours = CSLADINOCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    outputs, targets, gen = _inputs(seed=7, enc=True)
    dn_meta = _dino_dn_meta(gen)
    with cuda_calls_are_noops():
        want = base(outputs, targets, dn_meta)
    got = ours(outputs, targets, dn_meta)
    assert sorted(got) == sorted(want)
    stage_class = {"loss_class"} | {f"loss_class_{i}" for i in range(S - 1)}
    for k in want:
        if k not in stage_class:
            assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    assert any(not torch.allclose(got[k], want[k]) for k in stage_class)


def test_gradients_flow_and_state_dict_unchanged():
    base, ours = _pair(DeformableCriterion, CSLADeformableCriterion)
    assert list(ours.state_dict()) == list(base.state_dict())
    outputs, targets, _ = _inputs(seed=8, enc=True)
    sum(ours(outputs, targets).values()).backward()
    assert outputs["aux_outputs"][0]["pred_logits"].grad.abs().sum() > 0
