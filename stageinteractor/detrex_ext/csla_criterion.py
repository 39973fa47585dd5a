"""CSLAMixin: cross-stage label assignment for detrex's set criteria.

The mixin goes in front of a detrex criterion class (``class C(CSLAMixin, DINOCriterion)``).
It changes exactly one thing: the focal classification target of every *decoder stage* becomes
the multi-hot target of :class:`stageinteractor.core.csla.CrossStageLabelAssigner`. Everything
else -- box losses, denoising losses, encoder (``_enc``) losses, H-Deformable-DETR's one-to-many
branch, loss-key names, ``weight_dict`` and the (empty) state dict -- is the parent's code.

How, per ``forward(outputs, targets, ...)``:

1. *Pre-pass.* The decoder stages are ``[*outputs["aux_outputs"], outputs]`` (stage 0 .. S-1;
   detrex puts the last layer at the top level). The (wrapped) matcher runs once per stage; the
   matches, packed into a ``(S, B, N)`` gt-index-or--1 tensor, go through the assigner together
   with the stages' boxes (normalised cxcywh -> xyxy; IoU is scale-invariant) to give ``(S, B, N,
   K)`` multi-hot targets.
2. The results are cached, keyed by the *identity* of each stage's ``pred_logits`` tensor.
3. ``super().forward(...)`` runs unchanged. Its ``self.matcher(stage, targets)`` calls hit the
   cache (so Hungarian runs once per stage, as in the baseline); its ``loss_labels`` calls on a
   cached stage use the multi-hot target. Logits not in the cache -- denoising outputs, encoder
   outputs, the one-to-many branch -- take the parent's one-to-one path untouched.
4. The cache is cleared in a ``finally`` block.

Diagnostics (positives per stage, label instability per consecutive stage pair) go to
detectron2's event storage when one is active; never into the loss dict, which the trainer sums.
"""

import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from stageinteractor.core.csla import CrossStageLabelAssigner

__all__ = ["CSLAMixin", "CachedMatcher", "CLS_NORMS"]

#: Allowed values of ``csla_cls_norm``: the authors' ``max(sum(T), #matched)`` or detrex's
#: ``num_boxes`` (number of ground truths, averaged over ranks).
CLS_NORMS = ("max_positives", "num_boxes")

_Indices = List[Tuple[torch.Tensor, torch.Tensor]]


class CachedMatcher(nn.Module):
    """Matcher wrapper that answers from a per-forward cache, else delegates to ``inner``.

    ``cache`` is a list of ``(pred_logits tensor, indices)`` pairs compared with ``is``. The wrapper
    has no parameters or buffers, so checkpoints are unchanged.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.cache: List[Tuple[torch.Tensor, _Indices]] = []

    def lookup(self, logits: torch.Tensor) -> Optional[_Indices]:
        for key, indices in self.cache:
            if key is logits:
                return indices
        return None

    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, torch.Tensor]]):
        hit = self.lookup(outputs.get("pred_logits"))
        if hit is not None:
            return hit
        return self.inner(outputs, targets)

    def __repr__(self, _repr_indent: int = 4) -> str:
        # SetCriterion.__repr__ calls matcher.__repr__(_repr_indent=8).
        try:
            inner = self.inner.__repr__(_repr_indent=_repr_indent)
        except TypeError:
            inner = repr(self.inner)
        return "CachedMatcher(" + inner + ")"


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _storage_or_none():
    """detectron2's current EventStorage, or None when there is none (or no detectron2)."""
    try:
        from detectron2.utils import events
    except ImportError:  # pragma: no cover - detrex always ships detectron2
        return None
    stack = getattr(events, "_CURRENT_STORAGE_STACK", [])
    return stack[-1] if stack else None


def _dist_sum_(t: torch.Tensor) -> int:
    """All-reduce ``t`` in place when distributed; returns the world size."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        return torch.distributed.get_world_size()
    return 1


class CSLAMixin:
    """Cross-stage label assignment in front of a detrex ``SetCriterion`` subclass.

    Extra keyword-only constructor arguments (all others go to the parent unchanged):

    * ``csla_enabled`` (bool): False runs the parent exactly (baseline, no pre-pass).
    * ``csla_scope`` ((lo, hi)): candidate stages of stage i are i+lo .. i+hi, clipped to the
      decoder; None = unbounded. ``(-1, None)`` is the paper's ``[i-1, L]``; ``(0, 0)`` is the
      own stage only.
    * ``csla_iou_threshold`` (float): a stage-j pair (q, t) joins stage i's target when
      IoU(box_i(q), gt_t) >= threshold (inclusive).
    * ``csla_cls_norm``: ``"max_positives"`` (authors: max(sum T_i, #matched_i), per stage,
      averaged over ranks) or ``"num_boxes"`` (detrex's normaliser; needed for parity).
    * ``csla_on_one2many`` (bool): also apply CSLA on H-Deformable-DETR's one-to-many call.

    The parent must use ``loss_class_type="focal_loss"`` (CSLA targets are multi-hot).
    """

    def __init__(
        self,
        *args,
        csla_enabled: bool = True,
        csla_scope: Sequence[Optional[int]] = (-1, None),
        csla_iou_threshold: float = 0.5,
        csla_cls_norm: str = "max_positives",
        csla_on_one2many: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.loss_class_type != "focal_loss":
            raise ValueError(
                f"{name}: CSLA needs loss_class_type='focal_loss' (multi-hot sigmoid targets), "
                f"got {self.loss_class_type!r}"
            )
        if csla_cls_norm not in CLS_NORMS:
            raise ValueError(
                f"{name}: csla_cls_norm must be one of {CLS_NORMS}, got {csla_cls_norm!r}"
            )
        scope = tuple(csla_scope)
        if len(scope) != 2:
            raise ValueError(f"{name}: csla_scope must be a pair (lo, hi), got {csla_scope!r}")
        if not 0.0 <= float(csla_iou_threshold) <= 1.0:
            raise ValueError(
                f"{name}: csla_iou_threshold must be in [0, 1], got {csla_iou_threshold!r}"
            )
        self.csla_enabled = bool(csla_enabled)
        self.csla_scope = scope
        self.csla_iou_threshold = float(csla_iou_threshold)
        self.csla_cls_norm = csla_cls_norm
        self.csla_on_one2many = bool(csla_on_one2many)
        self.assigner = CrossStageLabelAssigner(
            num_classes=self.num_classes,
            enabled=self.csla_enabled,
            scope=scope,
            iou_threshold=self.csla_iou_threshold,
        )
        if not isinstance(self.matcher, CachedMatcher):
            self.matcher = CachedMatcher(self.matcher)
        # pred_logits -> (multi-hot target, normaliser or None); filled per forward.
        self._csla_targets: List[Tuple[torch.Tensor, Tuple[torch.Tensor, Optional[float]]]] = []
        # H-DETR: weak reference to the one-to-many logits seen in the last one-to-one call
        # (weak, so that no autograd graph is kept alive across iterations).
        self._one2many_ref: Optional[weakref.ref] = None
        self._warned_single_stage = False

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Dict[str, Any], targets: List[Dict[str, torch.Tensor]], *args, **kw):
        """Same signature and loss dict as the parent's ``forward``."""
        if not self.csla_enabled:
            return super().forward(outputs, targets, *args, **kw)
        previous = self._one2many_ref() if self._one2many_ref is not None else None
        is_one2many = previous is not None and outputs.get("pred_logits") is previous
        # Remember (or forget) the one-to-many logits for the next call.
        one2many = None if is_one2many else outputs.get("pred_logits_one2many")
        self._one2many_ref = weakref.ref(one2many) if one2many is not None else None
        if is_one2many and not self.csla_on_one2many:
            return super().forward(outputs, targets, *args, **kw)
        try:
            self._csla_prepass(outputs, targets, prefix="csla_one2many" if is_one2many else "csla")
            return super().forward(outputs, targets, *args, **kw)
        finally:
            self.matcher.cache.clear()
            self._csla_targets.clear()

    @staticmethod
    def decoder_stages(outputs: Dict[str, Any]) -> List[Dict[str, torch.Tensor]]:
        """Decoder stages 0..S-1: ``aux_outputs`` then the top-level (last-layer) dict."""
        return [*outputs.get("aux_outputs", []), outputs]

    @torch.no_grad()
    def _csla_prepass(self, outputs, targets, prefix: str) -> None:
        stages = self.decoder_stages(outputs)
        if len(stages) == 1 and not self._warned_single_stage:
            warnings.warn(
                f"{type(self).__name__}: only one decoder stage (aux_loss=False?); CSLA reduces to "
                "the own-stage IoU filter."
            )
            self._warned_single_stage = True
        inner = self.matcher.inner
        indices = [inner(stage, targets) for stage in stages]  # one Hungarian run per stage

        logits = stages[-1]["pred_logits"]
        device = logits.device
        num_stages, (batch, num_queries) = len(stages), tuple(logits.shape[:2])
        num_gt = [len(t["labels"]) for t in targets]
        g_max = max(num_gt, default=0)
        gt_boxes = torch.zeros(batch, g_max, 4, device=device)
        gt_classes = torch.zeros(batch, g_max, dtype=torch.long, device=device)
        gt_mask = torch.zeros(batch, g_max, dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            n = num_gt[b]
            if n:
                gt_boxes[b, :n] = _cxcywh_to_xyxy(t["boxes"].detach().float())
                gt_classes[b, :n] = t["labels"].long()
                gt_mask[b, :n] = True
        # detrex's matcher returns host index tensors: fill on the host, then ONE non-blocking
        # copy (instead of two blocking copies per stage and image)
        matches = torch.full((num_stages, batch, num_queries), -1, dtype=torch.long)
        for s, per_image in enumerate(indices):
            for b, (src, tgt) in enumerate(per_image):
                matches[s, b, src.cpu()] = tgt.cpu().long()
        matches = matches.to(device, non_blocking=True)
        pred_boxes = torch.stack(
            [_cxcywh_to_xyxy(st["pred_boxes"].detach().float()) for st in stages]
        )
        # detrex's matcher indexed its costs with these labels and indices: no second check
        multi_hot = self.assigner(
            matches, pred_boxes, gt_boxes, gt_classes, gt_mask, validate=False
        )

        # normalisers stay 0-dim device tensors (detrex's focal loss divides by them): no sync
        norms: List[Optional[torch.Tensor]] = [None] * num_stages
        counts = torch.stack(
            [multi_hot.flatten(1).sum(1), (matches >= 0).flatten(1).sum(1).float()]
        )
        if self.csla_cls_norm == "max_positives":
            world = _dist_sum_(counts)  # every rank, every call: collectives stay in lockstep
            norms = list((counts.max(0).values / world).clamp(min=1).unbind(0))

        for s, stage in enumerate(stages):
            self.matcher.cache.append((stage["pred_logits"], indices[s]))
            self._csla_targets.append((stage["pred_logits"], (multi_hot[s], norms[s])))
        self._log_diagnostics(prefix, multi_hot, matches, gt_mask)

    def _lookup_target(self, logits: torch.Tensor):
        for key, payload in self._csla_targets:
            if key is logits:
                return payload
        return None

    # ------------------------------------------------------------------ losses
    def loss_labels(self, outputs, targets, indices, num_boxes, **kwargs):
        """Focal loss on the cached multi-hot target for decoder stages; the parent otherwise."""
        src_logits = outputs["pred_logits"]
        payload = self._lookup_target(src_logits)
        if payload is None:
            return super().loss_labels(outputs, targets, indices, num_boxes, **kwargs)
        from detrex.modeling.criterion.criterion import sigmoid_focal_loss

        target, norm = payload
        norm = num_boxes if norm is None else norm
        loss = sigmoid_focal_loss(
            src_logits,
            target.to(src_logits.dtype),
            num_boxes=norm,
            alpha=self.alpha,
            gamma=self.gamma,
        )
        return {"loss_class": loss * src_logits.shape[1]}

    # ------------------------------------------------------------------ diagnostics
    def _log_diagnostics(self, prefix, multi_hot, matches, gt_mask) -> None:
        """Positives per image and label instability per stage pair, as device scalars: the
        trainer of this project copies them with the losses (no host sync here)."""
        if _storage_or_none() is None:
            return
        from stageinteractor.core.diagnostics import label_instability
        from stageinteractor.d2.deferred_scalars import put_device_scalars

        S = multi_hot.shape[0]
        positives = multi_hot.flatten(1).sum(1) / max(multi_hot.shape[1], 1)  # per image
        put_device_scalars([f"{prefix}/positives_s{s}" for s in range(S)], positives, True)
        if S > 1:
            instab = label_instability(matches, gt_mask).float()
            names = [f"{prefix}/instability_s{s}_s{s + 1}" for s in range(S - 1)]
            put_device_scalars(names, instab, True)

    def extra_csla_repr(self) -> str:
        return (
            f"csla: enabled={self.csla_enabled}, scope={self.csla_scope}, "
            f"iou_threshold={self.csla_iou_threshold}, cls_norm={self.csla_cls_norm}, "
            f"on_one2many={self.csla_on_one2many}"
        )

    def __repr__(self) -> str:
        return super().__repr__() + "\n    " + self.extra_csla_repr()
