"""StageInteractorCriterion: hand-computed losses, normalisers, empty batches, diagnostics and
component parity with the official-code fixture (skipped when the fixture is absent)."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import stageinteractor.core.criterion as criterion_mod
from stageinteractor.core.csla import CrossStageLabelAssigner
from stageinteractor.core.criterion import StageInteractorCriterion
from stageinteractor.core.matcher import HungarianMatcher

GT = [10.0, 10.0, 30.0, 20.0]
BELOW = [10.0, 10.0, 19.0, 20.0]  # IoU 0.45 with GT


class StubMatcher(nn.Module):
    """Returns preset matches: ``per_stage`` is a list of S (B, N) tensors. The criterion solves
    all stages as one batch of S*B images, so one call returns their concatenation."""

    def __init__(self, per_stage):
        super().__init__()
        self.per_stage = [torch.as_tensor(m, dtype=torch.long) for m in per_stage]
        self.calls = 0
        self.saw_grad = False

    def forward(self, logits, boxes, gt_boxes, gt_classes, gt_mask, image_sizes):
        self.saw_grad |= logits.requires_grad or boxes.requires_grad
        self.calls += 1
        out = torch.cat(self.per_stage)
        assert out.shape == logits.shape[:2]
        return out


def _criterion(matcher=None, K=2, **assigner_kw):
    return StageInteractorCriterion(
        num_classes=K,
        matcher=matcher if matcher is not None else HungarianMatcher(),
        assigner=CrossStageLabelAssigner(num_classes=K, **assigner_kw),
    )


def _focal(x, t):
    p = 1 / (1 + math.exp(-x))
    if t == 1:
        return -0.25 * (1 - p) ** 2 * math.log(p)
    return -0.75 * p**2 * math.log(1 - p)


def test_hand_computed_single_stage():
    # 1 stage, 1 image (h, w) = (40, 50), 2 queries, K = 2, one gt of class 1.
    logits = torch.tensor([[[0.5, 1.0], [-1.0, 0.2]]], requires_grad=True)
    boxes = torch.tensor([[GT, [0.0, 0.0, 5.0, 5.0]]])
    boxes[0, 0, 0] = 12.0  # q0 = (12, 10, 30, 20): IoU 0.9 with GT
    boxes.requires_grad_()
    crit = _criterion(StubMatcher([[[0, -1]]]))
    out = crit(
        [{"logits": logits, "boxes": boxes}],
        torch.tensor([[GT]]),
        torch.tensor([[1]]),
        torch.tensor([[True]]),
        torch.tensor([[40, 50]]),
    )
    # targets: q0 class 1 positive; n_cls = max(1, 1) = 1, n_box = 1
    cls = _focal(0.5, 0) + _focal(1.0, 1) + _focal(-1.0, 0) + _focal(0.2, 0)
    l1 = 2.0 / 50.0  # only x1 differs by 2 px, normalised by W = 50
    giou = 1 - 180.0 / 200.0  # inter 180, union 200, enclosing 200
    assert out["loss_cls_s0"].item() == pytest.approx(2.0 * cls, rel=1e-5)
    assert out["loss_bbox_s0"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    assert out["loss_giou_s0"].item() == pytest.approx(2.0 * giou, rel=1e-5)
    assert not crit.matcher.saw_grad  # matcher sees detached outputs
    sum(out.values()).backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad[0, 0].abs().sum() > 0
    assert boxes.grad[0, 1].abs().sum() == 0


def test_own_positive_below_threshold_is_regressed_not_classified():
    logits = torch.zeros(1, 1, 2)
    boxes = torch.tensor([[BELOW]])
    crit = _criterion(StubMatcher([[[0]]]))
    out = crit(
        [{"logits": logits, "boxes": boxes}],
        torch.tensor([[GT]]),
        torch.tensor([[1]]),
        torch.tensor([[True]]),
        torch.tensor([[100, 100]]),
    )
    assert crit.last_targets.sum() == 0
    # n_cls = max(0, N_pos = 1) = 1: two negatives at p = 0.5
    assert out["loss_cls_s0"].item() == pytest.approx(2.0 * 2 * _focal(0.0, 0), rel=1e-5)
    assert out["loss_bbox_s0"].item() == pytest.approx(5.0 * 11.0 / 100.0, rel=1e-5)
    assert out["loss_giou_s0"].item() > 0
    assert crit.last_stats["num_dropped_pos_s0"] == 1.0


def test_normaliser_is_max_of_ones_and_positives():
    # 2 stages, both boxes of both queries on the gt: stage 0 target has 2 ones, N_pos = 1.
    S_boxes = torch.tensor([[GT, GT]])
    outs = [{"logits": torch.zeros(1, 2, 2), "boxes": S_boxes} for _ in range(2)]
    crit = _criterion(StubMatcher([[[0, -1]], [[-1, 0]]]))
    crit(
        outs,
        torch.tensor([[GT]]),
        torch.tensor([[0]]),
        torch.tensor([[True]]),
        torch.tensor([[100, 100]]),
    )
    assert crit.last_normalizers.tolist() == [[2.0, 1.0], [2.0, 1.0]]
    assert crit.last_stats["num_extra_pos_s0"] == 1.0
    assert crit.last_stats["label_instability_s0_s1"] == 1.0


def test_no_objects_batch_is_finite_and_connected():
    torch.manual_seed(0)
    B, N, K = 2, 3, 2
    outs = [
        {
            "logits": torch.randn(B, N, K, requires_grad=True),
            "boxes": (torch.rand(B, N, 4) * 10 + torch.tensor([0, 0, 20, 20])).requires_grad_(),
        }
        for _ in range(2)
    ]
    crit = _criterion(K=K)
    for G in (0, 2):
        losses = crit(
            outs,
            torch.zeros(B, G, 4),
            torch.zeros(B, G, dtype=torch.long),
            torch.zeros(B, G, dtype=torch.bool),
            torch.tensor([[50, 50], [60, 40]]),
        )
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_bbox_s1"].item() == 0.0 and losses["loss_giou_s0"].item() == 0.0
        assert all(v.requires_grad for v in losses.values())
        assert crit.last_normalizers.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # clamped >= 1
        total = sum(losses.values())
        grads = torch.autograd.grad(total, [outs[0]["boxes"], outs[0]["logits"]])
        assert torch.equal(grads[0], torch.zeros_like(grads[0]))
        assert torch.isfinite(grads[1]).all()


def test_keys_stats_and_stage_weights():
    torch.manual_seed(1)
    B, N, K, G, S = 2, 5, 3, 2, 3
    gt = torch.tensor([[[0.0, 0, 20, 20], [30, 30, 60, 50]]] * B)
    outs = [
        {"logits": torch.randn(B, N, K), "boxes": gt[:, [0, 1, 0, 1, 0]] + torch.randn(B, N, 4)}
        for _ in range(S)
    ]
    crit = _criterion(K=K)
    losses = crit(
        outs,
        gt,
        torch.tensor([[0, 2], [1, 1]]),
        torch.ones(B, G, dtype=torch.bool),
        torch.tensor([[64, 64], [64, 64]]),
    )
    assert sorted(losses) == sorted(
        f"loss_{n}_s{s}" for n in ("cls", "bbox", "giou") for s in range(S)
    )
    assert crit.last_matches.shape == (S, B, N) and crit.last_targets.shape == (S, B, N, K)
    assert all(isinstance(v, float) for v in crit.last_stats.values())
    assert crit.last_stats["num_pos_s0"] == 4.0
    assert set(k for k in crit.last_stats if k.startswith("label_instability")) == {
        "label_instability_s0_s1",
        "label_instability_s1_s2",
    }
    crit.stage_weights = [0.0, 1.0, 2.0]
    w = crit(
        outs,
        gt,
        torch.tensor([[0, 2], [1, 1]]),
        torch.ones(B, G, dtype=torch.bool),
        torch.tensor([[64, 64], [64, 64]]),
    )
    assert w["loss_cls_s0"].item() == 0.0
    assert w["loss_giou_s2"].item() == pytest.approx(2 * losses["loss_giou_s2"].item(), rel=1e-6)


def test_normalisers_averaged_across_processes(monkeypatch):
    # Simulate a 2-process run in which the other process has no objects at all.
    monkeypatch.setattr(criterion_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_mod.dist, "all_reduce", lambda x: None)  # other rank adds 0
    outs = [{"logits": torch.zeros(1, 2, 2), "boxes": torch.tensor([[GT, GT]])}]
    crit = _criterion(StubMatcher([[[0, 1]]]))
    crit(
        outs,
        torch.tensor([[GT, GT]]),
        torch.tensor([[0, 1]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[100, 100]]),
    )
    # local n_cls = n_box = 2 -> mean over 2 processes = 1
    assert crit.last_normalizers.tolist() == [[1.0, 1.0]]


def _fixture_path():
    from stageinteractor.official.fixture import find_parity_fixture

    found = find_parity_fixture()
    return (found / "expected.pt") if found is not None else Path("/nonexistent/expected.pt")


@pytest.mark.skipif(not _fixture_path().exists(), reason="official parity fixture not available")
def test_component_parity_with_official_fixture():
    """Matcher costs/matches, CSLA multi-hot, normalisers and losses from the recorded official
    stage outputs (the decoder itself is not involved)."""
    d = torch.load(_fixture_path(), weights_only=True)
    S, B, G = 6, 2, 3
    gt_boxes = torch.zeros(B, G, 4)
    gt_classes = torch.zeros(B, G, dtype=torch.long)
    gt_mask = torch.zeros(B, G, dtype=torch.bool)
    for b in range(B):
        n = d[f"inputs/gt_bboxes/{b}"].shape[0]
        gt_boxes[b, :n] = d[f"inputs/gt_bboxes/{b}"]
        gt_classes[b, :n] = d[f"inputs/gt_labels/{b}"]
        gt_mask[b, :n] = True
    sizes = d["meta/img_shapes"]
    outs = [
        {"logits": d[f"eval/stage{s}/cls_score"], "boxes": d[f"eval/stage{s}/boxes"]}
        for s in range(S)
    ]
    matcher = HungarianMatcher()
    for s in range(S):
        cost = matcher.cost_matrix(outs[s]["logits"], outs[s]["boxes"], gt_boxes, gt_classes, sizes)
        for b in range(B):
            ref = d[f"train/stage{s}/match_cost/{b}"]
            torch.testing.assert_close(cost[b, :, : ref.shape[1]], ref, rtol=1e-5, atol=1e-4)
    crit = StageInteractorCriterion(
        num_classes=80, matcher=matcher, assigner=CrossStageLabelAssigner(num_classes=80)
    )
    losses = crit(outs, gt_boxes, gt_classes, gt_mask, sizes)
    for s in range(S):
        assert torch.equal(crit.last_matches[s], d[f"train/stage{s}/match"])
        assert torch.equal(crit.last_targets[s].to(torch.uint8), d[f"train/stage{s}/csla_multihot"])
        assert crit.last_normalizers[s].tolist() == [
            d[f"train/stage{s}/csla_avg_factor_cls"],
            d[f"train/stage{s}/csla_avg_factor_reg"],
        ]
        for ours, theirs in (("cls", "cls"), ("bbox", "bbox"), ("giou", "iou")):
            ref = d[f"train/loss/stage{s}_loss_{theirs}"]
            assert losses[f"loss_{ours}_s{s}"].item() == pytest.approx(ref, rel=1e-4)
    assert sum(crit.last_stats[f"num_dropped_pos_s{s}"] for s in range(S)) == 17.0
