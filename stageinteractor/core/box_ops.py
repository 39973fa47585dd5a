"""Box utilities: xyzr <-> xyxy, refinement, IoU / GIoU / IoF.

Conventions (docs/DESIGN.md):

* ``xyxy``: (x1, y1, x2, y2) absolute pixels, top-left origin.
* ``xyzr``: (x_c, y_c, z, r) with ``w = 2^(z - r/2)`` and ``h = 2^(z + r/2)``,
  i.e. ``z = log2 sqrt(w*h)`` and ``r = log2(h/w)`` (spec §2.4).
* ``cxcywh``: (x_c, y_c, w, h).

Every function is pure torch, differentiable and broadcasts over leading dimensions: a box
tensor has shape ``(..., 4)``.
"""
from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    "xyzr_to_xyxy",
    "xyzr_to_cxcywh",
    "xyxy_to_xyzr",
    "refine_xyzr",
    "box_area",
    "pairwise_iou",
    "pairwise_giou",
    "pairwise_iof",
    "elementwise_iou",
    "elementwise_giou",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
]

REFINE_MODES = ("wh", "2z")


def _xyzr_wh(xyzr: Tensor) -> Tuple[Tensor, Tensor]:
    """(..., 4) xyzr -> (w, h), each (..., 1)."""
    z = xyzr[..., 2:3]
    half_r = xyzr[..., 3:4] * 0.5
    return torch.exp2(z - half_r), torch.exp2(z + half_r)


def xyzr_to_cxcywh(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 4) (x_c, y_c, w, h)."""
    # [w, h] = 2^(z + r/2 * [-1, +1]) as one expression.
    sign = xyzr.new_tensor([-0.5, 0.5])
    wh = torch.exp2(xyzr[..., 2:3] + xyzr[..., 3:4] * sign)
    return torch.cat([xyzr[..., :2], wh], dim=-1)


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 4) xyxy: ``(x - w/2, y - h/2, x + w/2, y + h/2)``."""
    return cxcywh_to_xyxy(xyzr_to_cxcywh(xyzr))


def xyxy_to_xyzr(xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., 4) xyxy -> (..., 4) xyzr.

    Widths and heights are clamped to ``eps`` before the logarithm so that degenerate boxes
    give finite (very small) scales instead of ``-inf``.
    """
    ctr = (xyxy[..., :2] + xyxy[..., 2:]) * 0.5
    wh = (xyxy[..., 2:] - xyxy[..., :2]).clamp(min=eps)
    log_wh = torch.log2(wh)
    z = log_wh.sum(dim=-1, keepdim=True) * 0.5
    r = log_wh[..., 1:2] - log_wh[..., 0:1]
    return torch.cat([ctr, z, r], dim=-1)


def refine_xyzr(xyzr: Tensor, delta: Tensor, *, mode: str = "wh") -> Tensor:
    """Apply a predicted delta ``(dx, dy, dz, dr)`` to boxes ``xyzr`` (both ``(..., 4)``).

    * ``mode="wh"`` (released StageInteractor code, spec §2.4):
      ``x += dx*w, y += dy*h, z += dz, r += dr`` with ``w, h`` of the *input* box.
    * ``mode="2z"`` (AdaMixer / paper): ``x += dx*2^z, y += dy*2^z, z += dz, r += dr``.

    Nothing is clamped.
    """
    if mode == "wh":
        sign = xyzr.new_tensor([-0.5, 0.5])
        scale = torch.exp2(xyzr[..., 2:3] + xyzr[..., 3:4] * sign)  # (..., 2) = (w, h)
    elif mode == "2z":
        scale = torch.exp2(xyzr[..., 2:3])
    else:
        raise ValueError(f"refine_xyzr: mode must be one of {REFINE_MODES}, got {mode!r}")
    return torch.cat([xyzr[..., :2] + delta[..., :2] * scale, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


def xyxy_to_cxcywh(xyxy: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) (x_c, y_c, w, h)."""
    return torch.cat([(xyxy[..., :2] + xyxy[..., 2:]) * 0.5, xyxy[..., 2:] - xyxy[..., :2]], dim=-1)


def cxcywh_to_xyxy(cxcywh: Tensor) -> Tensor:
    """(..., 4) (x_c, y_c, w, h) -> (..., 4) xyxy."""
    half = cxcywh[..., 2:] * 0.5
    return torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], dim=-1)


def box_area(xyxy: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area ``(x2-x1)*(y2-y1)`` (negative extents are clamped to 0)."""
    wh = (xyxy[..., 2:] - xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _pairwise_inter(a: Tensor, b: Tensor) -> Tensor:
    """a (..., N, 4), b (..., M, 4) -> intersection areas (..., N, M)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of every pair: a (..., N, 4) xyxy, b (..., M, 4) xyxy -> (..., N, M).

    ``IoU = inter / max(area_a + area_b - inter, eps)``.
    """
    inter = _pairwise_inter(a, b)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp(min=eps)


def pairwise_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of every pair: a (..., N, 4), b (..., M, 4) -> (..., N, M).

    ``GIoU = IoU - (C - union) / C`` with C the area of the smallest enclosing box
    (union and C clamped to ``eps``).
    """
    inter = _pairwise_inter(a, b)
    union = (box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter).clamp(min=eps)
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = (wh[..., 0] * wh[..., 1]).clamp(min=eps)
    return inter / union - (enclose - union) / enclose


def pairwise_iof(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Intersection over the *first* box's area: a (..., N, 4), b (..., M, 4) -> (..., N, M).

    ``IoF[i, j] = inter(a_i, b_j) / max(area(a_i), eps)`` (mmdet ``bbox_overlaps`` mode "iof").
    """
    return _pairwise_inter(a, b) / box_area(a).clamp(min=eps)[..., :, None]


def _elementwise_parts(a: Tensor, b: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (box_area(a) + box_area(b) - inter).clamp(min=eps)
    return inter, union


def elementwise_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of aligned boxes: a, b (..., 4) xyxy (broadcastable) -> (...)."""
    inter, union = _elementwise_parts(a, b, eps)
    return inter / union


def elementwise_giou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of aligned boxes: a, b (..., 4) xyxy (broadcastable) -> (...)."""
    inter, union = _elementwise_parts(a, b, eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = (wh[..., 0] * wh[..., 1]).clamp(min=eps)
    return inter / union - (enclose - union) / enclose
