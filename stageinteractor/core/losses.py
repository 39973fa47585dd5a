"""Elementwise losses of StageInteractor (spec §4.3). Reduction and normalisation are left to
the caller (see :class:`~stageinteractor.core.criterion.StageInteractorCriterion`).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import elementwise_giou

__all__ = ["sigmoid_focal_loss", "l1_loss", "giou_loss"]


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss with (possibly multi-hot or soft) targets, elementwise.

    The official ``BoundAlphaQualityFocalLoss`` (spec §4.3). With ``p = sigmoid(x)``:

    * ``T == 0``: ``(1 - alpha) * p^gamma * BCE(x, 0)``;
    * ``T > 0``:  ``alpha * |T - p|^gamma * BCE(x, T)``;
    * ``T < 0``:  ``0`` (ignored entry).

    For binary ``T`` this is exactly the standard sigmoid focal loss.

    Args:
        logits: (...) pre-sigmoid logits; targets: (...) same shape, values in [0, 1] or < 0.

    Returns:
        (...) loss per entry (not reduced).
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    pos_mask = targets > 0
    neg_mask = targets == 0
    neg = (
        (1 - alpha)
        * prob.pow(gamma)
        * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    )
    soft = targets.clamp(min=0)
    pos = (
        alpha
        * (soft - prob).abs().pow(gamma)
        * F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    )
    return torch.where(pos_mask, pos, torch.where(neg_mask, neg, torch.zeros_like(neg)))


def l1_loss(pred: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """L1 between boxes normalised by ``scale``: pred, target (..., 4) xyxy, scale broadcastable
    to (..., 4) (usually the unpadded ``(W, H, W, H)``). Returns (...) summed over coordinates."""
    return (pred / scale - target / scale).abs().sum(-1)


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - GIoU`` of aligned absolute xyxy boxes: pred, target (..., 4) -> (...)."""
    return 1.0 - elementwise_giou(pred, target)
