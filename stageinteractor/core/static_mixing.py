"""Static (query-independent) mixing layers inserted between two dynamic channel mixings
(paper App. A Code 1, released ``subbox_local_list`` / ``axis_atten_list``).

One :class:`StaticMixing` per reused filter, shared by the G channel groups and all queries.
It returns ``residual + static(x)`` for x, residual of shape (M, P, C), with P = K * S points
(k-major: point index k * S + j).

kinds (paper Tab. 16):

* ``"channel_spatial"`` (released): ``intra`` = Linear(S*C -> S*C) on x viewed (M*K, S*C) (mixes
  the S sub-points and channels inside each spatial block k) plus ``inter`` = Linear(K*C -> K*C)
  on x viewed (M, S, K*C) after swapping the K and S axes (mixes the K blocks for each j).
* ``"channel"``: ``channel`` = Linear(C -> C) applied to every point.
* ``"spatial"``: ``spatial`` = Linear(P -> P) over the point axis, applied to every channel.

All weights and biases are zero-initialised (spec §5), so at init the output is ``residual``.
The Linears are :class:`~stageinteractor.core.gemm.Linear` (oneDNN products on CPU float32).
"""
import torch
from torch import Tensor, nn

from .gemm import Linear, linear

__all__ = ["StaticMixing"]

STATIC_KINDS = ("channel", "spatial", "channel_spatial")


class StaticMixing(nn.Module):
    def __init__(self, *, kind: str, num_points: int, num_blocks: int, channels: int):
        super().__init__()
        if kind not in STATIC_KINDS:
            raise ValueError(f"static_mixing must be one of {STATIC_KINDS}, got {kind!r}")
        if num_points % num_blocks:
            raise ValueError(f"num_points ({num_points}) must be divisible by num_blocks ({num_blocks})")
        self.kind = kind
        self.num_points = num_points
        self.num_blocks = num_blocks
        self.num_sub = num_points // num_blocks
        self.channels = channels
        if kind == "channel_spatial":
            self.intra = Linear(self.num_sub * channels, self.num_sub * channels)
            self.inter = Linear(num_blocks * channels, num_blocks * channels)
        elif kind == "channel":
            self.channel = Linear(channels, channels)
        else:
            self.spatial = Linear(num_points, num_points)
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x, residual: (M, P, C). Returns ``residual + static(x)`` (M, P, C), contiguous.

        "channel_spatial": ``intra`` is one GEMM on x viewed (M*K, S*C); ``inter`` one GEMM on
        the K/S-swapped copy of x viewed (M*S, K*C), added back through a transposed view (the
        sum of the two is contiguous in the k-major layout, so the final view is free)."""
        M = x.shape[0]
        K, S, C = self.num_blocks, self.num_sub, self.channels
        if self.kind == "channel_spatial":
            intra = linear(x.view(M * K, S * C), self.intra.weight, self.intra.bias).view(M, K, S, C)
            xt = x.view(M, K, S, C).transpose(1, 2).contiguous().view(M * S, K * C)
            inter = linear(xt, self.inter.weight, self.inter.bias).view(M, S, K, C).transpose(1, 2)
            # in place on the intra GEMM's output (its backward does not need it): same sums,
            # no two extra (M, P, C) buffers
            return intra.add_(inter).view(M, self.num_points, C).add_(residual)
        if self.kind == "channel":
            return residual + linear(x, self.channel.weight, self.channel.bias)
        return residual + torch.matmul(self.spatial.weight, x) + self.spatial.bias.unsqueeze(-1)
