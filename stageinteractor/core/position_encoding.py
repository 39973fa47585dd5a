"""Sinusoidal embedding of xyzr boxes (spec §2.5(a))."""
import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SineBoxEmbedding"]


class SineBoxEmbedding(nn.Module):
    """``pe = SinePE(xyzr / coord_scale)`` with ``num_feats`` features per coordinate.

    For coordinate c and m = 0..num_feats/2-1, with v_c = xyzr_c / coord_scale_c:
    ``pe[F*c + 2m] = sin(v_c / T^(2m/F))`` and ``pe[F*c + 2m + 1] = cos(v_c / T^(2m/F))``.
    Input ``(..., 4)``, output ``(..., 4*F)``. No parameters; the frequencies (with the
    coordinate scales folded in) and the phases (cos x = sin(x + pi/2)) are built once as
    non-persistent buffers, so the forward is a single ``sin(addcmul(...))``.
    """

    def __init__(
        self,
        *,
        num_feats: int = 64,
        temperature: float = 10000.0,
        coord_scale: Sequence[float] = (1000.0, 1000.0, 1.0, 1.0),
    ):
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"num_feats must be even, got {num_feats}")
        self.num_feats = num_feats
        i = torch.arange(num_feats, dtype=torch.float64)
        dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
        scale = torch.tensor([float(s) for s in coord_scale], dtype=torch.float64)
        freq = 1.0 / (scale[:, None] * dim_t[None, :])  # (C, F)
        phase = (i % 2) * (math.pi / 2)
        self.register_buffer("freq", freq.float(), persistent=False)
        self.register_buffer("phase", phase.float().expand_as(freq).clone(), persistent=False)

    def forward(self, xyzr: Tensor) -> Tensor:
        """(..., 4) -> (..., 4 * num_feats); no gradient is needed (boxes are detached)."""
        return torch.sin(torch.addcmul(self.phase, xyzr.unsqueeze(-1), self.freq)).flatten(-2)

    def rows(self, xyzr: Tensor) -> Tensor:
        """(B, N, 4) -> (B*N, 4 * num_feats), the same values as ``forward`` flattened to rows."""
        return torch.sin(torch.addcmul(self.phase, xyzr.unsqueeze(-1), self.freq)).view(-1, self.freq.numel())
