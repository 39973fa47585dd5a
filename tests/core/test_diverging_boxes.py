"""A diverging training step gives finite boxes (issue 21 item 8).

When a step diverges (under AMP: float16 overflow in the heads), the box deltas become huge or
infinite. Unclamped, the refined boxes are infinite, the matching costs NaN, and the matcher
raises -- instead of the losses overflowing and the GradScaler skipping the step. In training
the refined xyzr is clamped to |x|, |y| <= 2^20 px, |z|, |r| <= 32, far beyond any real box.
"""
import pytest
import torch

from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.matcher import HungarianMatcher

KW = dict(num_classes=3, num_queries=6, num_stages=2, query_dim=16, num_heads=2, num_groups=2,
          ffn_dim=16, first_stage_points=32, num_points=4, out_points=4)


def _diverged_decoder(value):
    torch.manual_seed(0)
    d = StageInteractorDecoder(**KW)
    with torch.no_grad():
        for stage in d.stages:  # deltas of +-value for every query (float16's overflow: inf)
            stage.reg_delta.bias.copy_(torch.tensor([value, -value, value, -value]))
    return d


@pytest.mark.parametrize("value", [1e30, float("inf")], ids=["huge", "inf"])
def test_diverged_training_step_gives_finite_boxes_and_matches(value):
    d = _diverged_decoder(value)
    feats = [torch.randn(1, 16, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    sizes = torch.tensor([[60.0, 50.0]])
    outs = d(feats, sizes)  # training: grad enabled
    for o in outs:
        assert torch.isfinite(o["boxes"]).all() and torch.isfinite(o["xyzr"]).all()
        assert o["xyzr"][..., :2].abs().max() <= 2**20 and o["xyzr"][..., 2:].abs().max() <= 32
    gt = torch.tensor([[[5.0, 5.0, 20.0, 30.0]]])
    matches = HungarianMatcher()(outs[-1]["logits"], outs[-1]["boxes"], gt,
                                 torch.tensor([[1]]), torch.tensor([[True]]), sizes)
    assert (matches >= 0).sum() == 1
    # the loss stays differentiable: gradients reach the heads (finite or not is the scaler's job)
    sum(o["boxes"].sum() + o["logits"].sum() for o in outs).backward()
    assert d.stages[-1].cls_logits.weight.grad is not None


def test_normal_boxes_are_not_clamped():
    d = _diverged_decoder(0.1)
    feats = [torch.randn(1, 16, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    sizes = torch.tensor([[60.0, 50.0]])
    train = d(feats, sizes)
    with torch.no_grad():
        infer = d(feats, sizes)
    for a, b in zip(train, infer):
        torch.testing.assert_close(a["boxes"].detach(), b["boxes"], rtol=0, atol=0)
