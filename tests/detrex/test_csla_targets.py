"""CSLA targets inside the detrex criteria vs hand-computed answers; normaliser; matcher call
count; diagnostics in the event storage (never in the loss dict)."""

import copy

import pytest
import torch

pytest.importorskip("detrex")

from detrex.modeling.criterion.criterion import sigmoid_focal_loss  # noqa: E402

from detrex_csla_helpers import (  # noqa: E402
    CountingMatcher,
    cuda_calls_are_noops,
    hungarian,
    rand_decoder,
    rand_stage,
    rand_targets,
)
from stageinteractor.detrex_ext.criteria import (  # noqa: E402
    CSLADeformableCriterion,
    CSLADINOCriterion,
    CSLAHDeformableCriterion,
    CSLASetCriterion,
)

K = 4
WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _cxcywh(*xyxy):
    x0, y0, x1, y1 = xyxy
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


# Ground truths (xyxy): g0 class 1, g1 class 3. Exact binary fractions so IoUs are exact.
G0, G1 = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
A = (0.0, 0.0, 0.5, 0.25)  # IoU(A, g0) = 0.5 exactly (threshold is inclusive)
B = (0.0, 0.0, 0.5, 0.125)  # IoU(B, g0) = 0.25
E = (0.5, 0.5, 1.0, 0.625)  # IoU(E, g1) = 0.25
# stage 0 boxes of queries q0, q1, q2 and stage 1 boxes
STAGE_BOXES = [[G0, G1, A], [B, E, G0]]
# Hungarian results (query -> gt): stage 0: q0->g0, q1->g1; stage 1: q2->g0, q1->g1
MATCHES = [([0, 1], [0, 1]), ([1, 2], [1, 0])]


class FixedMatcher(torch.nn.Module):
    """Returns MATCHES[s] for the stage whose logits are ``stage_logits[s]``."""

    def __init__(self):
        super().__init__()
        self.stage_logits = []
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        s = next(i for i, t in enumerate(self.stage_logits) if t is outputs["pred_logits"])
        src, tgt = MATCHES[s]
        return [(torch.tensor(src), torch.tensor(tgt))]


def _toy(**switches):
    matcher = FixedMatcher()
    crit = CSLASetCriterion(num_classes=K, matcher=matcher, weight_dict=dict(WEIGHTS), **switches)
    stages = [
        {
            "pred_logits": torch.zeros(1, 3, K),
            "pred_boxes": torch.tensor([[_cxcywh(*b) for b in boxes]]),
        }
        for boxes in STAGE_BOXES
    ]
    matcher.stage_logits = [s["pred_logits"] for s in stages]
    outputs = dict(stages[-1], aux_outputs=stages[:-1])
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([_cxcywh(*G0), _cxcywh(*G1)])}
    ]
    return crit, outputs, targets, matcher


def _targets_of(crit, outputs, targets):
    """Run the pre-pass and read the per-stage multi-hot targets (then clear the cache)."""
    crit._csla_prepass(outputs, targets, prefix="csla")
    try:
        return [crit._lookup_target(st["pred_logits"]) for st in crit.decoder_stages(outputs)]
    finally:
        crit.matcher.cache.clear()
        crit._csla_targets.clear()


def _hot(entries):
    t = torch.zeros(1, 3, K)
    for q, c in entries:
        t[0, q, c] = 1
    return t


def test_multi_hot_paper_scope_by_hand():
    crit, outputs, targets, _ = _toy(csla_scope=(-1, None), csla_iou_threshold=0.5)
    (t0, n0), (t1, n1) = _targets_of(crit, outputs, targets)
    # stage 0 gathers stage 0 and 1: q0 {1}, q1 {3}, q2 {1} via stage 1's q2->g0 (IoU 0.5 >= 0.5)
    assert torch.equal(t0, _hot([(0, 1), (1, 3), (2, 1)]))
    # stage 1: stage-0 pairs fail on stage-1 boxes (0.25), own q1->g1 fails (0.25): only q2 {1}
    assert torch.equal(t1, _hot([(2, 1)]))
    # max_positives normaliser: max(sum T, #matched) per stage
    assert (n0, n1) == (3.0, 2.0)


def test_multi_hot_own_stage_and_threshold():
    crit, outputs, targets, _ = _toy(csla_scope=(0, 0), csla_iou_threshold=0.5)
    (t0, _), (t1, _) = _targets_of(crit, outputs, targets)
    assert torch.equal(t0, _hot([(0, 1), (1, 3)]))
    assert torch.equal(t1, _hot([(2, 1)]))  # own q1->g1 has IoU 0.25 < 0.5: a negative
    crit, outputs, targets, _ = _toy(csla_scope=(-1, None), csla_iou_threshold=0.6)
    (t0, _), _ = _targets_of(crit, outputs, targets)
    assert torch.equal(t0, _hot([(0, 1), (1, 3)]))  # IoU 0.5 < 0.6: q2 drops out
    crit, outputs, targets, _ = _toy(csla_scope=(0, None), csla_iou_threshold=0.5)
    (_, _), (t1, _) = _targets_of(crit, outputs, targets)
    assert torch.equal(t1, _hot([(2, 1)]))  # scope clipped at the last stage


def test_loss_uses_multi_hot_and_normaliser():
    crit, outputs, targets, matcher = _toy()
    for st in crit.decoder_stages(outputs):
        st["pred_logits"].normal_()
    losses = crit(outputs, targets)
    want0 = (
        sigmoid_focal_loss(
            outputs["aux_outputs"][0]["pred_logits"], _hot([(0, 1), (1, 3), (2, 1)]), 3.0
        )
        * 3
    )
    want1 = sigmoid_focal_loss(outputs["pred_logits"], _hot([(2, 1)]), 2.0) * 3
    assert torch.allclose(losses["loss_class_0"], want0, atol=1e-6)
    assert torch.allclose(losses["loss_class"], want1, atol=1e-6)
    assert matcher.calls == 2  # once per stage, not twice
    crit2, outputs2, targets2, _ = _toy(csla_cls_norm="num_boxes")
    outputs2["pred_logits"].copy_(outputs["pred_logits"])
    want1_nb = sigmoid_focal_loss(outputs["pred_logits"], _hot([(2, 1)]), 2.0) * 3  # 2 GTs
    assert torch.allclose(crit2(outputs2, targets2)["loss_class"], want1_nb, atol=1e-6)


def test_empty_ground_truth():
    crit = CSLASetCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    gen = torch.Generator().manual_seed(0)
    outputs = rand_decoder(2, 5, K, 3, gen)
    targets = rand_targets([0, 0], K, gen)
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_matcher_runs_once_per_stage_plus_encoder():
    gen = torch.Generator().manual_seed(1)
    S = 4
    outputs = rand_decoder(2, 10, K, S, gen)
    outputs["enc_outputs"] = rand_stage(2, 15, K, gen)
    targets = rand_targets([2, 3], K, gen)
    for cls in (CSLADeformableCriterion, CSLADINOCriterion):
        counter = CountingMatcher(hungarian())
        crit = cls(num_classes=K, matcher=counter, weight_dict=dict(WEIGHTS))
        with cuda_calls_are_noops():
            crit(outputs, copy.deepcopy(targets))
        assert counter.calls == S + 1, cls
        assert sum(t is outputs["enc_outputs"]["pred_logits"] for t in counter.seen) == 1
    # H-DETR: one-to-one call (S + enc) then one-to-many call (S)
    many = rand_decoder(2, 20, K, S, gen)
    outputs.update(
        pred_logits_one2many=many["pred_logits"],
        pred_boxes_one2many=many["pred_boxes"],
        aux_outputs_one2many=many["aux_outputs"],
    )
    for on_one2many in (False, True):
        counter = CountingMatcher(hungarian())
        crit = CSLAHDeformableCriterion(
            num_classes=K, matcher=counter, weight_dict=dict(WEIGHTS), csla_on_one2many=on_one2many
        )
        crit(outputs, targets)
        crit(
            {
                "pred_logits": many["pred_logits"],
                "pred_boxes": many["pred_boxes"],
                "aux_outputs": many["aux_outputs"],
            },
            targets,
        )
        assert counter.calls == 2 * S + 1


def test_diagnostics_go_to_event_storage_not_loss_dict():
    from detectron2.utils.events import EventStorage

    gen = torch.Generator().manual_seed(2)
    outputs = rand_decoder(2, 10, K, 3, gen)
    targets = rand_targets([2, 3], K, gen)
    crit = CSLASetCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    losses = crit(outputs, targets)  # no storage: nothing logged, no error
    with EventStorage(0) as storage:
        losses_logged = crit(outputs, targets)
        names = set(storage.latest())
    assert sorted(losses) == sorted(losses_logged)
    assert all(k.startswith("loss_") for k in losses_logged)
    assert {
        "csla/positives_s0",
        "csla/positives_s2",
        "csla/instability_s0_s1",
        "csla/instability_s1_s2",
    } <= names


def test_bad_switches_are_rejected():
    with pytest.raises(ValueError, match="csla_cls_norm"):
        CSLASetCriterion(num_classes=K, matcher=hungarian(), weight_dict={}, csla_cls_norm="mean")
    with pytest.raises(ValueError, match="focal_loss"):
        CSLASetCriterion(
            num_classes=K, matcher=hungarian(), weight_dict={}, loss_class_type="ce_loss"
        )
    with pytest.raises(ValueError, match="csla_iou_threshold"):
        CSLASetCriterion(num_classes=K, matcher=hungarian(), weight_dict={}, csla_iou_threshold=1.5)


def test_disabled_is_the_parent():
    from detrex.modeling.criterion.criterion import SetCriterion

    gen = torch.Generator().manual_seed(3)
    outputs = rand_decoder(2, 10, K, 3, gen)
    targets = rand_targets([2, 3], K, gen)
    base = SetCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    ours = CSLASetCriterion(
        num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS), csla_enabled=False
    )
    want, got = base(outputs, targets), ours(outputs, targets)
    assert all(torch.equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want)


def test_h_detr_one2many_branch_is_left_to_detrex_unless_asked():
    from projects.h_deformable_detr.modeling import DeformableCriterion

    gen = torch.Generator().manual_seed(4)
    S = 3
    outputs = rand_decoder(2, 10, K, S, gen)
    many = rand_decoder(2, 20, K, S, gen)
    outputs.update(
        pred_logits_one2many=many["pred_logits"],
        pred_boxes_one2many=many["pred_boxes"],
        aux_outputs_one2many=many["aux_outputs"],
    )
    targets = rand_targets([2, 3], K, gen)
    multi = [{"labels": t["labels"].repeat(2), "boxes": t["boxes"].repeat(2, 1)} for t in targets]
    second = {
        "pred_logits": many["pred_logits"],
        "pred_boxes": many["pred_boxes"],
        "aux_outputs": many["aux_outputs"],
    }
    base = DeformableCriterion(num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS))
    want = base(second, multi)
    results = {}
    for on in (False, True):
        crit = CSLAHDeformableCriterion(
            num_classes=K, matcher=hungarian(), weight_dict=dict(WEIGHTS), csla_on_one2many=on
        )
        crit(outputs, targets)  # one-to-one call: remembers the one-to-many logits
        results[on] = crit(second, multi)
    assert all(torch.equal(results[False][k], want[k]) for k in want)
    assert not torch.allclose(results[True]["loss_class"], want["loss_class"])
    assert torch.equal(results[True]["loss_bbox"], want["loss_bbox"])


def test_normalisers_differ_and_match_hand_computed_losses():
    """A case where the two normalisers differ: stage 0 has 3 multi-hot positives and 2
    matched queries (max_positives = 3) while the batch has 2 ground truths (num_boxes = 2).
    With all logits 0 (p = 1/2) every entry's focal term is ln 2 * (1/2)^2 times alpha = 1/4
    (positive) or 1 - alpha = 3/4 (negative), so each loss is (sum over the 3 x 4 entries) / norm:
    stage 0: (3 * 1/4 + 9 * 3/4) * ln2 / 4 = 1.875 ln 2, stage 1 (1 positive): 2.125 ln 2."""
    import math

    ln2 = math.log(2.0)
    want = {
        "max_positives": {"loss_class_0": 1.875 * ln2 / 3, "loss_class": 2.125 * ln2 / 2},
        "num_boxes": {"loss_class_0": 1.875 * ln2 / 2, "loss_class": 2.125 * ln2 / 2},
    }
    for norm, expected in want.items():
        crit, outputs, targets, _ = _toy(csla_cls_norm=norm)
        losses = crit(outputs, targets)
        for key, value in expected.items():
            assert losses[key].item() == pytest.approx(value, rel=1e-6), (norm, key)
    assert want["max_positives"]["loss_class_0"] != pytest.approx(want["num_boxes"]["loss_class_0"])


def test_use_csla_cls_norm_reaches_the_loss():
    """The config switch end to end: ``use_csla(cls_norm=...)`` on a SetCriterion config node,
    instantiated, gives stage 0's hand-computed loss with that normaliser (3 vs 2)."""
    import math

    from detectron2.config import LazyCall, instantiate
    from detrex.modeling.criterion.criterion import SetCriterion

    from stageinteractor.detrex_ext.swap import use_csla

    for norm, denominator in (("num_boxes", 2.0), ("max_positives", 3.0)):
        _, outputs, targets, matcher = _toy()
        model_cfg = {
            "criterion": LazyCall(SetCriterion)(num_classes=K, matcher=matcher, weight_dict=dict(WEIGHTS))
        }
        use_csla(model_cfg, cls_norm=norm)
        crit = instantiate(model_cfg["criterion"])
        assert crit.csla_cls_norm == norm
        loss = crit(outputs, targets)["loss_class_0"].item()
        assert loss == pytest.approx(1.875 * math.log(2.0) / denominator, rel=1e-6), norm
