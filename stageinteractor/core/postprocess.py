"""Inference post-processing (spec §6): top-k over all (query, class) scores, no NMS."""
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["topk_detections"]


def topk_detections(logits: Tensor, boxes: Tensor, k: Optional[int] = None) -> Dict[str, Tensor]:
    """Select the k best (query, class) pairs of every image.

    Args:
        logits: (B, N, K) classification logits of the last stage (sigmoid classifier).
        boxes: (B, N, 4) boxes of the last stage (any format; gathered as is).
        k: number of detections per image; default N (``max_per_img`` = number of queries).
    Returns:
        dict with ``scores`` (B, k) sigmoid scores sorted descending, ``labels`` (B, k) long
        (= flat index % K), ``query_index`` (B, k) long (= flat index // K) and ``boxes`` (B, k, 4).
        Pure tensor ops (``torch.topk`` / ``gather``), batched and ONNX-exportable.
    """
    B, N, K = logits.shape
    k = N if k is None else min(int(k), N * K)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    labels = index % K
    query = torch.div(index, K, rounding_mode="floor")
    picked = torch.gather(boxes, 1, query.unsqueeze(-1).expand(B, k, boxes.shape[-1]))
    return {"scores": scores, "labels": labels, "query_index": query, "boxes": picked}
