"""Training diagnostics: label instability across stages and positive counts (pure torch)."""

from typing import Dict

import torch
from torch import Tensor

__all__ = ["gt_to_query", "label_instability", "positive_counts"]


def gt_to_query(matches: Tensor, num_gts: int) -> Tensor:
    """Invert one-to-one matches.

    Args:
        matches: (S, B, N) long, gt index per query or -1.
        num_gts: G.

    Returns:
        (S, B, G) long: the query matched to each gt at each stage, or -1.
    """
    S, B, N = matches.shape
    matches = matches.long()
    out = torch.full((S, B, num_gts + 1), -1, dtype=torch.long, device=matches.device)
    col = torch.where(matches >= 0, matches, torch.full_like(matches, num_gts))  # -1 -> dump col
    query = torch.arange(N, device=matches.device).expand(S, B, N)
    out.scatter_(2, col, query)
    return out[..., :num_gts]


def label_instability(matches: Tensor, gt_mask: Tensor) -> Tensor:
    """Fraction of ground-truth objects whose matched query changes between consecutive stages.

    For the stage pair (s, s+1) consider the real objects (``gt_mask``) of all images that are
    matched at **at least one** of the two stages. An object *changes* if its matched query at
    stage s differs from its matched query at stage s+1; an object matched at one stage and
    unmatched at the other counts as changed. ``instability[s] = changed / considered`` (0 when
    nothing is considered). When every image has no more objects than queries, every object is
    matched at every stage, and this is simply the fraction of objects whose query changes.

    Args:
        matches: (S, B, N) long, gt index per query or -1.
        gt_mask: (B, G) bool.

    Returns:
        (S-1,) float tensor (empty for S < 2).
    """
    S = matches.shape[0]
    G = gt_mask.shape[1]
    if S < 2 or G == 0:
        return torch.zeros(max(S - 1, 0), dtype=torch.float32, device=matches.device)
    q = gt_to_query(matches, G)  # (S, B, G)
    real = gt_mask.to(device=matches.device, dtype=torch.bool)[None]  # (1, B, G)
    a, b = q[:-1], q[1:]
    considered = real & ((a >= 0) | (b >= 0))
    changed = considered & (a != b)
    num = changed.flatten(1).sum(1).float()
    den = considered.flatten(1).sum(1).float()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def positive_counts(matches: Tensor, targets: Tensor, gt_classes: Tensor) -> Dict[str, Tensor]:
    """Per-stage counts of own Hungarian positives, CSLA multi-hot ones and their difference.

    Args:
        matches: (S, B, N) long; targets: (S, B, N, K) multi-hot; gt_classes: (B, G) long.

    Returns:
        dict of (S,) float tensors:
        * ``hungarian``: queries matched by the stage's own Hungarian matching;
        * ``csla``: ones in the multi-hot target;
        * ``extra``: ones that are not the (query, class of its own match) entry of an own
          positive (one-to-many positives added by CSLA);
        * ``dropped``: own positives whose own (query, class) entry is 0 (lost the label because
          their IoU is below the threshold).
    """
    S, B, N, K = targets.shape
    matched = matches >= 0
    hard = targets > 0
    own = torch.zeros_like(hard)
    G = gt_classes.shape[1]
    if G > 0:
        cls = gt_classes.to(matches.device).long()[None].expand(S, B, G)
        cls = cls.gather(2, matches.clamp(min=0)).clamp(0, K - 1)  # (S, B, N)
        own = torch.zeros_like(hard).scatter_(3, cls[..., None], matched[..., None])
    return {
        "hungarian": matched.flatten(1).sum(1).float(),
        "csla": hard.flatten(1).sum(1).float(),
        "extra": (hard & ~own).flatten(1).sum(1).float(),
        "dropped": (own & ~hard).flatten(1).sum(1).float(),
    }
