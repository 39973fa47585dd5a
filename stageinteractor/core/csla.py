"""Cross-stage label assigner (CSLA): multi-hot classification targets from per-stage matches.

Semantics (spec §4.4, paper §3.2, detrex_integration §3.1), for stage ``i`` (0-based):

    score[q, c] = max over j in {i} ∪ candidates(i), over queries q with match_j(q) = g and
                  class(g) = c, of IoU(gt_box[g], pred_box_i[q])
    target_i[q, c] = 1[score[q, c] >= iou_threshold]

* Queries are aligned by index across stages; the IoU always uses **stage i's** boxes.
* ``candidates(i) = {j : i + lo <= j <= i + hi} ∩ [0, S-1]`` with ``scope = (lo, hi)``; ``None``
  means unbounded towards the first (lo) / last (hi) stage. The own stage is always included.
* Box targets are *not* produced here: the criterion regresses stage i's own Hungarian positives.

The inputs are plain tensors so that the detrex adapters can reuse the class unchanged. Everything
is vectorised over stages, candidate stages, images and queries (one ``(S, S, B, N)`` IoU tensor
and one ``scatter_reduce``).
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .box_ops import elementwise_iou

__all__ = ["CrossStageLabelAssigner", "TABLE13_SCOPES"]

# Paper Tab. 13 rows [alpha_i, beta_i] (1-based, paper notation) -> ``scope`` offsets.
TABLE13_SCOPES: Dict[str, Tuple[Optional[int], Optional[int]]] = {
    "[i,i]": (0, 0),
    "[i-1,i]": (-1, 0),
    "[i-1,i+1]": (-1, 1),
    "[i-1,L]": (-1, None),  # released configuration (best row)
    "[1,L]": (None, None),
}


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"CrossStageLabelAssigner: {name} must be one of (True, False), got {value!r}"
        )
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CrossStageLabelAssigner(nn.Module):
    """Build CSLA multi-hot targets ``(S, B, N, K)`` for all stages at once.

    Switches (paper ablations):

    * ``enabled=False``: plain one-hot targets of each stage's own matches (the baseline).
    * ``scope=(lo, hi)``: relative offsets of the candidate stages (Tab. 13, see
      :data:`TABLE13_SCOPES`); ``lo`` must be ``<= 0`` or None, ``hi`` ``>= 0`` or None.
    * ``stages``: which stages (0-based; negative values count from the last stage) get CSLA
      targets; the others get one-hot targets of their own matches. None = all stages
      (Tab. 13's last row "[1, L-2]" with L = 6 is ``stages=(0, 1, 2, 3)``).
    * ``iou_threshold``: inclusive (``>=``) IoU threshold (Tab. 14).
    * ``use_score`` (Tab. 7 "Score"): the threshold also applies to the stage's own Hungarian
      positives (a positive whose box has IoU below the threshold loses its class label).
      With False own positives always keep their label.
    * ``cross_stage`` (Tab. 7 "Cross"): gather labels from the other in-scope stages. With False
      only the own stage is used (this equals ``scope=(0, 0)``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        enabled: bool = True,
        scope: Tuple[Optional[int], Optional[int]] = (-1, None),
        stages: Optional[Sequence[int]] = None,
        iou_threshold: float = 0.5,
        use_score: bool = True,
        cross_stage: bool = True,
    ):
        super().__init__()
        if not _is_int(num_classes) or num_classes <= 0:
            raise ValueError(
                f"CrossStageLabelAssigner: num_classes must be a positive int, got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.enabled = _check_bool("enabled", enabled)
        self.use_score = _check_bool("use_score", use_score)
        self.cross_stage = _check_bool("cross_stage", cross_stage)

        # Any 2-sequence is accepted (tuple, list, OmegaConf ListConfig from LazyConfig).
        scope_ok = not isinstance(scope, (str, bytes)) and hasattr(scope, "__len__")
        scope_ok = scope_ok and len(scope) == 2
        if scope_ok:
            lo, hi = tuple(scope)
            scope_ok = (lo is None or (_is_int(lo) and lo <= 0)) and (
                hi is None or (_is_int(hi) and hi >= 0)
            )
        if not scope_ok:
            raise ValueError(
                "CrossStageLabelAssigner: scope must be a pair (lo, hi) with lo in {None, <= 0} "
                f"and hi in {{None, >= 0}} (Tab. 13 rows: {TABLE13_SCOPES}), got {scope!r}"
            )
        self.scope = (lo, hi)

        if stages is not None:
            seq_ok = hasattr(stages, "__iter__") and not isinstance(stages, (str, bytes))
            stages = tuple(stages) if seq_ok else stages
            if not seq_ok or not all(_is_int(s) for s in stages):
                raise ValueError(
                    "CrossStageLabelAssigner: stages must be None (all stages) or a sequence of "
                    f"int stage indices (0-based, negative from the end), got {stages!r}"
                )
        self.stages = stages

        thr = iou_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise ValueError(
                f"CrossStageLabelAssigner: iou_threshold must be a number in [0, 1], got {thr!r}"
            )
        self.iou_threshold = float(thr)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, enabled={self.enabled}, scope={self.scope}, "
            f"stages={self.stages}, iou_threshold={self.iou_threshold}, "
            f"use_score={self.use_score}, cross_stage={self.cross_stage}"
        )

    def csla_stages(self, num_stages: int) -> Tensor:
        """(S,) bool: which stages use CSLA (the others get one-hot targets)."""
        S = num_stages
        if not self.enabled:
            return torch.zeros(S, dtype=torch.bool)
        if self.stages is None:
            return torch.ones(S, dtype=torch.bool)
        rows = torch.zeros(S, dtype=torch.bool)
        for s in self.stages:
            if not -S <= s < S:
                raise ValueError(
                    f"CrossStageLabelAssigner: stages entry {s} is out of range for {S} stages"
                )
            rows[s % S] = True
        return rows

    def scope_mask(self, num_stages: int) -> Tensor:
        """(S, S) bool: ``mask[i, j]`` = stage j's matches feed stage i's targets.

        The diagonal is always True; for CSLA stages (and ``cross_stage=True``) the row holds
        the clipped window ``[i + lo, i + hi] ∩ [0, S-1]``.
        """
        S = num_stages
        i = torch.arange(S)[:, None]
        j = torch.arange(S)[None, :]
        lo, hi = self.scope
        mask = torch.ones(S, S, dtype=torch.bool)
        if lo is not None:
            mask &= j >= i + lo
        if hi is not None:
            mask &= j <= i + hi
        eye = torch.eye(S, dtype=torch.bool)
        rows = self.csla_stages(S)[:, None]
        if not self.cross_stage:
            rows = torch.zeros_like(rows)
        return torch.where(rows, mask | eye, eye)

    def stage_tables(self, num_stages: int) -> Tensor:
        """(2, S, S) bool on the host: :meth:`scope_mask` and ``always[i, j]`` = stage i keeps
        the labels of its own matches (j = i) without the IoU threshold (a non-CSLA stage, or
        the "Score" component off)."""
        S = num_stages
        eye = torch.eye(S, dtype=torch.bool)
        csla_rows = self.csla_stages(S)[:, None]
        always = eye & (~csla_rows | (not self.use_score))
        return torch.stack([self.scope_mask(S), always])

    @torch.no_grad()
    def forward(
        self,
        matches: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        gt_mask: Tensor,
        *,
        validate: bool = True,
    ) -> Tensor:
        """
        Args:
            matches: (S, B, N) long, gt index matched to each query at each stage, or -1.
            pred_boxes: (S, B, N, 4) xyxy predicted boxes of every stage (detached here).
            gt_boxes: (B, G, 4) xyxy; gt_classes: (B, G) long in [0, K);
            gt_mask: (B, G) bool, True = real object (matches to padded entries are ignored).
            validate: check that every match index is < G and every matched class is in
                [0, K) (ValueError otherwise). The check reads device values on the host (one
                sync); callers whose matches come from a matcher that already checked the
                classes (the criteria of this project) pass False.

        Returns:
            (S, B, N, K) float multi-hot targets (0/1), no grad.
        """
        S, B, N = matches.shape
        K = self.num_classes
        G = gt_boxes.shape[1]
        dtype = torch.promote_types(pred_boxes.dtype, torch.float32)
        device = pred_boxes.device
        targets = torch.zeros((S, B, N, K), dtype=dtype, device=device)
        if S == 0 or G == 0 or N == 0:
            return targets

        matches = matches.to(device=device, dtype=torch.long)
        if validate:
            # both checks in one host read
            bad_idx = (matches >= G).any()
        idx = matches.clamp(min=0, max=G - 1)  # (S, B, N)
        mask_sbg = gt_mask.to(device=device, dtype=torch.bool)[None].expand(S, B, G)
        valid = (matches >= 0) & (matches < G) & mask_sbg.gather(2, idx)  # (S, B, N)

        cls_sbg = gt_classes.to(device=device, dtype=torch.long)[None].expand(S, B, G)
        cls_j = cls_sbg.gather(2, idx)  # (S_j, B, N)
        if validate:
            bad_cls = (((cls_j < 0) | (cls_j >= K)) & valid).any()
            bad_idx, bad_cls = torch.stack([bad_idx, bad_cls]).cpu().tolist()
            if bad_idx:
                raise ValueError(f"CrossStageLabelAssigner: a match index is >= G = {G}")
            if bad_cls:
                raise ValueError(
                    f"CrossStageLabelAssigner: a matched gt class is outside [0, {K})"
                )
        cls_j = cls_j.clamp(0, K - 1)

        gt_sbg = gt_boxes.detach().to(device=device, dtype=dtype)[None].expand(S, B, G, 4)
        gt_j = gt_sbg.gather(2, idx[..., None].expand(S, B, N, 4))  # (S_j, B, N, 4)
        # iou[i, j, b, q] = IoU(gt of match_j(b, q), stage-i box of (b, q))
        iou = elementwise_iou(pred_boxes.detach().to(dtype)[:, None], gt_j[None])

        # (S, S) stage tables, built on the host and sent in one non-blocking copy
        scope, always = self.stage_tables(S).to(device, non_blocking=True).unbind(0)
        passed = (iou >= self.iou_threshold) | always[:, :, None, None]
        keep = passed & valid[None] & scope[:, :, None, None]  # (S_i, S_j, B, N)

        src = keep.permute(0, 2, 3, 1).to(dtype)  # (S_i, B, N, S_j)
        index = cls_j.permute(1, 2, 0)[None].expand(S, B, N, S)  # (S_i, B, N, S_j)
        targets.scatter_reduce_(3, index, src, reduce="amax", include_self=True)
        return targets
