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
from typing import Dict, List, Optional, Sequence, Tuple

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
        self.register_buffer("minus_one", torch.tensor(-1.0), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    def generator_blocks(self) -> List[Tuple[str, int]]:
        """Per-group row blocks this sampler needs from the stage's fused generator."""
        raise NotImplementedError

    def init_generator_bias(self, bias: Dict[str, Tensor]) -> None:
        """Initialise this sampler's blocks of the generator bias (views (G, rows), in place)."""
        raise NotImplementedError

    def points(self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        """Return ``xy`` (B, G, N, ..., 2) pixels and ``z`` (B, G, N, ..., 1), the dots being the
        P points (possibly as K x S)."""
        raise NotImplementedError

    def forward(
        self,
        q: Tensor,
        gen: Dict[str, Tensor],
        xyzr: Tensor,
        wh: Tensor,
        features: List[Tensor],
        grid_scales: Optional[List[Tensor]] = None,
        return_points: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            q: (B*N, D) content; gen: this sampler's generator blocks, each (B*N*G, rows)
                (see :meth:`generator_blocks`); xyzr: (B, N, 4); wh: (B, N, 2) box widths/heights.
            features: L maps with the strides given at construction, **group-folded**:
                (B*G, C/G, H_l, W_l) (see :meth:`fold`; a free view of (B, C, H_l, W_l)).
            grid_scales: optional per-level (2,) tensors ``(2 / (W_l*stride_l), 2 / (H_l*stride_l))``
                (see :meth:`grid_scales_for`); levels sharing the same tensor object share one grid.
        Returns:
            sampled (B*N*G, P, C/G) and, if ``return_points``, the points (B, N, G, P, 3) (x, y, z).
        """
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        if grid_scales is None:
            grid_scales = self.grid_scales_for(features)
        xy, z = self.points(q, gen, xyzr, wh)
        # level weights (L, B*G, 1, N, P): one softmax over the levels
        dz = z.reshape(1, B * G, 1, N, P) - self.level_centres
        weights = torch.addcmul(self.zero, dz, dz, value=-0.5).softmax(0)
        grids = {}
        sampled_levels = []
        for lvl, feat in enumerate(features):
            scale = grid_scales[lvl]
            grid = grids.get(id(scale))
            if grid is None:
                grid = torch.addcmul(self.minus_one, xy, scale).view(B * G, N, P, 2)
                grids[id(scale)] = grid
            s = F.grid_sample(
                feat, grid.to(feat.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
            )  # (B*G, C/G, N, P)
            sampled_levels.append(s)
        # weighted sum over levels, accumulated in place into the first level's buffer
        # (no stacked (L, B*G, C/G, N, P) copy; in training autograd keeps what it needs)
        w = weights.unbind(0)
        out = sampled_levels[0].mul_(w[0]) if not torch.is_grad_enabled() else sampled_levels[0] * w[0]
        for lvl in range(1, len(sampled_levels)):
            out = out.addcmul_(sampled_levels[lvl], w[lvl])
        Cg = out.shape[1]
        sampled = out.view(B, G, Cg, N, P).permute(0, 3, 1, 4, 2).reshape(B * N * G, P, Cg)
        pts = None
        if return_points:
            pts = torch.cat([xy.view(B, G, N, P, 2), z.view(B, G, N, P, 1)], dim=-1).transpose(1, 2)
        return sampled, pts

    def fold(self, features: List[Tensor]) -> List[Tensor]:
        """(B, C, H, W) maps -> (B*G, C/G, H, W) (group g = channels [g*C/G, (g+1)*C/G)).

        A free view for contiguous maps, and for channels-last maps of batch 1 (the channels of a
        pixel stay adjacent: ``grid_sample`` then reads each corner's C/G channels from one or two
        cache lines, 3-4x faster than from C/G planes). Channels-last maps of batch > 1 are copied
        once into per-group channels-last order (B, G, H, W, C/G), shared by all stages."""
        G = self.num_groups
        out = []
        for f in features:
            B, C, H, W = f.shape
            if f.dim() == 4 and C > 1 and not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
                if B == 1 and not torch.jit.is_tracing():  # one view op (as_strided is not exported)
                    out.append(f.as_strided((G, C // G, H, W), (C // G, 1, W * C, C), f.storage_offset()))
                    continue
                hwc = f.permute(0, 2, 3, 1)  # (B, H, W, C) contiguous
                if B == 1:
                    out.append(hwc.view(H, W, G, C // G).permute(2, 3, 0, 1))
                else:
                    grouped = hwc.reshape(B, H, W, G, C // G).permute(0, 3, 1, 2, 4).contiguous()
                    out.append(grouped.view(B * G, H, W, C // G).permute(0, 3, 1, 2))
            else:
                out.append(f.view(B * G, C // G, H, W))
        return out

    def grid_scales_for(self, features: List[Tensor]) -> List[Tensor]:
        """Per-level (2,) normalisers ``2 / padded size`` (one tensor per distinct padded size)."""
        cache = {}
        scales = []
        for lvl, feat in enumerate(features):
            H, W = feat.shape[-2:]
            size = (int(W) * self.strides[lvl], int(H) * self.strides[lvl])
            if size not in cache:
                if torch.jit.is_tracing():
                    # ONNX/TorchScript export: from the traced shape (W, H), so that the exported
                    # graph keeps the input size symbolic instead of baking the trace-time size
                    wh = torch._shape_as_tensor(feat)[-2:].flip(0).to(feat.device, torch.float32)
                    cache[size] = 2.0 / (wh * float(self.strides[lvl]))
                else:
                    # host-built, non-blocking copy (new_tensor would block the host)
                    cache[size] = torch.tensor([2.0 / size[0], 2.0 / size[1]], dtype=torch.float32).to(
                        feat.device, non_blocking=True
                    )
            scales.append(cache[size])
        return scales


class GroupedPointSampler(PointSampler):
    """Two-level grouped sampler (paper Code 2, released code).

    Generator block ``offsets`` (official ``gen_one_d``): per group 3*K rows, per (g, k) an
    offset (dx0, dy0, dz0) (layout g, k, xyz). Sub-point offsets (official ``gen_double_d``):
    ``gen_double_d`` = Linear(D -> S*3), per sub-point j (dx1, dy1, dz1), shared by all groups
    (``subpoint_offsets="shared"``, released), or the per-group generator block ``sub_offsets``
    (3*S rows per group, ``"per_group"``, paper Code 2).
    Point (g, k, j): ``px = x + w*(dx0 + 2^dz0 * dx1)``, ``py = y + h*(dy0 + 2^dz0 * dy1)``,
    ``pz = z + dz0 + dz1``.
    Init (spec §5): zero weights; dx0, dy0 ~ U(±0.5); sub-points j >= 1 U(±0.5/√2), j = 0 at
    the block centre; all dz = 0.
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
        self.gen_double_d = None if self.per_group else nn.Linear(query_dim, 3 * self.num_sub)
        if self.gen_double_d is not None:
            nn.init.zeros_(self.gen_double_d.weight)
            with torch.no_grad():
                self._init_sub(self.gen_double_d.bias.view(1, -1))

    def _init_sub(self, bias: Tensor) -> None:
        b = bias.view(bias.shape[0], self.num_sub, 3)
        b.zero_()
        bw = 0.5 / math.sqrt(2.0)
        b[:, 1:, :2].uniform_(-bw, bw)

    def generator_blocks(self) -> List[Tuple[str, int]]:
        blocks = [("offsets", 3 * self.num_blocks)]
        if self.per_group:
            blocks.append(("sub_offsets", 3 * self.num_sub))
        return blocks

    def init_generator_bias(self, bias: Dict[str, Tensor]) -> None:
        b1 = bias["offsets"].view(self.num_groups, self.num_blocks, 3)
        b1.zero_()
        b1[..., :2].uniform_(-0.5, 0.5)
        if self.per_group:
            self._init_sub(bias["sub_offsets"])

    def points(self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, K, S = self.num_groups, self.num_blocks, self.num_sub
        # one small copy into (B, G, N, ...) order so that every point tensor below is contiguous
        o1 = gen["offsets"].view(B, N, G, K, 1, 3).transpose(1, 2).contiguous()  # (B, G, N, K, 1, 3)
        if self.per_group:
            o2 = gen["sub_offsets"].view(B, N, G, 1, S, 3).transpose(1, 2)
        else:
            o2 = self.gen_double_d(q).view(B, 1, N, 1, S, 3)
        d1xy, d1z = o1.split([2, 1], dim=-1)
        d2xy, d2z = o2.split([2, 1], dim=-1)
        ctr, cz, _ = xyzr.view(B, 1, N, 1, 1, 4).split([2, 1, 1], dim=-1)
        off = torch.addcmul(d1xy, torch.pow(2.0, d1z), d2xy)
        xy = torch.addcmul(ctr, wh.view(B, 1, N, 1, 1, 2), off)  # (B, G, N, K, S, 2)
        z = cz + d1z + d2z
        return xy, z


class Point3DSampler(PointSampler):
    """AdaMixer's 3-D sampler: generator block ``offsets`` (AdaMixer's
    ``sampling_offset_generator``, per group 3*P rows, layout g, p, xyz) gives every point its
    own (dx, dy, dz); ``px = x + w*dx``, ``py = y + h*dy``, ``pz = z + dz``.

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

    def generator_blocks(self) -> List[Tuple[str, int]]:
        return [("offsets", 3 * self.num_points)]

    def init_generator_bias(self, bias: Dict[str, Tensor]) -> None:
        G, P = self.num_groups, self.num_points
        b = bias["offsets"].view(G, P, 3)
        b.zero_()
        if self.group_init:
            K = self.num_blocks
            S = P // K
            centre = torch.empty(G, K, 1, 2).uniform_(-0.5, 0.5)
            bw = 0.5 / math.sqrt(2.0)
            sub = torch.empty(1, 1, S, 2).uniform_(-bw, bw)
            sub[:, :, 0] = 0
            b[..., :2] = (centre + sub).reshape(G, P, 2)
        else:
            h = int(round(math.sqrt(P)))
            if h * h == P:
                v = torch.linspace(-0.5, 0.5, h + 1)[:-1] + 0.5 / h
                b[..., 0] = v.view(h, 1).expand(h, h).reshape(P)
                b[..., 1] = v.view(1, h).expand(h, h).reshape(P)
            else:
                b[..., :2].uniform_(-0.5, 0.5)
        b[..., 2] = -1.0

    def points(self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        o = gen["offsets"].view(B, N, G, P, 3).transpose(1, 2).contiguous()  # (B, G, N, P, 3)
        dxy, dz = o.split([2, 1], dim=-1)
        ctr, cz, _ = xyzr.view(B, 1, N, 1, 4).split([2, 1, 1], dim=-1)
        xy = torch.addcmul(ctr, wh.view(B, 1, N, 1, 2), dxy)
        return xy, cz + dz
