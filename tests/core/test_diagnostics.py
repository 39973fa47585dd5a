"""Label instability and positive counts on hand-made per-stage matches."""

import torch

from stageinteractor.core.diagnostics import gt_to_query, label_instability, positive_counts


def test_gt_to_query():
    m = torch.tensor([[[-1, 1, 0, -1]], [[2, -1, -1, 0]]])  # (S=2, B=1, N=4), G=3
    assert gt_to_query(m, 3).tolist() == [[[2, 1, -1]], [[3, -1, 0]]]


def test_label_instability_hand_computed():
    # S = 3, B = 2, N = 4. Image 0 has gts {0, 1}, image 1 has gt {0} (+ one padded slot).
    matches = torch.tensor(
        [
            [[0, 1, -1, -1], [-1, 0, -1, -1]],  # s0: img0 g0->q0, g1->q1; img1 g0->q1
            [[0, -1, 1, -1], [-1, 0, -1, -1]],  # s1: g1 moves q1->q2; img1 unchanged
            [[-1, 0, 1, -1], [-1, -1, -1, 0]],  # s2: g0 moves q0->q1; img1 g0 q1->q3
        ]
    )
    gt_mask = torch.tensor([[True, True], [True, False]])
    inst = label_instability(matches, gt_mask)
    # pair (0,1): 3 gts, 1 changed; pair (1,2): 3 gts, 2 changed (g1 of img0 stays at q2)
    torch.testing.assert_close(inst, torch.tensor([1 / 3, 2 / 3]))


def test_label_instability_unmatched_counts_as_changed():
    # one gt; matched at s0 only (more objects than queries elsewhere), never matched at s2
    matches = torch.tensor([[[1]], [[-1]], [[-1]]])  # (S=3, B=1, N=1), G = 2
    gt_mask = torch.tensor([[True, True]])
    inst = label_instability(matches, gt_mask)
    # pair (0,1): gt1 matched at s0 only -> changed (1/1); pair (1,2): nothing considered -> 0
    assert inst.tolist() == [1.0, 0.0]


def test_label_instability_edge_shapes():
    assert (
        label_instability(
            torch.zeros(1, 2, 3, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)
        ).numel()
        == 0
    )
    out = label_instability(torch.full((3, 2, 3), -1), torch.zeros(2, 0, dtype=torch.bool))
    assert out.tolist() == [0.0, 0.0]


def test_positive_counts():
    matches = torch.tensor([[[0, 1, -1]], [[1, -1, 0]]])  # S=2, B=1, N=3
    gt_classes = torch.tensor([[0, 2]])
    targets = torch.zeros(2, 1, 3, 3)
    targets[0, 0, 0, 0] = 1  # own q0 kept
    # own q1 (class 2) dropped at stage 0; extra positive on q2 class 2
    targets[0, 0, 2, 2] = 1
    targets[1, 0, 0, 2] = targets[1, 0, 2, 0] = targets[1, 0, 2, 2] = 1  # own + own + extra
    c = positive_counts(matches, targets, gt_classes)
    assert c["hungarian"].tolist() == [2, 2]
    assert c["csla"].tolist() == [2, 3]
    assert c["extra"].tolist() == [1, 1]
    assert c["dropped"].tolist() == [1, 0]
