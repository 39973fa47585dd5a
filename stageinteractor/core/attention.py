"""IoF-biased multi-head self-attention between the queries of one image (spec §2.5(b))."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IoFSelfAttention", "iof_log_bias"]


def iof_log_bias(boxes: Tensor, eps: float = 1e-6, log_eps: float = 1e-7) -> Tensor:
    """``log(IoF + log_eps)`` for all query pairs of each image.

    Args:
        boxes: (B, N, 4) xyxy.
    Returns:
        (B, N, N): row i = query, column j = key; IoF = area(b_i ∩ b_j) / max(area(b_i), eps)
        (mmdet ``bbox_overlaps`` mode "iof": the denominator is the row box).
    """
    a = boxes.unsqueeze(2)  # (B, N, 1, 4)
    b = boxes.unsqueeze(1)  # (B, 1, N, 4)
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    lo = torch.maximum(a[..., :2], b[..., :2])
    inter = (hi - lo).clamp(min=0).prod(-1)  # (B, N, N)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1).clamp(min=eps)  # (B, N)
    return torch.log(inter / area.unsqueeze(-1) + log_eps)


class IoFSelfAttention(nn.Module):
    """Multi-head self-attention with an additive per-head IoF bias ``tau_h * log(IoF + 1e-7)``.

    Parameters mirror ``nn.MultiheadAttention`` (``in_proj_weight`` (3D, D) stacked q/k/v,
    ``in_proj_bias``, ``out_proj``) plus ``iof_tau`` (H,). Dropout is 0.
    """

    def __init__(self, *, embed_dim: int = 256, num_heads: int = 8):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §5: xavier in_proj (one matrix) and out_proj, zero biases, tau ~ U(0, 4)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)

    def forward(self, x: Tensor, log_iof: Tensor) -> Tensor:
        """
        Args:
            x: (B*N, D) attention input (queries, keys and values), batch-major rows.
            log_iof: (B, N, N) from :func:`iof_log_bias`.
        Returns:
            (B*N, D) attention output (before any residual).
        """
        B, N = log_iof.shape[:2]
        H = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (BN, 3D)
        q, k, v = qkv.view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        bias = self.iof_tau.view(1, H, 1, 1) * log_iof.unsqueeze(1)  # (B, H, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(B * N, self.embed_dim))
