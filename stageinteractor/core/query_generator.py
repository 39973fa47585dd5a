"""Initial queries (spec §2.3): a learnt content embedding and full-image boxes."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InitialQueryGenerator"]


class InitialQueryGenerator(nn.Module):
    """Content: ``Embedding(N, D)`` (init N(0, 1)) passed through a LayerNorm **without affine**
    at every forward and shared by all images. Boxes: the full unpadded image of each image,
    ``x = W/2, y = H/2, z = log2 sqrt(W*H), r = log2(H/W)``.
    """

    def __init__(self, *, num_queries: int = 100, query_dim: int = 256):
        super().__init__()
        self.num_queries = num_queries
        self.query_dim = query_dim
        self.content = nn.Embedding(num_queries, query_dim)
        nn.init.normal_(self.content.weight, 0.0, 1.0)
        self.register_buffer("log_to_zr", torch.tensor([[0.5, -1.0], [0.5, 1.0]]), persistent=False)

    def forward(self, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            image_sizes: (B, 2) float (h, w), already validated/clamped to >= 1 by the caller.
        Returns:
            content (B*N, D), and the full-image boxes of every query as xyzr (B, N, 4),
            wh (B, N, 2) and xyxy (B, N, 4).
        """
        B = image_sizes.shape[0]
        N = self.num_queries
        content = F.layer_norm(self.content.weight, (self.query_dim,)).repeat(B, 1)
        wh = image_sizes.view(B, 1, 2).flip(-1)  # (B, 1, 2) = (w, h)
        # (log2 w, log2 h) -> (z, r) = ((log2 w + log2 h) / 2, log2 h - log2 w): one product-sum
        zr = (torch.log2(wh).unsqueeze(-1) * self.log_to_zr).sum(-2)
        xyzr = torch.cat([wh * 0.5, zr], dim=-1)
        boxes = F.pad(wh, (2, 0))  # (0, 0, w, h)
        return content, xyzr.expand(B, N, 4), wh.expand(B, N, 2), boxes.expand(B, N, 4)
