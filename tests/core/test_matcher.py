"""HungarianMatcher: cost values by hand, optimality against brute force, edge cases."""

import itertools
import math

import pytest
import torch

from stageinteractor.core.matcher import HungarianMatcher, focal_class_cost


def _rand_boxes(shape, scale=100.0, gen=None):
    xy = torch.rand(*shape, 2, generator=gen) * scale
    wh = torch.rand(*shape, 2, generator=gen) * scale * 0.5 + 1.0
    return torch.cat([xy, xy + wh], dim=-1)


def test_cost_values_by_hand():
    # One query, one gt, image (h, w) = (50, 100).
    logits = torch.zeros(1, 1, 3)
    logits[0, 0, 2] = math.log(0.3 / 0.7)  # p = 0.3 for class 2
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 10.0]]])
    gt = torch.tensor([[[10.0, 0.0, 30.0, 10.0]]])
    m = HungarianMatcher()
    cost = m.cost_matrix(logits, boxes, gt, torch.tensor([[2]]), torch.tensor([[50, 100]]))

    p = 0.3
    c_cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-12) - 0.75 * p**2 * -math.log(1 - p + 1e-12)
    # normalised by (W, H, W, H) = (100, 50, 100, 50): |0-0.1| + 0 + |0.2-0.3| + 0
    c_l1 = 0.1 + 0.1
    # inter 10x10 = 100, union 200 + 200 - 100 = 300, enclosing 30x10 = 300 -> GIoU = 1/3
    c_giou = -(1.0 / 3.0)
    expected = 2.0 * c_cls + 5.0 * c_l1 + 2.0 * c_giou
    assert cost.shape == (1, 1, 1)
    assert cost.item() == pytest.approx(expected, rel=1e-5)


def test_focal_class_cost_formula():
    p = torch.tensor([0.1, 0.5, 0.9])
    ref = [
        0.25 * (1 - x) ** 2 * -math.log(x + 1e-12) - 0.75 * x**2 * -math.log(1 - x + 1e-12)
        for x in p.tolist()
    ]
    torch.testing.assert_close(focal_class_cost(p), torch.tensor(ref), rtol=1e-5, atol=1e-7)


def _brute_force_min(cost):
    """Minimal total cost of a maximal one-to-one assignment of an (N, G) cost matrix."""
    n, g = cost.shape
    best = math.inf
    if g <= n:
        for rows in itertools.permutations(range(n), g):
            best = min(best, sum(cost[r, c] for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(g), n):
            best = min(best, sum(cost[r, c] for r, c in enumerate(cols)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    B, K = 3, 4
    N = int(torch.randint(1, 6, (1,), generator=gen))
    G = int(torch.randint(1, 5, (1,), generator=gen))
    logits = torch.randn(B, N, K, generator=gen) * 2
    boxes = _rand_boxes((B, N), gen=gen)
    gt_boxes = _rand_boxes((B, G), gen=gen)
    gt_classes = torch.randint(0, K, (B, G), generator=gen)
    gt_mask = torch.rand(B, G, generator=gen) > 0.3
    gt_mask[0] = True
    sizes = torch.tensor([[120, 150], [100, 100], [90, 130]])
    m = HungarianMatcher()
    matches = m(logits, boxes, gt_boxes, gt_classes, gt_mask, sizes)
    cost = m.cost_matrix(logits, boxes, gt_boxes, gt_classes, sizes).double()
    assert matches.shape == (B, N) and matches.dtype == torch.long
    for b in range(B):
        cols = gt_mask[b].nonzero().flatten().tolist()
        mb = matches[b]
        matched = mb[mb >= 0]
        # one-to-one, only real gts, as many pairs as possible
        assert len(set(matched.tolist())) == len(matched)
        assert set(matched.tolist()) <= set(cols)
        assert len(matched) == min(N, len(cols))
        if not cols:
            continue
        sub = cost[b][:, cols].numpy()
        got = sum(cost[b, q, g].item() for q, g in enumerate(mb.tolist()) if g >= 0)
        assert got == pytest.approx(_brute_force_min(sub), abs=1e-6)


def test_batched_equals_per_image():
    gen = torch.Generator().manual_seed(7)
    B, N, K, G = 3, 5, 3, 4
    logits = torch.randn(B, N, K, generator=gen)
    boxes = _rand_boxes((B, N), gen=gen)
    gt_boxes = _rand_boxes((B, G), gen=gen)
    gt_classes = torch.randint(0, K, (B, G), generator=gen)
    gt_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    sizes = torch.tensor([[100, 120], [80, 90], [100, 100]])
    m = HungarianMatcher()
    full = m(logits, boxes, gt_boxes, gt_classes, gt_mask, sizes)
    for b in range(B):
        one = m(
            logits[b : b + 1],
            boxes[b : b + 1],
            gt_boxes[b : b + 1],
            gt_classes[b : b + 1],
            gt_mask[b : b + 1],
            sizes[b : b + 1],
        )
        assert torch.equal(one[0], full[b])
    # non-contiguous mask: image 2 only uses gts 1 and 3
    assert set(full[2][full[2] >= 0].tolist()) == {1, 3}


def test_no_objects_and_empty_gt():
    B, N, K = 2, 4, 3
    logits = torch.randn(B, N, K)
    boxes = _rand_boxes((B, N))
    m = HungarianMatcher()
    sizes = torch.tensor([[100, 100], [100, 100]])
    out = m(
        logits,
        boxes,
        torch.zeros(B, 0, 4),
        torch.zeros(B, 0, dtype=torch.long),
        torch.zeros(B, 0, dtype=torch.bool),
        sizes,
    )
    assert out.shape == (B, N) and bool((out == -1).all())
    gt = _rand_boxes((B, 2))
    mask = torch.tensor([[True, True], [False, False]])
    out = m(logits, boxes, gt, torch.zeros(B, 2, dtype=torch.long), mask, sizes)
    assert bool((out[1] == -1).all())
    assert sorted(out[0][out[0] >= 0].tolist()) == [0, 1]


def test_more_objects_than_queries():
    # 2 queries, 3 gts: every query is matched, one gt stays unmatched; the cheapest gts win.
    logits = torch.zeros(1, 2, 1)
    gt = torch.tensor([[[0.0, 0, 10, 10], [50, 50, 60, 60], [80, 0, 90, 10]]])
    boxes = torch.tensor([[[50.0, 50, 60, 60], [0, 0, 10, 10]]])
    out = HungarianMatcher()(
        logits,
        boxes,
        gt,
        torch.zeros(1, 3, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.bool),
        torch.tensor([[100, 100]]),
    )
    assert out.tolist() == [[1, 0]]


def test_no_grad_and_nan_error():
    logits = torch.randn(1, 3, 2, requires_grad=True)
    boxes = _rand_boxes((1, 3)).requires_grad_()
    gt = _rand_boxes((1, 2))
    cls = torch.tensor([[0, 1]])
    sizes = torch.tensor([[100, 100]])
    m = HungarianMatcher()
    out = m(logits, boxes, gt, cls, torch.ones(1, 2, dtype=torch.bool), sizes)
    assert not out.requires_grad
    # NaN in a padded gt is ignored
    gt_nan = gt.clone()
    gt_nan[0, 1] = float("nan")
    out = m(logits, boxes, gt_nan, cls, torch.tensor([[True, False]]), sizes)
    assert out[0][out[0] >= 0].tolist() == [0]
    # NaN in a prediction is an error
    bad = boxes.detach().clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m(logits, bad, gt, cls, torch.ones(1, 2, dtype=torch.bool), sizes)


def test_class_out_of_range_is_an_error():
    gt = _rand_boxes((1, 2))
    args = (torch.randn(1, 3, 2), _rand_boxes((1, 3)), gt)
    with pytest.raises(ValueError, match="class"):
        HungarianMatcher()(
            *args,
            torch.tensor([[0, 2]]),
            torch.ones(1, 2, dtype=torch.bool),
            torch.tensor([[100, 100]]),
        )
    # padded entries may hold anything
    HungarianMatcher()(
        *args, torch.tensor([[0, 7]]), torch.tensor([[True, False]]), torch.tensor([[100, 100]])
    )


def test_cost_of_a_second_image_of_another_size_by_hand():
    """Each image's L1 cost is normalised by its own (W, H): image 1 (h, w) = (40, 200) next to
    image 0 (h, w) = (50, 100); both costs hand-computed (an image-0 scale for every image, or
    (H, W) swapped, changes image 1's cost)."""
    logits = torch.zeros(2, 1, 3)
    logits[0, 0, 2] = math.log(0.3 / 0.7)  # p = 0.3 for class 2
    logits[1, 0, 0] = math.log(0.8 / 0.2)  # p = 0.8 for class 0
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 10.0]], [[20.0, 4.0, 60.0, 24.0]]])
    gt = torch.tensor([[[10.0, 0.0, 30.0, 10.0]], [[40.0, 4.0, 80.0, 24.0]]])
    cost = HungarianMatcher().cost_matrix(
        logits, boxes, gt, torch.tensor([[2], [0]]), torch.tensor([[50, 100], [40, 200]])
    )

    def focal(p):
        return 0.25 * (1 - p) ** 2 * -math.log(p + 1e-12) - 0.75 * p**2 * -math.log(1 - p + 1e-12)

    # image 0 as in test_cost_values_by_hand: L1 0.2, GIoU 1/3
    want0 = 2.0 * focal(0.3) + 5.0 * 0.2 + 2.0 * -(1.0 / 3.0)
    # image 1: (W, H, W, H) = (200, 40, 200, 40): |20-40|/200 + 0 + |60-80|/200 + 0 = 0.2;
    # inter 20x20 = 400, union 800 + 800 - 400 = 1200, enclosing 60x20 = 1200 -> GIoU = 1/3
    want1 = 2.0 * focal(0.8) + 5.0 * 0.2 + 2.0 * -(1.0 / 3.0)
    assert cost.shape == (2, 1, 1)
    assert cost[0, 0, 0].item() == pytest.approx(want0, rel=1e-5)
    assert cost[1, 0, 0].item() == pytest.approx(want1, rel=1e-5)
    # a y offset in image 1 weighs 1/H = 1/40 per pixel: shift the prediction down by 4 px
    moved = boxes.clone()
    moved[1, 0, 1::2] += 4.0
    cost2 = HungarianMatcher(cost_class=0.0, cost_giou=0.0).cost_matrix(
        logits, moved, gt, torch.tensor([[2], [0]]), torch.tensor([[50, 100], [40, 200]])
    )
    assert cost2[1, 0, 0].item() == pytest.approx(5.0 * (0.2 + 2 * 4.0 / 40.0), rel=1e-5)
