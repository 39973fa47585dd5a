import math

import pytest
import torch

from stageinteractor.core import box_ops as B


def test_xyzr_decode_hand_values():
    # w = 2^(z - r/2) = 2^(3 - 1) = 4, h = 2^(3 + 1) = 16
    xyzr = torch.tensor([10.0, 20.0, 3.0, 2.0])
    assert torch.allclose(B.xyzr_to_xyxy(xyzr), torch.tensor([8.0, 12.0, 12.0, 28.0]))
    assert torch.allclose(B.xyzr_to_cxcywh(xyzr), torch.tensor([10.0, 20.0, 4.0, 16.0]))


def test_xyxy_to_xyzr_hand_values():
    # full image W=800, H=600 -> x=400, y=300, z=log2 sqrt(480000), r=log2(600/800)
    xyzr = B.xyxy_to_xyzr(torch.tensor([[0.0, 0.0, 800.0, 600.0]]))
    exp = torch.tensor([[400.0, 300.0, math.log2(math.sqrt(800 * 600)), math.log2(0.75)]])
    assert torch.allclose(xyzr, exp, atol=1e-5)


def test_round_trips_broadcast():
    g = torch.Generator().manual_seed(0)
    xyzr = torch.randn(3, 5, 7, 4, generator=g) * torch.tensor([100.0, 100.0, 2.0, 1.0])
    xyzr[..., 2] += 5
    assert torch.allclose(B.xyxy_to_xyzr(B.xyzr_to_xyxy(xyzr)), xyzr, atol=1e-4)
    xyxy = B.xyzr_to_xyxy(xyzr)
    assert torch.allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-4)
    assert B.xyzr_to_xyxy(xyzr).shape == (3, 5, 7, 4)


def test_refine_modes_hand_values():
    xyzr = torch.tensor([10.0, 20.0, 3.0, 2.0])  # w=4, h=16, 2^z=8
    delta = torch.tensor([0.5, 0.25, 1.0, -1.0])
    assert torch.allclose(B.refine_xyzr(xyzr, delta, mode="wh"), torch.tensor([12.0, 24.0, 4.0, 1.0]))
    assert torch.allclose(B.refine_xyzr(xyzr, delta, mode="2z"), torch.tensor([14.0, 22.0, 4.0, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        B.refine_xyzr(xyzr, delta, mode="bad")


def test_refine_zero_delta_identity_and_grad():
    xyzr = torch.tensor([[1.0, 2.0, 3.0, 0.5]], requires_grad=True)
    delta = torch.zeros(1, 4, requires_grad=True)
    out = B.refine_xyzr(xyzr, delta)
    assert torch.equal(out, xyzr.detach())
    out.sum().backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


def test_pairwise_iou_giou_iof_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])           # area 4
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],            # inter 1, union 7, C = 9
                      [4.0, 4.0, 5.0, 5.0],            # disjoint, union 5, C = 25
                      [0.0, 0.0, 1.0, 1.0]])           # inside a: inter 1, union 4, C 4
    iou = B.pairwise_iou(a, b)
    assert iou.shape == (1, 3)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1 / 4]]))
    giou = B.pairwise_giou(a, b)
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0 - 20 / 25, 1 / 4]]))
    iof = B.pairwise_iof(a, b)
    assert torch.allclose(iof, torch.tensor([[1 / 4, 0.0, 1 / 4]]))
    iof_ba = B.pairwise_iof(b, a)
    assert torch.allclose(iof_ba, torch.tensor([[1 / 4], [0.0], [1.0]]))


def test_pairwise_batched_matches_elementwise():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 6, 2, generator=g) * 50
    wh = torch.rand(2, 6, 2, generator=g) * 30 + 1
    a = torch.cat([xy, xy + wh], -1)
    xy = torch.rand(2, 4, 2, generator=g) * 50
    wh = torch.rand(2, 4, 2, generator=g) * 30 + 1
    b = torch.cat([xy, xy + wh], -1)
    piou = B.pairwise_iou(a, b)
    pgiou = B.pairwise_giou(a, b)
    assert piou.shape == (2, 6, 4)
    ea = a[:, :, None, :].expand(2, 6, 4, 4)
    eb = b[:, None, :, :].expand(2, 6, 4, 4)
    assert torch.allclose(B.elementwise_iou(ea, eb), piou, atol=1e-6)
    assert torch.allclose(B.elementwise_giou(ea, eb), pgiou, atol=1e-6)
    assert torch.allclose(B.elementwise_iou(a, a), torch.ones(2, 6))
    assert (pgiou <= piou + 1e-6).all() and (pgiou >= -1).all()


def test_degenerate_boxes_finite():
    z = torch.zeros(1, 4, requires_grad=True)
    out = B.pairwise_iou(z, z) + B.pairwise_giou(z, z) + B.pairwise_iof(z, z)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert torch.isfinite(B.xyxy_to_xyzr(torch.zeros(4))).all()
    assert B.box_area(torch.tensor([3.0, 3.0, 1.0, 1.0])) == 0
