"""IoF-biased multi-head self-attention between the queries of one image (spec §2.5(b))."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm import Linear, linear

__all__ = ["IoFSelfAttention", "iof_log_bias"]


def iof_log_bias(
    boxes: Tensor,
    area: Optional[Tensor] = None,
    *,
    corner_sign: Optional[Tensor] = None,
    log_eps: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tensor:
    """``log(IoF + 1e-7)`` for all query pairs of each image.

    Args:
        boxes: (B, N, 4) xyxy.
        area: optional (B, N) box areas (computed from ``boxes`` if None).
        corner_sign, log_eps: optional constant tensors ``(1, 1, -1, -1)`` and ``1e-7`` (buffers
            of :class:`IoFSelfAttention`, to avoid building constants at every call).
    Returns:
        (B, 1, N, N): row i = query, column j = key;
        ``IoF = area(b_i ∩ b_j) / max(area(b_i), eps)`` (mmdet ``bbox_overlaps`` mode "iof": the
        denominator is the row box).
    """
    if corner_sign is None:
        corner_sign = boxes.new_tensor([1.0, 1.0, -1.0, -1.0])
    if log_eps is None:
        log_eps = boxes.new_tensor(1e-7)
    B, N = boxes.shape[:2]
    # (x1, y1, -x2, -y2): one elementwise maximum gives (max x1, max y1, -min x2, -min y2)
    signed = boxes * corner_sign
    lo, hi = torch.maximum(signed.view(B, 1, N, 1, 4), signed.view(B, 1, 1, N, 4)).split(2, dim=-1)
    inter = (lo + hi).clamp(max=0).prod(-1)  # (-iw) * (-ih) = iw * ih, (B, 1, N, N)
    if area is None:
        area = (boxes[..., 2:] - boxes[..., :2]).prod(-1)
    area = area.clamp(min=eps).view(B, 1, N, 1)
    return torch.log(inter / area + log_eps)


class IoFSelfAttention(nn.Module):
    """Multi-head self-attention with an additive per-head IoF bias ``tau_h * log(IoF + 1e-7)``.

    Parameters mirror ``nn.MultiheadAttention`` (``in_proj_weight`` (3D, D) stacked q/k/v,
    ``in_proj_bias``, ``out_proj``) plus ``iof_tau`` (H,). Dropout is 0. Both projections are
    :func:`~stageinteractor.core.gemm.linear` (oneDNN on CPU float32); the attention itself is
    ``F.scaled_dot_product_attention``.
    """

    def __init__(self, *, embed_dim: int = 256, num_heads: int = 8):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = Linear(embed_dim, embed_dim)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.register_buffer("corner_sign", torch.tensor([1.0, 1.0, -1.0, -1.0]), persistent=False)
        self.register_buffer("log_eps", torch.tensor(1e-7), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §5: xavier in_proj (one matrix) and out_proj, zero biases, tau ~ U(0, 4)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)

    def log_iof(self, boxes: Tensor, area: Optional[Tensor] = None) -> Tensor:
        """(B, N, 4) xyxy [, (B, N) areas] -> (B, 1, N, N) ``log(IoF + 1e-7)``."""
        return iof_log_bias(boxes, area, corner_sign=self.corner_sign, log_eps=self.log_eps)

    def forward(self, x: Tensor, log_iof: Tensor) -> Tensor:
        """
        Args:
            x: (B*N, D) attention input (queries, keys and values), batch-major rows.
            log_iof: (B, 1, N, N) from :meth:`log_iof`.
        Returns:
            (B*N, D) attention output (before any residual).
        """
        B, N = log_iof.shape[0], log_iof.shape[-1]
        H = self.num_heads
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (BN, 3D), oneDNN on CPU float32
        q, k, v = qkv.view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        bias = self.iof_tau.view(1, H, 1, 1) * log_iof  # (B, H, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(B * N, self.embed_dim))
