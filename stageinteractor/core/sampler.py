"""Content-driven multi-scale point samplers (spec §2.5(c), paper App. B, AdaMixer 3-D sampling).

Both samplers turn the content q of every query and its box (xyzr) into G x P sampling points
(x, y in pixels of the padded input, z = log2 scale) and read the G channel groups of the
feature pyramid there:

* level weights: ``w_l = softmax_l(-(pz - c_l)^2 / 2)`` with level centres
  ``c_l = log2(stride_l) + level_offset`` (grouped sampler: offset 1, i.e. the released
  ``pz - 3 - l`` for strides 4..32; 3-D samplers: AdaMixer's ``log2(stride)`` grid with a -1
  initial z bias, so both are the same function at init);
* bilinear sampling (align_corners=False, zero padding) of group g's C/G channels at pixel
  ``(x / stride_l - 0.5, y / stride_l - 0.5)`` of level l (the padded size is
  ``(W_l * stride_l, H_l * stride_l)``), weighted by w_l and summed over the levels.

Output: ``(B*N*G, P, C/G)`` with point index ``k * S + j`` (spatial block k, sub-point j).

Two kernels compute the same values (``sampling_kernel``; "auto" picks per call):

* ``"grid_sample"``: **one** ``F.grid_sample`` per level for all groups and points (groups
  folded into the batch), then the level-weighted sum and one permute into the output order.
  Used on CUDA, for contiguous (NCHW) maps and while tracing / exporting.
* ``"gather"`` (CPU, channels-last maps): a channels-last map ``(B, C, H, W)`` is a table of
  ``B*H*W*G`` rows of C/G contiguous channels (row ``((b*H + y)*W + x)*G + g``, a free view).
  The 4 bilinear corners of every point become 4 row indices and 4 weights (bilinear weight x
  level weight, 0 outside the map), and **one** ``F.embedding_bag(mode="sum")`` per level
  returns the weighted rows summed, directly in the output order. Per row it reads C/G
  adjacent floats instead of gathering them channel by channel, and there is no level sum or
  permute pass: the sampler takes 2.3x less time in the R50-100q decoder on a 2-core CPU
  (``docs/BENCHMARKS.md``).
  Gradients reach the maps (through the table) and the points (through the weights) exactly
  as grid_sample's do.

Training on the CPU in float32 (maps requiring grad; not under autocast, tracing, compile or
export, not for stand-in tensors): both kernels share **one** sparse map gradient per level
among all stages (:mod:`stageinteractor.core.shared_grad`). Each stage's backward scatter-adds
its corners' gradient into an accumulator zero-filled once per backward, instead of a
full-map zero fill plus dense backward per stage and level and autograd's sum of the stages'
dense gradients. Values and point gradients are unchanged (the same forward kernels; the
grid_sample kernel's point gradient comes from the native backward with the map gradient
masked off); the map gradient differs only by summation order. Contiguous maps keep the
grid_sample kernel (the float32 values of the gradient-parity tests stay those of today), on one
per-group channels-last copy made in ``prepare`` (bit-identical, ~3.7x faster at level 0).
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .shared_grad import MapGradSink, bag, collect, grid_sample as shared_grid_sample
from .tracing import is_exporting, is_tracing

__all__ = [
    "SAMPLING_KERNELS",
    "SamplingMaps",
    "PointSampler",
    "GroupedPointSampler",
    "Point3DSampler",
    "num_spatial_blocks",
]

SAMPLING_KERNELS = ("auto", "grid_sample", "gather")


class SamplingMaps(NamedTuple):
    """The feature pyramid prepared once per forward for every stage's sampler
    (:meth:`PointSampler.prepare`). Exactly one of ``folded`` / ``tables`` is non-empty.

    folded: L group-folded maps (B*G, C/G, H_l, W_l) for the grid_sample kernel (else []).
    grid_scales: L (2,) normalisers ``2 / padded size`` (grid_sample kernel; else []).
    tables: L row tables (B*H_l*W_l*G, C/G) of channels-last maps for the gather kernel (else []).
    limits: (L, 2, 1, 1) int64, the largest pixel index (W_l - 1, H_l - 1) per axis.
    rows: (L, 2, 1, 1, 1, 1, 1) int64, the table rows between neighbours along x, y (G, W_l*G).
    base: (L, 2, 1, B, 1, G, 1) int64, the row of pixel (0, 0) of image b, group g (x slot;
        the y slot is 0).
    offsets: cache of embedding_bag offsets (0, 4, 8, ...) per number of points.
    sink: training with the shared map gradient (:mod:`stageinteractor.core.shared_grad`): the
        tables are the collector's outputs and every stage's gather adds its map gradient here.
    """

    folded: List[Tensor]
    grid_scales: List[Tensor]
    tables: List[Tensor]
    limits: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    base: Optional[Tensor] = None
    offsets: Optional[Dict[int, Tensor]] = None
    sink: Optional[MapGradSink] = None


def num_spatial_blocks(num_points: int) -> int:
    """K = 2^floor(log2 sqrt(P)) (paper App. J; the released code): 64 -> 8, 32 -> 4."""
    if num_points < 1 or num_points & (num_points - 1):
        raise ValueError(f"number of points must be a power of two, got {num_points}")
    return 2 ** (int(math.log2(num_points)) // 2)


class PointSampler(nn.Module):
    """Base class: multi-level bilinear sampling of given points (no parameters).

    Subclasses implement :meth:`points`. ``sampling_kernel``: see the module docstring.
    """

    def __init__(
        self,
        *,
        query_dim: int,
        num_groups: int,
        num_points: int,
        strides: Sequence[int],
        level_offset: float,
        sampling_kernel: str = "auto",
    ):
        super().__init__()
        if sampling_kernel not in SAMPLING_KERNELS:
            raise ValueError(f"sampling_kernel must be one of {SAMPLING_KERNELS}, got {sampling_kernel!r}")
        self.query_dim = query_dim
        self.num_groups = num_groups
        self.num_points = num_points
        self.num_blocks = num_spatial_blocks(num_points)
        self.strides = tuple(int(s) for s in strides)
        self.sampling_kernel = sampling_kernel
        centres = torch.tensor([math.log2(s) + level_offset for s in self.strides])
        self.register_buffer("level_centres", centres.view(-1, 1, 1, 1, 1), persistent=False)
        self.register_buffer("level_centres_flat", centres.view(-1, 1, 1, 1), persistent=False)
        self.register_buffer("minus_one", torch.tensor(-1.0), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        # gather kernel: pixel u = x / stride - 0.5 (1 / stride is exact for powers of two);
        # per axis the neighbours floor(u) + (0, 1) with weights (1, 0) + frac(u) * (-1, 1)
        inv = torch.tensor([1.0 / s for s in self.strides])
        self.register_buffer("inv_strides", inv.view(-1, 1, 1), persistent=False)
        self.register_buffer("minus_half", torch.tensor(-0.5), persistent=False)
        self.register_buffer("corner_step", torch.tensor([[0.0], [1.0]]), persistent=False)
        self.register_buffer("tent_base", torch.tensor([[1.0], [0.0]]), persistent=False)
        self.register_buffer("tent_sign", torch.tensor([[-1.0], [1.0]]), persistent=False)

    def generator_blocks(self) -> List[Tuple[str, int]]:
        """Per-group row blocks this sampler needs from the stage's fused generator."""
        raise NotImplementedError

    def init_generator_bias(self, bias: Dict[str, Tensor]) -> None:
        """Initialise this sampler's blocks of the generator bias (views (G, rows), in place)."""
        raise NotImplementedError

    def points(
        self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor, group_major: bool
    ) -> Tuple[Tensor, Tensor]:
        """Return ``xy`` (..., 2) pixels and ``z`` (..., 1), contiguous, with leading dims
        (B, G, N, P') if ``group_major`` else (B, N, G, P'), P' being the P points (possibly
        as K x S)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ maps
    def prepare(self, features: List[Tensor]) -> SamplingMaps:
        """Prepare the (B, C, H_l, W_l) maps once per forward for all stages: row tables for
        the gather kernel, group-folded maps and grid normalisers for grid_sample."""
        shared = self._use_shared_grad(features)
        if self._use_gather(features):
            return self._gather_maps(features, shared_grad=shared)
        if shared and all(f.is_contiguous() for f in features):
            folded, sink = collect(features, self.num_groups, as_tables=False)
            return SamplingMaps(folded=folded, grid_scales=self.grid_scales_for(features), tables=[], sink=sink)
        return SamplingMaps(folded=self.fold(features), grid_scales=self.grid_scales_for(features), tables=[])

    def _use_gather(self, features: List[Tensor]) -> bool:
        kernel = self.sampling_kernel
        if kernel == "grid_sample":
            return False
        if kernel == "gather":
            if is_exporting():
                raise ValueError('sampling_kernel="gather" cannot be traced or exported; use "auto" or "grid_sample"')
            return True
        if is_exporting() or features[0].device.type != "cpu":
            return False
        return all(f.permute(0, 2, 3, 1).is_contiguous() for f in features)

    def _use_shared_grad(self, features: List[Tensor]) -> bool:
        """Training on the CPU in float32 with maps that require grad: one sparse map gradient
        shared by all stages (:mod:`stageinteractor.core.shared_grad`), with the gather kernel
        (channels-last maps, or kernel "gather") or the grid_sample kernel (contiguous maps; the
        same forward and point gradient). Not while tracing / compiling / exporting, under
        autocast, for tensor subclasses (FakeTensor and other stand-ins) or other devices: the
        plain autograd of today's kernels there."""
        if not torch.is_grad_enabled() or is_tracing():
            return False
        if torch.is_autocast_enabled("cpu") or not any(f.requires_grad for f in features):
            return False
        return all(
            type(f) is torch.Tensor and f.device.type == "cpu" and f.dtype == torch.float32 and f.dim() == 4
            and f.shape[1] % self.num_groups == 0
            for f in features
        )

    def _gather_maps(self, features: List[Tensor], shared_grad: bool = False) -> SamplingMaps:
        G = self.num_groups
        B = features[0].shape[0]
        sink = None
        if shared_grad:
            tables, sink = collect(features, G, as_tables=True)
        else:
            # (B, H, W, C) -> rows of C/G channels; a free view of a channels-last map (explicit
            # "gather" on contiguous maps makes one channels-last copy, shared by all stages)
            tables = [f.permute(0, 2, 3, 1).reshape(B * f.shape[2] * f.shape[3] * G, f.shape[1] // G) for f in features]
        limits, rows, base = [], [], []
        for f in features:
            _, C, H, W = f.shape
            limits += [W - 1, H - 1]
            rows += [G, W * G]
            base += [b * H * W * G + g for b in range(B) for g in range(G)] + [0] * (B * G)  # x, y slots
        dev = features[0].device
        L = len(features)
        # one host-built int64 tensor, one non-blocking copy (no host sync), three views
        packed = torch.tensor(limits + rows + base, dtype=torch.int64).to(dev, non_blocking=True)
        lim, step, start = packed.split([2 * L, 2 * L, 2 * L * B * G])
        return SamplingMaps(
            folded=[],
            grid_scales=[],
            tables=tables,
            limits=lim.view(L, 2, 1, 1),
            rows=step.view(L, 2, 1, 1, 1, 1, 1),
            base=start.view(L, 2, 1, B, 1, G, 1),
            offsets={},
            sink=sink,
        )

    # ------------------------------------------------------------------ sampling
    def forward(
        self,
        q: Tensor,
        gen: Dict[str, Tensor],
        xyzr: Tensor,
        wh: Tensor,
        maps: SamplingMaps,
        return_points: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            q: (B*N, D) content; gen: this sampler's generator blocks, each (B*N*G, rows)
                (see :meth:`generator_blocks`); xyzr: (B, N, 4); wh: (B, N, 2) box widths/heights.
            maps: the feature pyramid from :meth:`prepare` (L levels, the strides given at
                construction).
        Returns:
            sampled (B*N*G, P, C/G) and, if ``return_points``, the points (B, N, G, P, 3) (x, y, z).
        """
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        gather = bool(maps.tables)
        xy, z = self.points(q, gen, xyzr, wh, group_major=not gather)
        # level weights, one softmax over the levels: (L, 1, 1, B*N*G*P) for gather (point
        # order b, n, g, p), (L, B*G, 1, N, P) for grid_sample
        if gather:
            dz = z.view(1, 1, 1, -1) - self.level_centres_flat
        else:
            dz = z.view(1, B * G, 1, N, P) - self.level_centres
        weights = torch.addcmul(self.zero, dz, dz, value=-0.5).softmax(0)
        if gather:
            sampled = self._gather(xy, weights, maps)
        else:
            sampled = self._grid_sample(xy, weights, maps)
        pts = None
        if return_points:
            pts = torch.cat([xy.view(*xy.shape[:3], P, 2), z.view(*z.shape[:3], P, 1)], dim=-1)
            if not gather:
                pts = pts.transpose(1, 2)
        return sampled, pts

    def _grid_sample(self, xy: Tensor, weights: Tensor, maps: SamplingMaps) -> Tensor:
        """xy (B, G, N, ..., 2) pixels (the P points), weights (L, B*G, 1, N, P) ->
        (B*N*G, P, C/G)."""
        B, G, N = xy.shape[:3]
        P = self.num_points
        grids = {}
        sampled_levels = []
        for lvl, feat in enumerate(maps.folded):
            scale = maps.grid_scales[lvl]
            grid = grids.get(id(scale))
            if grid is None:
                grid = torch.addcmul(self.minus_one, xy, scale).view(B * G, N, P, 2)
                grids[id(scale)] = grid
            if maps.sink is not None:  # the same kernel, map gradient shared by the stages
                s = shared_grid_sample(feat, grid.to(feat.dtype), maps.sink, lvl)
            else:
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
        return out.view(B, G, Cg, N, P).permute(0, 3, 1, 4, 2).reshape(B * N * G, P, Cg)

    def _gather(self, xy: Tensor, weights: Tensor, maps: SamplingMaps) -> Tensor:
        """xy (B, N, G, ..., 2) pixels (the P points), weights (L, 1, 1, B*N*G*P) ->
        (B*N*G, P, C/G).

        All index/weight tensors are laid out (L, axis, corner, M) with M = B*N*G*P points
        innermost, so that every elementwise op runs over long contiguous rows (broadcast
        constants only vary in the outer dims). Per level and axis: pixel coordinate u, the
        neighbours floor(u) + (0, 1) with weights (1 - frac, frac), zeroed outside the map (zero
        padding; the index is clamped to a valid row); the 2 x 2 corners (y, x) combine them."""
        B, N, G = xy.shape[:3]
        P = self.num_points
        M = B * N * G * P
        L = len(maps.tables)
        xy_planes = xy.view(M, 2).t().contiguous()  # (2, M): x, y
        u = torch.addcmul(self.minus_half, xy_planes, self.inv_strides)  # (L, 2, M)
        u0 = u.floor()
        axis_w = torch.addcmul(self.tent_base, (u - u0).unsqueeze(2), self.tent_sign)  # (L, 2, 2, M)
        corner = u0.unsqueeze(2) + self.corner_step  # (L, 2 axes, 2 corners, M)
        clamped = torch.clamp(corner, min=self.zero, max=maps.limits)
        axis_w = axis_w * (clamped == corner)
        # rows: x -> base(b, g) + x*G, y -> y*W*G
        axis_rows = torch.addcmul(maps.base, clamped.long().view(L, 2, 2, B, N, G, P), maps.rows).view(L, 2, 2, M)
        rx, ry = axis_rows.unbind(1)
        wx, wy = axis_w.unbind(1)
        rows = ry.unsqueeze(2) + rx.unsqueeze(1)  # (L, 2 y, 2 x, M)
        corner_w = (wy.unsqueeze(2) * wx.unsqueeze(1)).mul_(weights)
        # embedding_bag takes the 4 corners of a point contiguous: (L, M*4), bags at 0, 4, 8, ...
        rows = rows.view(L, 4, M).transpose(1, 2).reshape(L, 4 * M)
        corner_w = corner_w.view(L, 4, M).transpose(1, 2).reshape(L, 4 * M)
        offsets = maps.offsets.get(M) if maps.offsets is not None else None
        if offsets is None:
            offsets = torch.arange(0, 4 * M, 4, device=xy.device)
            if maps.offsets is not None:
                maps.offsets[M] = offsets
        if maps.sink is not None:
            return bag(rows, corner_w, offsets, maps.sink, maps.tables).view(B * N * G, P, -1)
        out: Optional[Tensor] = None
        grad = torch.is_grad_enabled()
        for table, r, w in zip(maps.tables, rows.unbind(0), corner_w.to(maps.tables[0].dtype).unbind(0)):
            s = F.embedding_bag(r, table, offsets, mode="sum", per_sample_weights=w)
            out = s if out is None else (out + s if grad else out.add_(s))  # (M, C/G)
        return out.view(B * N * G, P, -1)

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
        sampling_kernel: str = "auto",
    ):
        super().__init__(
            query_dim=query_dim,
            num_groups=num_groups,
            num_points=num_points,
            strides=strides,
            level_offset=1.0,
            sampling_kernel=sampling_kernel,
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

    def points(
        self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor, group_major: bool
    ) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, K, S = self.num_groups, self.num_blocks, self.num_sub
        o1 = gen["offsets"].view(B, N, G, K, 1, 3)
        if self.per_group:
            o2 = gen["sub_offsets"].view(B, N, G, 1, S, 3)
        else:
            o2 = self.gen_double_d(q).view(B, N, 1, 1, S, 3)
        if group_major:
            # one small copy into (B, G, N, ...) order so that every point tensor below is contiguous
            o1, o2 = o1.transpose(1, 2).contiguous(), o2.transpose(1, 2)
            ctr, cz, _ = xyzr.view(B, 1, N, 1, 1, 4).split([2, 1, 1], dim=-1)
            size = wh.view(B, 1, N, 1, 1, 2)
        else:
            ctr, cz, _ = xyzr.view(B, N, 1, 1, 1, 4).split([2, 1, 1], dim=-1)
            size = wh.view(B, N, 1, 1, 1, 2)
        d1xy, d1z = o1.split([2, 1], dim=-1)
        d2xy, d2z = o2.split([2, 1], dim=-1)
        off = torch.addcmul(d1xy, torch.pow(2.0, d1z), d2xy)
        xy = torch.addcmul(ctr, size, off)  # (B, G, N, K, S, 2) or (B, N, G, K, S, 2)
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
        sampling_kernel: str = "auto",
    ):
        super().__init__(
            query_dim=query_dim,
            num_groups=num_groups,
            num_points=num_points,
            strides=strides,
            level_offset=0.0,
            sampling_kernel=sampling_kernel,
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

    def points(
        self, q: Tensor, gen: Dict[str, Tensor], xyzr: Tensor, wh: Tensor, group_major: bool
    ) -> Tuple[Tensor, Tensor]:
        B, N = xyzr.shape[:2]
        G, P = self.num_groups, self.num_points
        o = gen["offsets"].view(B, N, G, P, 3)
        if group_major:
            o = o.transpose(1, 2).contiguous()  # (B, G, N, P, 3)
            ctr, cz, _ = xyzr.view(B, 1, N, 1, 4).split([2, 1, 1], dim=-1)
            size = wh.view(B, 1, N, 1, 2)
        else:
            ctr, cz, _ = xyzr.view(B, N, 1, 1, 4).split([2, 1, 1], dim=-1)
            size = wh.view(B, N, 1, 1, 2)
        dxy, dz = o.split([2, 1], dim=-1)
        xy = torch.addcmul(ctr, size, dxy)
        return xy, cz + dz
