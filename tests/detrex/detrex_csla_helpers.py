"""Shared builders for the detrex-layer tests: random outputs, targets, counting matcher."""

import contextlib
from typing import Dict, List

import torch
import torch.nn as nn


def rand_stage(
    batch: int, queries: int, classes: int, gen: torch.Generator
) -> Dict[str, torch.Tensor]:
    """One stage: logits (B, Q, K) and cxcywh boxes in (0, 1) with w, h in [0.05, 0.45]."""
    logits = torch.randn(batch, queries, classes, generator=gen, requires_grad=True)
    centre = 0.25 + 0.5 * torch.rand(batch, queries, 2, generator=gen)
    size = 0.05 + 0.4 * torch.rand(batch, queries, 2, generator=gen)
    boxes = torch.cat([centre, size], -1).requires_grad_(True)
    return {"pred_logits": logits, "pred_boxes": boxes}


def rand_decoder(batch, queries, classes, stages, gen) -> Dict:
    """Top-level dict = last stage, plus ``aux_outputs`` for stages 0..S-2."""
    outs = [rand_stage(batch, queries, classes, gen) for _ in range(stages)]
    top = dict(outs[-1])
    top["aux_outputs"] = outs[:-1]
    return top


def rand_targets(num_gts: List[int], classes: int, gen: torch.Generator) -> List[Dict]:
    targets = []
    for n in num_gts:
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=gen)
        size = 0.05 + 0.4 * torch.rand(n, 2, generator=gen)
        targets.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=gen),
                "boxes": torch.cat([centre, size], -1),
            }
        )
    return targets


class CountingMatcher(nn.Module):
    """Wraps a matcher and counts its calls (and which logits it saw)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.seen = []

    def forward(self, outputs, targets):
        self.calls += 1
        self.seen.append(outputs["pred_logits"])
        return self.inner(outputs, targets)

    def __repr__(self, _repr_indent=4):
        return "CountingMatcher"


def hungarian():
    from detrex.modeling.matcher import HungarianMatcher

    return HungarianMatcher(
        cost_class=2.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        cost_class_type="focal_loss_cost",
        alpha=0.25,
        gamma=2.0,
    )


@contextlib.contextmanager
def cuda_calls_are_noops():
    """Let detrex's ``.cuda()``-hard-coding code run on CPU tensors (for the parent side of
    parity tests only): ``Tensor.cuda()`` and ``Tensor.to("cuda")`` return the tensor itself."""
    original, original_to = torch.Tensor.cuda, torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda":
            return self
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = original, original_to


def assert_same_losses(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], atol=1e-6):
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for k in want:
        g, w = torch.as_tensor(got[k]).float(), torch.as_tensor(want[k]).float()
        assert torch.allclose(g, w, atol=atol, rtol=0), (k, g.item(), w.item())
