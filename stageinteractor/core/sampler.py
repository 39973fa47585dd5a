"""Content-driven multi-scale point samplers (spec §2.5(c), paper App. B, AdaMixer 3-D sampling).

Both samplers turn the content q of every query and its box (xyzr) into G x P sampling points
(x, y in pixels of the padded input, z = log2 scale) and read the G channel groups of the
feature pyramid there:

* level weights: ``w_l = softmax_l(-(pz - c_l)^2 / 2)`` with level centres
  ``c_l = log2(stride_l) + level_offset`` (grouped sampler: offset 1, i.e. the released
  ``pz - 3 - l`` for strides 4..32; 3-D samplers: AdaMixer's ``log2(stride)`` grid with a -1
  initial z bias, so both are the same function at init);
* bilinear ``grid_sample`` (align_corners=False, zero padding) of group g's C/G channels,
  coordinates normalised by the padded size ``(W_l * stride_l, H_l * stride_l)``; **one**
  grid_sample call per level for all groups and points (groups are folded into the batch).

Output: ``(B*N*G, P, C/G)`` with point index ``k * S + j`` (spatial block k, sub-point j).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PointSampler", "GroupedPointSampler", "Point3DSampler", "num_spatial_blocks"]


def num_spatial_blocks(num_points: int) -> int:
    """K = 2^floor(log2 sqrt(P)) (paper App. J; the released code): 64 -> 8, 32 -> 4."""
    if num_points < 1 or num_points & (num_points - 1):
        raise ValueError(f"number of points must be a power of two, got {num_points}")
    return 2 ** (int(math.log2(num_points)) // 2)


class PointSampler(nn.Module):
    """Base class: multi-level bilinear sampling of given points (no parameters).

    Subclasses implement :meth:`points`.
    """

    def __init__(
        self,
        *,
        query_dim: int,
        num_groups: int,
        num_points: int,
        strides: Sequence[int],
        level_offset: float,
    ):
        super().__init__()
        self.query_dim = query_dim
        self.num_groups = num_groups
        self.num_points = num_points
        self.num_blocks = num_spatial_blocks(num_points)
        self.strides = tuple(int(s) for s in strides)
        centres = torch.tensor([math.log2(s) + level_offset for s in self.strides])
        self.register_buffer("level_centres", centres.view(-1, 1, 1, 1, 1), persistent=False)

    def points(self, q: Tensor, xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        """Return ``(xy (B, G, N, P, 2) pixels, z (B, G, N, P, 1))``."""
        raise NotImplementedError

    def forward(
        self, q: Tensor, xyzr: Tensor, wh: Tensor, features: List[Tensor], return_points: bool = False
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            q: (B*N, D) content; xyzr: (B, N, 4); wh: (B, N, 2) box widths/heights.
            features: L maps (B, C, H_l, W_l) with the strides given at construction.
        Returns:
            sampled (B*N*G, P, C/G) and, if ``return_points``, the points (B, N, G, P, 3) (x, y, z).
        """
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        xy, z = self.points(q, xyzr, wh)
        # level weights (L, B*G, 1, N, P), one softmax over levels
        logit = (z.reshape(1, B * G, 1, N, P) - self.level_centres).square().mul(-0.5)
        weight = logit.softmax(0)
        grids = {}
        out = None
        for lvl, feat in enumerate(features):
            H, W = feat.shape[-2:]
            size = (W * self.strides[lvl], H * self.strides[lvl])
            grid = grids.get(size)
            if grid is None:
                scale = xy.new_tensor([2.0 / size[0], 2.0 / size[1]])
                grid = torch.addcmul(xy.new_tensor(-1.0), xy, scale).reshape(B * G, N, P, 2)
                grids[size] = grid
            fmap = feat.view(B * G, -1, H, W)
            s = F.grid_sample(
                fmap, grid.to(fmap.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
            )  # (B*G, C/G, N, P)
            out = s * weight[lvl] if out is None else torch.addcmul(out, s, weight[lvl])
        Cg = out.shape[1]
        sampled = out.view(B, G, Cg, N, P).permute(0, 3, 1, 4, 2).reshape(B * N * G, P, Cg)
        pts = None
        if return_points:
            pts = torch.cat([xy, z], dim=-1).transpose(1, 2)
        return sampled, pts


class GroupedPointSampler(PointSampler):
    """Two-level grouped sampler (paper Code 2, released code).

    ``gen_one_d``: Linear(D -> G*K*3), per (g, k) an offset (dx0, dy0, dz0) (layout g, k, xyz).
    ``gen_double_d``: Linear(D -> S*3) per sub-point j (dx1, dy1, dz1), shared by all groups
    (``subpoint_offsets="shared"``, released) or Linear(D -> G*S*3) (``"per_group"``, paper).
    Point (g, k, j): ``px = x + w*(dx0 + 2^dz0 * dx1)``, ``py = y + h*(dy0 + 2^dz0 * dy1)``,
    ``pz = z + dz0 + dz1``.
    """

    def __init__(
        self,
        *,
        query_dim: int = 256,
        num_groups: int = 4,
        num_points: int = 32,
        strides: Sequence[int] = (4, 8, 16, 32),
        subpoint_offsets: str = "shared",
    ):
        super().__init__(
            query_dim=query_dim, num_groups=num_groups, num_points=num_points, strides=strides, level_offset=1.0
        )
        self.num_sub = num_points // self.num_blocks
        self.per_group = subpoint_offsets == "per_group"
        self.gen_one_d = nn.Linear(query_dim, 3 * num_groups * self.num_blocks)
        self.gen_double_d = nn.Linear(query_dim, 3 * self.num_sub * (num_groups if self.per_group else 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §5: zero weights; dx0, dy0 ~ U(±0.5); sub-points j>=1 U(±0.5/√2), j=0 at 0; dz = 0."""
        nn.init.zeros_(self.gen_one_d.weight)
        nn.init.zeros_(self.gen_double_d.weight)
        with torch.no_grad():
            b1 = self.gen_one_d.bias.view(-1, 3)
            b1.zero_()
            b1[:, :2].uniform_(-0.5, 0.5)
            b2 = self.gen_double_d.bias.view(-1, self.num_sub, 3)
            b2.zero_()
            bw = 0.5 / math.sqrt(2.0)
            b2[:, 1:, :2].uniform_(-bw, bw)

    def points(self, q: Tensor, xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, K, S = self.num_groups, self.num_blocks, self.num_sub
        o1 = self.gen_one_d(q).view(B, N, G, K, 1, 3).transpose(1, 2)  # (B, G, N, K, 1, 3)
        if self.per_group:
            o2 = self.gen_double_d(q).view(B, N, G, 1, S, 3).transpose(1, 2)
        else:
            o2 = self.gen_double_d(q).view(B, 1, N, 1, S, 3)
        box = xyzr.view(B, 1, N, 1, 1, 4)
        off = torch.addcmul(o1[..., :2], torch.pow(2.0, o1[..., 2:]), o2[..., :2])
        xy = torch.addcmul(box[..., :2], wh.view(B, 1, N, 1, 1, 2), off)
        z = box[..., 2:3] + o1[..., 2:] + o2[..., 2:]
        return xy.reshape(B, G, N, K * S, 2), z.reshape(B, G, N, K * S, 1)


class Point3DSampler(PointSampler):
    """AdaMixer's 3-D sampler: ``offset_generator`` = Linear(D -> G*P*3) gives every point its own
    (dx, dy, dz); ``px = x + w*dx``, ``py = y + h*dy``, ``pz = z + dz`` (layout g, p, xyz).

    Init (AdaMixer): zero weight; xy bias on a regular sqrt(P) x sqrt(P) grid in [-0.5, 0.5]
    when P is a square, else U(±0.5); z bias -1 (the level grid is log2(stride)).
    ``group_init=True`` (paper Tab. 17 "Group init."): the xy bias is instead drawn like the
    grouped sampler's initial points, ``dx0_{g,k} + dx1_j`` (j = 0 at the block centre).
    """

    def __init__(
        self,
        *,
        query_dim: int = 256,
        num_groups: int = 4,
        num_points: int = 32,
        strides: Sequence[int] = (4, 8, 16, 32),
        group_init: bool = False,
    ):
        super().__init__(
            query_dim=query_dim, num_groups=num_groups, num_points=num_points, strides=strides, level_offset=0.0
        )
        self.group_init = group_init
        self.offset_generator = nn.Linear(query_dim, 3 * num_groups * num_points)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_generator.weight)
        G, P = self.num_groups, self.num_points
        with torch.no_grad():
            bias = self.offset_generator.bias.view(G, P, 3)
            bias.zero_()
            if self.group_init:
                K = self.num_blocks
                S = P // K
                centre = torch.empty(G, K, 1, 2).uniform_(-0.5, 0.5)
                bw = 0.5 / math.sqrt(2.0)
                sub = torch.empty(1, 1, S, 2).uniform_(-bw, bw)
                sub[:, :, 0] = 0
                bias[..., :2] = (centre + sub).reshape(G, P, 2)
            else:
                h = int(round(math.sqrt(P)))
                if h * h == P:
                    v = torch.linspace(-0.5, 0.5, h + 1)[:-1] + 0.5 / h
                    bias[..., 0] = v.view(h, 1).expand(h, h).reshape(P)
                    bias[..., 1] = v.view(1, h).expand(h, h).reshape(P)
                else:
                    bias[..., :2].uniform_(-0.5, 0.5)
            bias[..., 2] = -1.0

    def points(self, q: Tensor, xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        o = self.offset_generator(q).view(B, N, G, P, 3).transpose(1, 2)  # (B, G, N, P, 3)
        box = xyzr.view(B, 1, N, 1, 4)
        xy = torch.addcmul(box[..., :2], wh.view(B, 1, N, 1, 2), o[..., :2])
        z = box[..., 2:3] + o[..., 2:]
        return xy, z
