"""Elementwise focal / L1 / GIoU losses against hand-computed numbers."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from stageinteractor.core.losses import giou_loss, l1_loss, sigmoid_focal_loss


def test_focal_hand_values():
    x = torch.tensor([0.0, 0.0, math.log(3.0), 0.0, 1.0])  # p = 0.5, 0.5, 0.75, 0.5, .
    t = torch.tensor([1.0, 0.0, 1.0, 0.5, -1.0])
    out = sigmoid_focal_loss(x, t)
    log2 = math.log(2.0)
    expected = [
        0.25 * 0.5**2 * log2,  # positive, p = 0.5
        0.75 * 0.5**2 * log2,  # negative, p = 0.5
        0.25 * 0.25**2 * -math.log(0.75),  # positive, p = 0.75
        0.0,  # soft target equal to p -> |T - p|^gamma = 0
        0.0,  # ignored entry
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-8)


def test_focal_soft_target():
    x = torch.tensor([0.0])
    t = torch.tensor([0.8])
    # alpha |0.8 - 0.5|^2 * BCE(0, 0.8) with BCE(0, T) = log 2
    expected = 0.25 * 0.3**2 * math.log(2.0)
    assert sigmoid_focal_loss(x, t).item() == pytest.approx(expected, rel=1e-6)


def test_focal_equals_standard_for_binary_targets():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 5, generator=gen) * 3
    t = (torch.rand(4, 7, 5, generator=gen) > 0.7).float()
    torch.testing.assert_close(
        sigmoid_focal_loss(x, t),
        tv_focal(x, t, alpha=0.25, gamma=2.0, reduction="none"),
        rtol=1e-5,
        atol=1e-7,
    )


def test_focal_grad_finite_for_extreme_logits():
    x = torch.tensor([-50.0, 50.0, -50.0, 50.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = sigmoid_focal_loss(x, t).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_l1_hand_value():
    pred = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    tgt = torch.tensor([[0.0, 20.0, 40.0, 30.0]])
    scale = torch.tensor([100.0, 50.0, 100.0, 50.0])
    # 10/100 + 0 + 10/100 + 10/50
    assert l1_loss(pred, tgt, scale).tolist() == pytest.approx([0.4])


def test_giou_hand_value():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0, 3, 1]])
    # pair 0: inter 1, union 7, enclosing 9; pair 1: identical; pair 2: disjoint, C = 3, U = 2
    expected = [1 - (1 / 7 - 2 / 9), 0.0, 1 - (0 - 1 / 3)]
    torch.testing.assert_close(giou_loss(a, b), torch.tensor(expected), rtol=1e-5, atol=1e-6)
