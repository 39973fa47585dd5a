"""A tiny decoder trained with the full criterion (Hungarian + CSLA + focal/L1/GIoU) overfits a
fixed batch: the total loss falls by at least 10x, with filter reuse on and off."""

import pytest
import torch

from stageinteractor.core.criterion import StageInteractorCriterion
from stageinteractor.core.csla import CrossStageLabelAssigner
from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.matcher import HungarianMatcher

K = 3
STEPS = 120


def _batch():
    gen = torch.Generator().manual_seed(123)
    feats = [torch.randn(2, 64, 64 // s, 64 // s, generator=gen) for s in (4, 8, 16, 32)]
    sizes = torch.tensor([[64, 64], [56, 60]])
    gt_boxes = torch.tensor(
        [[[4.0, 6, 30, 40], [34, 20, 60, 50]], [[10.0, 10, 40, 30], [0, 0, 0, 0]]]
    )
    gt_classes = torch.tensor([[0, 2], [1, 0]])
    gt_mask = torch.tensor([[True, True], [True, False]])
    return feats, sizes, gt_boxes, gt_classes, gt_mask


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_tiny_decoder_overfits_fixed_batch(reuse, one_thread):
    torch.manual_seed(0)
    decoder = StageInteractorDecoder(
        num_classes=K,
        num_queries=8,
        num_stages=3,
        query_dim=64,
        num_heads=4,
        num_groups=2,
        ffn_dim=64,
        first_stage_points=32,
        num_points=16,
        out_points=16,
        reuse=reuse,
    )
    criterion = StageInteractorCriterion(
        num_classes=K,
        matcher=HungarianMatcher(),
        assigner=CrossStageLabelAssigner(num_classes=K),
    )
    feats, sizes, gt_boxes, gt_classes, gt_mask = _batch()
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(STEPS * 0.7)], 0.1)

    def total_loss():
        losses = criterion(decoder(feats, sizes), gt_boxes, gt_classes, gt_mask, sizes)
        assert all(torch.isfinite(v) for v in losses.values())
        return sum(losses.values()), losses

    first = None
    for _ in range(STEPS):
        loss, _ = total_loss()
        if first is None:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final, losses = total_loss()
    assert final.item() * 10 <= first, f"loss {first:.3f} -> {final.item():.3f}"
    # every real object is matched at every stage and the last stage classifies them
    assert criterion.last_stats["num_pos_s2"] == 3.0
    assert criterion.last_stats["num_csla_pos_s2"] >= 3.0
    assert losses["loss_giou_s2"].item() < 0.5
