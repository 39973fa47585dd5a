"""CrossStageLabelAssigner on hand-made cases and against a brute-force loop over the spec."""

import pytest
import torch

from stageinteractor.core.box_ops import elementwise_iou
from stageinteractor.core.csla import TABLE13_SCOPES, CrossStageLabelAssigner

GT = [10.0, 10.0, 30.0, 20.0]  # 20 x 10, area 200
FAR = [80.0, 80.0, 90.0, 90.0]  # IoU 0 with GT
HALF = [10.0, 10.0, 20.0, 20.0]  # left half of GT: IoU exactly 100 / 200 = 0.5
BELOW = [10.0, 10.0, 19.0, 20.0]  # IoU 0.45


def _run(assigner, matches, boxes, gt_boxes, gt_classes, gt_mask=None):
    matches = torch.tensor(matches, dtype=torch.long)
    boxes = torch.tensor(boxes, dtype=torch.float32)
    gt_boxes = torch.tensor(gt_boxes, dtype=torch.float32)
    gt_classes = torch.tensor(gt_classes, dtype=torch.long)
    if gt_mask is None:
        gt_mask = torch.ones(gt_classes.shape, dtype=torch.bool)
    else:
        gt_mask = torch.tensor(gt_mask, dtype=torch.bool)
    return assigner(matches, boxes, gt_boxes, gt_classes, gt_mask)


def test_exact_half_iou_is_inclusive():
    a = torch.tensor(HALF)
    assert elementwise_iou(a, torch.tensor(GT)).item() == 0.5
    csla = CrossStageLabelAssigner(num_classes=3)
    # 1 stage, 1 image, 3 queries: q0 HALF (IoU 0.5), q1 BELOW (0.45), q2 unmatched.
    t = _run(csla, [[[0, 1, -1]]], [[[HALF, BELOW, GT]]], [[GT, GT]], [[2, 1]])
    assert t.shape == (1, 1, 3, 3)
    assert t[0, 0].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_own_match_below_threshold_loses_label():
    csla = CrossStageLabelAssigner(num_classes=2)
    t = _run(csla, [[[0]]], [[[BELOW]]], [[GT]], [[1]])
    assert t.sum() == 0
    # without the "Score" component the own positive keeps its label
    t = _run(
        CrossStageLabelAssigner(num_classes=2, use_score=False), [[[0]]], [[[BELOW]]], [[GT]], [[1]]
    )
    assert t[0, 0, 0].tolist() == [0, 1]


def test_extra_positive_from_other_stage():
    # 2 stages, 2 queries. Stage 0 matches q0 -> g0, stage 1 matches q1 -> g0.
    # All boxes cover GT, so each stage gets both queries positive for class 1.
    csla = CrossStageLabelAssigner(num_classes=2)
    boxes = [[[GT, GT]], [[GT, GT]]]
    t = _run(csla, [[[0, -1]], [[-1, 0]]], boxes, [[GT]], [[1]])
    assert t[:, 0, :, 1].tolist() == [[1, 1], [1, 1]]
    # IoU uses stage i's own box: at stage 1, q0's box is FAR -> no extra positive there.
    boxes = [[[GT, GT]], [[FAR, GT]]]
    t = _run(csla, [[[0, -1]], [[-1, 0]]], boxes, [[GT]], [[1]])
    assert t[:, 0, :, 1].tolist() == [[1, 1], [0, 1]]
    # extra positive below threshold is not added
    boxes = [[[GT, GT]], [[BELOW, GT]]]
    t = _run(csla, [[[0, -1]], [[-1, 0]]], boxes, [[GT]], [[1]])
    assert t[1, 0, :, 1].tolist() == [0, 1]


def test_two_classes_on_one_query():
    # q0 is matched to g0 (class 0) at stage 0 and to g1 (class 2) at stage 1; both gts overlap it.
    gts = [[GT, [10.0, 10.0, 30.0, 21.0]]]
    csla = CrossStageLabelAssigner(num_classes=3)
    t = _run(csla, [[[0, -1]], [[1, -1]]], [[[GT, FAR]], [[GT, FAR]]], gts, [[0, 2]])
    assert t[0, 0, 0].tolist() == [1, 0, 1]
    assert t[1, 0, 0].tolist() == [1, 0, 1]
    assert t[:, 0, 1].sum() == 0


def _window_case(scope, S=4):
    """Stage j matches query j to the single gt; every box equals the gt (IoU 1).
    Returns the (S, S) matrix target[i, q=j]."""
    csla = CrossStageLabelAssigner(num_classes=1, scope=scope)
    matches = [[[0 if q == j else -1 for q in range(S)]] for j in range(S)]
    boxes = [[[GT] * S] for _ in range(S)]
    t = _run(csla, matches, boxes, [[GT]], [[0]])
    return t[:, 0, :, 0].long().tolist()


@pytest.mark.parametrize(
    "row, expected",
    [
        ("[i,i]", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        ("[i-1,i]", [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
        ("[i-1,i+1]", [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]),
        ("[i-1,L]", [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]),
        ("[1,L]", [[1, 1, 1, 1]] * 4),
    ],
)
def test_table13_scopes(row, expected):
    assert _window_case(TABLE13_SCOPES[row]) == expected


def test_scope_clipped_and_out_of_scope_ignored():
    # wide scope is clipped at both ends without error
    assert _window_case((-10, 10), S=3) == [[1, 1, 1]] * 3
    # (-1, None) at stage 2 of 3 ignores stage 0 (out of scope)
    assert _window_case((-1, None), S=3)[2] == [0, 1, 1]
    # matches at stage i's own index always included, even with cross_stage off
    csla = CrossStageLabelAssigner(num_classes=1, cross_stage=False)
    assert csla.scope_mask(3).long().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_stages_switch_gives_one_hot_elsewhere():
    # stages=(0,): stage 1 gets plain one-hot of its own matches (no threshold, no cross).
    csla = CrossStageLabelAssigner(num_classes=2, stages=(0,))
    matches = [[[0, -1]], [[-1, 0]]]
    boxes = [[[GT, GT]], [[GT, BELOW]]]
    t = _run(csla, matches, boxes, [[GT]], [[1]])
    assert t[0, 0, :, 1].tolist() == [1, 1]  # CSLA: q1 extra positive from stage 1
    assert t[1, 0, :, 1].tolist() == [0, 1]  # one-hot, own q1 kept although IoU 0.45
    # negative indices count from the end
    assert CrossStageLabelAssigner(num_classes=1, stages=(-1,)).csla_stages(3).tolist() == [
        False,
        False,
        True,
    ]


def test_disabled_gives_one_hot_of_own_matches():
    csla = CrossStageLabelAssigner(num_classes=3, enabled=False)
    matches = [[[0, -1, 1]], [[-1, 1, 0]]]
    boxes = [[[BELOW, GT, FAR]], [[GT, FAR, GT]]]
    t = _run(csla, matches, boxes, [[GT, GT]], [[2, 0]])
    expected = torch.zeros(2, 1, 3, 3)
    expected[0, 0, 0, 2] = expected[0, 0, 2, 0] = 1
    expected[1, 0, 1, 0] = expected[1, 0, 2, 2] = 1
    assert torch.equal(t, expected)


def test_no_objects_and_padding():
    csla = CrossStageLabelAssigner(num_classes=2)
    t = csla(
        torch.full((2, 3, 4), -1),
        torch.zeros(2, 3, 4, 4),
        torch.zeros(3, 0, 4),
        torch.zeros(3, 0, dtype=torch.long),
        torch.zeros(3, 0, dtype=torch.bool),
    )
    assert t.shape == (2, 3, 4, 2) and t.sum() == 0
    # image 1 has no objects (its slot is padding); a stray match to padding is ignored
    t = _run(
        csla, [[[0], [0]]], [[[GT], [GT]]], [[GT], [GT]], [[1], [1]], gt_mask=[[True], [False]]
    )
    assert t[0, :, 0, 1].tolist() == [1, 0]


def test_more_objects_than_queries():
    # 2 queries, 3 gts; only gts 0 and 2 are matched.
    g = [GT, FAR, [40.0, 40.0, 50.0, 50.0]]
    csla = CrossStageLabelAssigner(num_classes=3)
    t = _run(csla, [[[2, 0]]], [[[g[2], GT]]], [g], [[0, 1, 2]])
    assert t[0, 0].tolist() == [[0, 0, 1], [1, 0, 0]]


def _reference(matches, boxes, gt_boxes, gt_classes, gt_mask, K, scope, thr):
    """Direct loop over the spec §4.4 pseudo-code."""
    S, B, N = matches.shape
    lo, hi = scope
    out = torch.zeros(S, B, N, K)
    for i in range(S):
        js = [
            j for j in range(S) if (lo is None or j >= i + lo) and (hi is None or j <= i + hi)
        ] + [i]
        for j in set(js):
            for b in range(B):
                for q in range(N):
                    g = int(matches[j, b, q])
                    if g < 0 or not gt_mask[b, g]:
                        continue
                    u = elementwise_iou(boxes[i, b, q], gt_boxes[b, g]).item()
                    if u >= thr:
                        out[i, b, q, gt_classes[b, g]] = 1
    return out


@pytest.mark.parametrize("scope", [(-1, None), (0, 0), (None, None), (-1, 1)])
def test_matches_brute_force_reference(scope):
    gen = torch.Generator().manual_seed(3)
    S, B, N, G, K = 4, 2, 6, 3, 3
    gt_xy = torch.rand(B, G, 2, generator=gen) * 20
    gt_boxes = torch.cat([gt_xy, gt_xy + 10], -1)
    gt_classes = torch.randint(0, K, (B, G), generator=gen)
    gt_mask = torch.tensor([[True, True, True], [True, True, False]])
    # predicted boxes are jittered copies of random gts so that IoUs spread around 0.5
    src = torch.randint(0, G, (S, B, N), generator=gen)
    boxes = gt_boxes[torch.arange(B)[None, :, None], src]
    boxes = boxes + torch.randn(S, B, N, 4, generator=gen) * 2.0
    matches = torch.full((S, B, N), -1)
    for s in range(S):
        for b in range(B):
            perm = torch.randperm(N, generator=gen)
            n_g = int(gt_mask[b].sum())
            matches[s, b, perm[:n_g]] = torch.arange(n_g)
    csla = CrossStageLabelAssigner(num_classes=K, scope=scope)
    got = csla(matches, boxes, gt_boxes, gt_classes, gt_mask)
    ref = _reference(matches, boxes, gt_boxes, gt_classes, gt_mask, K, scope, 0.5)
    assert torch.equal(got, ref)
    assert ref.sum() > 0


def test_no_grad():
    boxes = torch.tensor([[[GT]]], requires_grad=True)
    csla = CrossStageLabelAssigner(num_classes=1)
    t = csla(
        torch.zeros(1, 1, 1, dtype=torch.long),
        boxes,
        torch.tensor([[GT]]),
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, 1, dtype=torch.bool),
    )
    assert not t.requires_grad and t.item() == 1.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"enabled": 1}, "enabled"),
        ({"use_score": "yes"}, "use_score"),
        ({"cross_stage": None}, "cross_stage"),
        ({"scope": (1, None)}, "scope"),
        ({"scope": (-1, -2)}, "scope"),
        ({"scope": (-1,)}, "scope"),
        ({"iou_threshold": 1.5}, "iou_threshold"),
        ({"stages": (0, "1")}, "stages"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_switch_validation(kwargs, name):
    args = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        CrossStageLabelAssigner(**args)


def test_scope_and_stages_accept_any_sequence():
    """LazyConfig passes OmegaConf ListConfigs; any 2-sequence must work as a scope."""
    from collections.abc import Sequence

    class Seq(Sequence):
        def __init__(self, *items):
            self.items = list(items)

        def __getitem__(self, i):
            return self.items[i]

        def __len__(self):
            return len(self.items)

    a = CrossStageLabelAssigner(num_classes=2, scope=Seq(-1, None), stages=Seq(0, 1))
    assert a.scope == (-1, None) and a.stages == (0, 1)
    assert CrossStageLabelAssigner(num_classes=2, scope=[0, 0]).scope == (0, 0)
    with pytest.raises(ValueError, match="stages"):
        CrossStageLabelAssigner(num_classes=2, stages=3)
    with pytest.raises(ValueError, match="scope"):
        CrossStageLabelAssigner(num_classes=2, scope="ab")
