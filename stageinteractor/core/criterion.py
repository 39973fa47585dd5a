"""StageInteractor training criterion: matcher + CSLA + focal/L1/GIoU losses for all stages.

Order (spec §4.1): every stage is matched on its own detached outputs; the CSLA targets of stage
i come from all in-scope stages' matches (IoU with stage i's boxes); box targets come from
stage i's own matches only.

Per stage s (spec §4.3), with N_pos the stage's own Hungarian positives and T its multi-hot:

* ``loss_cls_s{s}  = w_cls  * sum(focal(logits, T)) / n_cls``,  ``n_cls = max(sum T, N_pos)``;
* ``loss_bbox_s{s} = w_bbox * sum(|box/s - gt/s|_1) / n_box``,   ``n_box = N_pos``;
* ``loss_giou_s{s} = w_giou * sum(1 - GIoU(box, gt)) / n_box``;

``s = (W, H, W, H)`` of the unpadded image. The normalisers are averaged over processes
(``torch.distributed`` all-reduce when initialised) and clamped to ``>= 1`` (deviation from the
official code, which can divide by zero).
"""

from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .csla import CrossStageLabelAssigner
from .diagnostics import label_instability, positive_counts
from .losses import giou_loss, l1_loss, sigmoid_focal_loss
from .matcher import HungarianMatcher, image_size_scale

__all__ = ["StageInteractorCriterion", "reduce_mean_across_processes", "LazyStats"]


class LazyStats(Mapping):
    """Read-only ``{name: python float}`` whose values stay in one device tensor until read.

    Building the diagnostics costs no host sync; the first read of any value copies the whole
    ``values`` tensor to the host once (one sync), later reads are free. Code that forwards
    the statistics without reading them (the trainer, which copies them with the losses in
    one transfer) uses :attr:`names` and :attr:`tensor` directly.

    Attributes:
        names: the statistic names, in order.
        tensor: (len(names),) float tensor on the device, detached.
    """

    def __init__(self, names: Sequence[str], values: Tensor):
        self.names = list(names)
        self.tensor = values.detach()
        self._host: Optional[Dict[str, float]] = None

    def _read(self) -> Dict[str, float]:
        if self._host is None:
            self._host = dict(zip(self.names, (float(v) for v in self.tensor.cpu().tolist())))
        return self._host

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)  # keys need no device read

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"LazyStats({self._read()!r})"


def reduce_mean_across_processes(x: Tensor) -> Tensor:
    """Average ``x`` over all processes if ``torch.distributed`` is initialised (else identity)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class StageInteractorCriterion(nn.Module):
    """Losses of all decoder stages.

    After each forward, ``self.last_stats`` maps the diagnostics (``num_pos_s{s}``,
    ``num_csla_pos_s{s}``, ``num_extra_pos_s{s}``, ``num_dropped_pos_s{s}``,
    ``label_instability_s{s}_s{s+1}``) to python floats (a :class:`LazyStats`: computed on
    the device, copied to the host on first read), and ``self.last_matches`` (S, B, N),
    ``self.last_targets`` (S, B, N, K), ``self.last_normalizers`` (S, 2) [n_cls, n_box] keep the
    tensors of the last call (detached) for parity tests and tools.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        assigner: CrossStageLabelAssigner,
        loss_class_weight: float = 2.0,
        loss_bbox_weight: float = 5.0,
        loss_giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        stage_weights: Optional[List[float]] = None,
    ):
        """
        Args:
            num_classes: K.
            matcher: the Hungarian matcher (run once per stage).
            assigner: builds the classification targets from all stages' matches.
            loss_*_weight: weights of the focal, L1 and GIoU losses.
            focal_alpha, focal_gamma: focal loss parameters.
            stage_weights: optional per-stage multipliers (default 1 for every stage).
        """
        super().__init__()
        if assigner.num_classes != num_classes:
            raise ValueError(
                f"StageInteractorCriterion: num_classes={num_classes} but the assigner has "
                f"{assigner.num_classes}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.assigner = assigner
        self.loss_class_weight = float(loss_class_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)
        self.loss_giou_weight = float(loss_giou_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.stage_weights = None if stage_weights is None else [float(w) for w in stage_weights]
        self.last_stats: Mapping[str, float] = {}
        self.last_matches: Optional[Tensor] = None
        self.last_targets: Optional[Tensor] = None
        self.last_normalizers: Optional[Tensor] = None

    @torch.no_grad()
    def match_all(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        gt_mask: Tensor,
        image_sizes: Tensor,
    ) -> Tensor:
        """Hungarian matches of every stage on its own detached outputs.

        Each stage is matched independently, but the S stages are solved as one batch of
        S*B images (one cost pass, one device->host copy).

        Args:
            logits: (S, B, N, K); boxes: (S, B, N, 4) xyxy absolute.
            gt_boxes, gt_classes, gt_mask, image_sizes: as in :meth:`forward`.

        Returns:
            (S, B, N) long.
        """
        S, B, N, K = logits.shape
        G = gt_boxes.shape[1]
        sizes = torch.as_tensor(image_sizes, device=logits.device)
        matches = self.matcher(
            logits.detach().reshape(S * B, N, K),
            boxes.detach().reshape(S * B, N, 4),
            gt_boxes[None].expand(S, B, G, 4).reshape(S * B, G, 4),
            gt_classes[None].expand(S, B, G).reshape(S * B, G),
            gt_mask[None].expand(S, B, G).reshape(S * B, G),
            sizes[None].expand(S, B, 2).reshape(S * B, 2),
        )
        return matches.to(logits.device).reshape(S, B, N)

    def forward(
        self,
        stage_outputs: List[Dict[str, Tensor]],
        gt_boxes: Tensor,
        gt_classes: Tensor,
        gt_mask: Tensor,
        image_sizes: Tensor,
    ) -> Dict[str, Tensor]:
        """
        Args:
            stage_outputs: one dict per stage with ``"logits"`` (B, N, K) and ``"boxes"``
                (B, N, 4) xyxy absolute.
            gt_boxes: (B, G, 4) xyxy absolute; gt_classes: (B, G) long; gt_mask: (B, G) bool.
            image_sizes: (B, 2) unpadded ``(h, w)``.

        Returns:
            dict ``loss_cls_s{s}``, ``loss_bbox_s{s}``, ``loss_giou_s{s}`` (scalars, weighted).
        """
        S = len(stage_outputs)
        if S == 0:
            raise ValueError("StageInteractorCriterion: stage_outputs is empty")
        # All stages at once, in (at least) float32 (also under autocast).
        dtype = torch.promote_types(stage_outputs[0]["logits"].dtype, torch.float32)
        logits = torch.stack([o["logits"] for o in stage_outputs]).to(dtype)  # (S, B, N, K)
        boxes = torch.stack([o["boxes"] for o in stage_outputs]).to(dtype)  # (S, B, N, 4)
        _, B, N, K = logits.shape
        device = logits.device
        if K != self.num_classes:
            raise ValueError(
                f"StageInteractorCriterion: logits have K={K}, expected {self.num_classes}"
            )
        gt_boxes = gt_boxes.to(device=device, dtype=dtype)
        gt_classes = gt_classes.to(device).long()
        gt_mask = gt_mask.to(device).bool()
        G = gt_boxes.shape[1]

        matches = self.match_all(logits, boxes, gt_boxes, gt_classes, gt_mask, image_sizes)
        # the matcher has checked the classes of the real objects: no second (syncing) check
        targets = self.assigner(
            matches, boxes.detach(), gt_boxes, gt_classes, gt_mask, validate=False
        )

        # Normalisers of all stages in one all-reduce: [n_cls, n_box] per stage.
        pos = matches >= 0  # (S, B, N)
        n_pos = pos.flatten(1).sum(1).to(torch.float32)
        n_ones = targets.flatten(1).sum(1).to(torch.float32)
        norms = torch.stack([torch.maximum(n_ones, n_pos), n_pos], dim=1)
        norms = reduce_mean_across_processes(norms).clamp(min=1.0).to(dtype)

        cls_sum = sigmoid_focal_loss(logits, targets.to(dtype), self.focal_alpha, self.focal_gamma)
        cls_sum = cls_sum.flatten(1).sum(1)  # (S,)

        # Box losses of the own Hungarian positives. Non-positive entries are excluded with
        # torch.where, so with no positive at all the sums are 0 and still attached to the graph.
        if G > 0:
            idx = matches.clamp(min=0)[..., None].expand(S, B, N, 4)
            tgt = gt_boxes[None].expand(S, B, G, 4).gather(2, idx)  # (S, B, N, 4)
        else:
            tgt = boxes.detach()
        scale = image_size_scale(image_sizes, dtype, device)[None, :, None, :]  # (1, B, 1, 4)
        zero = boxes.new_zeros(())
        l1_sum = torch.where(pos, l1_loss(boxes, tgt, scale), zero).flatten(1).sum(1)
        giou_sum = torch.where(pos, giou_loss(boxes, tgt), zero).flatten(1).sum(1)

        w = (
            boxes.new_ones(S)
            if self.stage_weights is None
            else boxes.new_tensor(self.stage_weights)
        )
        loss_cls = w * self.loss_class_weight * cls_sum / norms[:, 0]
        loss_bbox = w * self.loss_bbox_weight * l1_sum / norms[:, 1]
        loss_giou = w * self.loss_giou_weight * giou_sum / norms[:, 1]
        losses: Dict[str, Tensor] = {}
        for s in range(S):
            losses[f"loss_cls_s{s}"] = loss_cls[s]
            losses[f"loss_bbox_s{s}"] = loss_bbox[s]
            losses[f"loss_giou_s{s}"] = loss_giou[s]

        self._record(matches, targets, norms, gt_classes, gt_mask)
        return losses

    @torch.no_grad()
    def _record(
        self, matches: Tensor, targets: Tensor, norms: Tensor, gt_classes: Tensor, gt_mask: Tensor
    ) -> None:
        self.last_matches = matches.detach()
        self.last_targets = targets.detach()
        self.last_normalizers = norms.detach()
        counts = positive_counts(matches, targets, gt_classes)
        instab = label_instability(matches, gt_mask)
        # All statistics in one device tensor; copied to the host only when read.
        packed = torch.cat(
            [
                counts["hungarian"],
                counts["csla"],
                counts["extra"],
                counts["dropped"],
                instab.float(),
            ]
        )
        S = matches.shape[0]
        names = [
            f"{name}_s{s}"
            for name in ["num_pos", "num_csla_pos", "num_extra_pos", "num_dropped_pos"]
            for s in range(S)
        ]
        names += [f"label_instability_s{s}_s{s + 1}" for s in range(S - 1)]
        self.last_stats = LazyStats(names, packed)
