"""Batched Hungarian matcher (spec §4.2, ``SeqHungarianAssigner`` of the official code).

The cost between query ``q`` and ground truth ``g`` is

* ``C_cls = w_cls * [alpha (1-p)^gamma (-log(p + 1e-12)) - (1-alpha) p^gamma (-log(1-p + 1e-12))]``
  with ``p = sigmoid(logit[q, class(g)])`` (focal-loss cost);
* ``C_L1 = w_bbox * || box_q / s - gt_g / s ||_1`` with ``s = (W, H, W, H)`` of the *unpadded*
  image (xyxy coordinates);
* ``C_giou = -w_giou * GIoU(box_q, gt_g)`` on absolute xyxy boxes.

The costs of all images are computed in one batched pass as a ``(B, N, G)`` tensor, moved to the
CPU once (with the input checks, one host sync per call), and
``scipy.optimize.linear_sum_assignment`` is solved per image on the columns of its real objects;
the matches go back to the device with a non-blocking copy.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import pairwise_giou

__all__ = ["HungarianMatcher", "focal_class_cost", "image_size_scale"]


def image_size_scale(image_sizes: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, 2) unpadded ``(h, w)`` -> (B, 4) ``(w, h, w, h)`` normalisation factors."""
    sizes = torch.as_tensor(image_sizes, device=device).to(dtype)
    h, w = sizes[:, 0], sizes[:, 1]
    return torch.stack([w, h, w, h], dim=-1)


def focal_class_cost(
    prob: Tensor, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """Focal classification cost of probabilities ``prob`` (any shape), unweighted.

    ``alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1-p + eps))``
    (the positive focal term minus the negative one; mmdet ``FocalLossCost``).
    """
    pos = alpha * (1 - prob).pow(gamma) * (-(prob + eps).log())
    neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + eps).log())
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth objects, for a whole batch.

    If an image has more objects than queries (G_b > N), every query is matched and only N of
    the objects (those of the minimal-cost assignment) get a query; the rest stay unmatched.
    Images without objects give all ``-1``. The matcher has no parameters and never builds a
    graph.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 cost on
                normalised boxes and the (negative) GIoU cost.
            focal_alpha, focal_gamma: focal-cost parameters.
        """
        super().__init__()
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        image_sizes: Tensor,
    ) -> Tensor:
        """Total matching cost of every (query, gt) pair of every image.

        Args:
            logits: (B, N, K) classification logits (pre-sigmoid).
            boxes: (B, N, 4) predicted xyxy boxes, absolute pixels.
            gt_boxes: (B, G, 4) xyxy absolute; gt_classes: (B, G) long.
            image_sizes: (B, 2) unpadded ``(h, w)``.

        Returns:
            (B, N, G) cost (float32 or the input dtype if wider); padded columns are not masked.
        """
        B, N, K = logits.shape
        G = gt_boxes.shape[1]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.detach().to(dtype)
        boxes = boxes.detach().to(dtype)
        gt_boxes = gt_boxes.detach().to(dtype)
        if G == 0:
            return logits.new_zeros((B, N, 0))

        prob = logits.sigmoid()
        cls_idx = gt_classes.long().clamp(0, K - 1)[:, None, :].expand(B, N, G)
        c_cls = focal_class_cost(prob.gather(2, cls_idx), self.focal_alpha, self.focal_gamma)

        scale = image_size_scale(image_sizes, dtype, logits.device)[:, None, :]  # (B, 1, 4)
        norm_pred, norm_gt = boxes / scale, gt_boxes / scale
        c_l1 = (norm_pred[:, :, None, :] - norm_gt[:, None, :, :]).abs().sum(-1)

        c_giou = -pairwise_giou(boxes, gt_boxes)
        return self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        gt_mask: Tensor,
        image_sizes: Tensor,
    ) -> Tensor:
        """
        Args:
            logits: (B, N, K) logits; boxes: (B, N, 4) xyxy absolute (both detached here).
            gt_boxes: (B, G, 4) xyxy absolute; gt_classes: (B, G) long;
            gt_mask: (B, G) bool, True = real object (padded entries are ignored).
            image_sizes: (B, 2) unpadded ``(h, w)`` per image.

        Returns:
            LongTensor (B, N) on ``logits.device``: the gt index (into dim 1 of ``gt_boxes``)
            matched to each query, or -1.

        Raises:
            ValueError: if a cost of a real object is NaN or infinite.
        """
        B, N, K = logits.shape
        G = gt_boxes.shape[1]
        if G == 0 or N == 0:
            return torch.full((B, N), -1, dtype=torch.long, device=logits.device)

        # Everything the host needs, in ONE device->host copy (one sync per call): the
        # (B, N, G) costs with padded columns zeroed, the gt mask, and per-entry flags of real
        # objects with a class outside [0, K) and of non-finite costs. The checks are done on
        # the host copy, so they cost no extra sync.
        mask = gt_mask.to(torch.bool)
        cost = self.cost_matrix(logits, boxes, gt_boxes, gt_classes, image_sizes)
        real = mask[:, None, :].expand_as(cost)
        bad_cost = real & ~torch.isfinite(cost)
        cls = gt_classes.long()
        bad_cls = mask & ((cls < 0) | (cls >= K))
        packed = torch.cat(
            [
                cost.masked_fill(~real, 0.0).flatten(),
                mask.flatten().to(cost.dtype),
                bad_cls.flatten().to(cost.dtype),
                bad_cost.flatten().to(cost.dtype),
            ]
        )
        host = packed.cpu().numpy()
        n_cost, n_mask = B * N * G, B * G
        cost_np = host[:n_cost].reshape(B, N, G)
        mask_np = host[n_cost : n_cost + n_mask].reshape(B, G) > 0
        if host[n_cost + n_mask : n_cost + 2 * n_mask].any():
            raise ValueError(f"HungarianMatcher: a ground-truth class is outside [0, {K})")
        bad = host[n_cost + 2 * n_mask :].reshape(B, N, G)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                "HungarianMatcher: non-finite matching cost (NaN/inf) at (image, query, gt) "
                f"= {where}; check the logits and boxes of that query / gt."
            )

        out = np.full((B, N), -1, dtype=np.int64)
        for b in range(B):
            cols = np.nonzero(mask_np[b])[0]
            if cols.size == 0:
                continue
            rows, sel = linear_sum_assignment(cost_np[b][:, cols])
            out[b, rows] = cols[sel]
        # an asynchronous copy back: the host buffer is a fresh numpy array, kept alive by
        # the tensor that wraps it until the copy has been issued
        return torch.from_numpy(out).to(logits.device, non_blocking=True)
