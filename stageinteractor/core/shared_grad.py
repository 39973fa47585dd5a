"""One sparse map gradient shared by every decoder stage's point sampling (CPU training).

Every stage samples the same L feature maps. With plain autograd each stage's sampling backward
(``grid_sampler_2d_backward`` / ``embedding_bag``'s dense backward) zero-fills a gradient the
size of every map and autograd then adds the stages' dense gradients map by map, although each
stage touches only a few rows (200 queries x 4 groups x 32 points x 4 corners per level). Here:

* :func:`collect` runs once per forward (``PointSampler.prepare``): an identity-like autograd
  Function from the L maps (B, C, H, W) to what the stages sample from: row tables
  (B*H*W*G, C/G) for :func:`bag` (a free view of a channels-last map, one channels-last copy of
  a contiguous one) or group-folded maps (B*G, C/G, H, W) over one per-group channels-last copy
  for :func:`grid_sample`. Every stage samples from its outputs, so autograd runs its backward only after all stages' backwards: it hands each map
  the accumulated gradient (in the map's layout: a channels-last view, or one blocked transpose
  copy for a contiguous map; plus any dense gradient that reached the maps some other way) and
  resets the accumulator.
* :func:`bag` is one stage's sampling: per level ``F.embedding_bag(mode="sum")`` of 4 weighted
  corner rows per point, summed over the levels. Its backward returns the exact gradient of
  the corner weights (``_embedding_bag_per_sample_weights_backward``: per corner the dot
  product of the output gradient and the table row) and scatter-adds ``weight x output
  gradient`` into the shared per-level accumulator (``index_add_`` on the (rows, C/G) table
  shape; zero-filled once per backward, on first use) instead of returning a map gradient.
* :func:`grid_sample` is one level of one stage's grid_sample kernel: the native forward; its
  backward takes the point gradient from the native backward with the map gradient masked off
  (bit-identical to plain autograd's) and scatter-adds the map gradient likewise.

Robustness: the stage backward adds to the accumulator only if the engine will run the
collector in this backward (``torch.autograd.grad`` with inputs that exclude the maps leaves it
out), the collector takes the accumulator and clears it (``retain_graph`` and repeated
backwards start from zero), maps that do not require grad get no accumulator, stages whose
backward does not run add nothing. The Functions are once-differentiable.
"""
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["MapGradSink", "collect", "bag", "grid_sample"]

_MODE_SUM = 0  # embedding_bag mode code of "sum"


class MapGradSink:
    """The shared state of one prepared pyramid.

    acc: per level a (rows, C/G) gradient accumulator (None: no stage backward has added yet in
        this backward, or the level's map needs no gradient).
    needs: per level whether the map requires grad.
    node: the collector's autograd node (asked whether this backward will run it).
    bags: cache of the point index of every corner, ``arange(M).repeat_interleave(4)``, per M.
    """

    __slots__ = ("acc", "needs", "node", "bags", "__weakref__")

    def __init__(self, needs: Sequence[bool]):
        self.acc: Optional[List[Optional[Tensor]]] = None
        self.needs = list(needs)
        self.node = None
        self.bags: Dict[int, Tensor] = {}

    def accumulator(self, level: int, rows: int, like: Tensor) -> Tensor:
        """Level ``level``'s (rows, C/G) accumulator (C/G, dtype and device of ``like`` (..., C/G)),
        zero-filled on its first use in a backward."""
        if self.acc is None:
            self.acc = [None] * len(self.needs)
        a = self.acc[level]
        if a is None:
            a = self.acc[level] = like.new_zeros(rows, like.shape[-1])
        return a

    def will_collect(self) -> bool:
        """Whether the collector runs in the backward now in progress."""
        return self.node is not None and torch._C._will_engine_execute_node(self.node)

    def point_of_corner(self, num_points: int, device: torch.device) -> Tensor:
        b = self.bags.get(num_points)
        if b is None:
            b = torch.arange(num_points, device=device).repeat_interleave(4)
            self.bags[num_points] = b
        return b


class _Collect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sink: MapGradSink, num_groups: int, as_tables: bool, *maps: Tensor) -> Tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        # a weak reference: the sink holds this node (no reference cycle); the stages hold the sink
        ctx.sink, ctx.num_groups, ctx.as_tables = weakref.ref(sink), num_groups, as_tables
        ctx.shapes = [m.shape for m in maps]
        ctx.contiguous = [m.is_contiguous() for m in maps]
        G = num_groups
        out = []
        for m in maps:
            B, C, H, W = m.shape
            if as_tables:
                hwc = m.permute(0, 2, 3, 1)
                if not hwc.is_contiguous():
                    hwc = hwc.contiguous()  # NCHW -> channels-last, once per forward
                out.append(hwc.view(B * H * W * G, C // G))
            else:
                # per-group channels-last copy (B, G, H, W, C/G) made by B*G 2-D blocked transposes
                # (C/G, H*W) -> (H*W, C/G); returned as the folded (B*G, C/G, H, W) view
                Cg = C // G
                grouped = m.new_empty(B, G, H, W, Cg)
                for b in range(B):
                    for g in range(G):
                        grouped[b, g].view(H * W, Cg).copy_(m[b, g * Cg:(g + 1) * Cg].reshape(Cg, H * W).t())
                out.append(grouped.view(B * G, H, W, Cg).permute(0, 3, 1, 2))
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[Tensor]):
        sink = ctx.sink()
        acc = None
        if sink is not None:
            acc, sink.acc = sink.acc, None
        out: List[Optional[Tensor]] = []
        for lvl, (g, shape) in enumerate(zip(grads, ctx.shapes)):
            a = acc[lvl] if acc is not None else None
            if not ctx.needs_input_grad[3 + lvl] or (a is None and g is None):
                out.append(None)
                continue
            B, C, H, W = shape
            if a is not None:
                if ctx.as_tables:
                    a = _tables_to_map(a, shape, ctx.contiguous[lvl])
                else:
                    a = _grouped_to_map(a, shape, ctx.num_groups)
            if g is not None:  # a dense gradient that reached the collector's output directly
                if ctx.as_tables:
                    g = g.reshape(B, H, W, C).permute(0, 3, 1, 2)
                else:
                    g = g.reshape(B, C, H, W)
                a = g if a is None else a.add_(g)
            out.append(a)
        return (None, None, None, *out)


def _tables_to_map(acc: Tensor, shape: torch.Size, contiguous: bool) -> Tensor:
    """A (B*H*W*G, C/G) table-row accumulator as the gradient of a (B, C, H, W) map: a
    channels-last view, or for a contiguous map a contiguous copy made image by image as 2-D
    transposes (H*W, C) -> (C, H*W), which take torch's blocked transpose copy (7x faster than
    ``.contiguous()`` of the 4-D channels-last view at (2, 256, 200, 304) on one thread)."""
    B, C, H, W = shape
    if not contiguous:
        return acc.view(B, H, W, C).permute(0, 3, 1, 2)
    src = acc.view(B, H * W, C)
    out = acc.new_empty(B, C, H, W)
    for b in range(B):
        out[b].view(C, H * W).copy_(src[b].t())
    return out


def _grouped_to_map(acc: Tensor, shape: torch.Size, num_groups: int) -> Tensor:
    """A (B*G*H*W, C/G) accumulator in per-group channels-last order (B, G, H, W, C/G) as the
    contiguous (B, C, H, W) gradient of a map: B*G blocked 2-D transposes."""
    B, C, H, W = shape
    G, Cg = num_groups, C // num_groups
    src = acc.view(B, G, H * W, Cg)
    out = acc.new_empty(B, C, H, W)
    for b in range(B):
        for g in range(G):
            out[b, g * Cg:(g + 1) * Cg].view(Cg, H * W).copy_(src[b, g].t())
    return out


def _scatter(acc: Tensor, rows: Tensor, weights: Tensor, grad: Tensor) -> None:
    """``acc[rows[i]] += (grad * weights)[i]`` over the R = len(rows) corners: ``grad * weights``
    broadcasts to R rows of C/G (acc (rows, C/G)); one index_add_."""
    acc.index_add_(0, rows, (grad * weights).view(rows.shape[0], grad.shape[-1]))


class _Bag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weights: Tensor, offsets: Tensor, sink: MapGradSink, *tables: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        out: Optional[Tensor] = None
        for table, r, w in zip(tables, rows.unbind(0), weights.unbind(0)):
            s = F.embedding_bag(r, table, offsets, mode="sum", per_sample_weights=w)
            out = s if out is None else out.add_(s)
        ctx.save_for_backward(rows, weights, offsets, *tables)
        ctx.sink = sink
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[Tensor]):
        rows, weights, offsets, *tables = ctx.saved_tensors
        nones = [None] * len(tables)
        if grad is None:
            return (None, None, None, None, *nones)
        grad = grad.contiguous()
        M, Cg = grad.shape
        sink: MapGradSink = ctx.sink
        grad_w = None
        if ctx.needs_input_grad[1]:
            bags = sink.point_of_corner(M, grad.device)
            grad_w = torch.stack(
                [
                    torch.ops.aten._embedding_bag_per_sample_weights_backward(
                        grad, t, r, offsets, bags, _MODE_SUM, -1
                    )
                    for t, r in zip(tables, rows.unbind(0))
                ]
            )
        needs = [ctx.needs_input_grad[4 + lvl] and sink.needs[lvl] for lvl in range(len(tables))]
        if any(needs) and sink.will_collect():
            g3 = grad.view(M, 1, Cg)
            for lvl, (t, r, w) in enumerate(zip(tables, rows.unbind(0), weights.unbind(0))):
                if needs[lvl]:
                    _scatter(sink.accumulator(lvl, t.shape[0], t), r, w.view(M, 4, 1).to(grad.dtype), g3)
        return (None, grad_w, None, None, *nones)


class _GridSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat: Tensor, grid: Tensor, sink: MapGradSink, level: int) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(feat, grid)
        ctx.sink, ctx.level = sink, level
        return torch.grid_sampler_2d(feat, grid, 0, 0, False)  # bilinear, zeros, align_corners=False

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[Tensor]):
        if grad is None:
            return None, None, None, None
        feat, grid = ctx.saved_tensors
        sink: MapGradSink = ctx.sink
        grad_grid = None
        if ctx.needs_input_grad[1]:
            # the native kernel, map gradient masked off (no full-map zero fill)
            grad_grid = torch.ops.aten.grid_sampler_2d_backward(grad, feat, grid, 0, 0, False, [False, True])[1]
        if ctx.needs_input_grad[0] and sink.needs[ctx.level] and sink.will_collect():
            BG, Cg, H, W = feat.shape
            _, n, p, _ = grid.shape
            M = BG * n * p
            with torch.no_grad():
                # pixel u = ((x + 1) * size - 1) / 2 per axis (align_corners=False), corners
                # floor(u) + (0, 1) with weights (1 - frac, frac), zero outside the map
                size = torch.tensor([W, H], dtype=grid.dtype, device=grid.device)
                u = ((grid.reshape(M, 2) + 1) * size - 1) * 0.5
                u0 = u.floor()
                frac = u - u0
                i0 = u0.long()
                wts, idx = [], []
                for d, last in ((0, W - 1), (1, H - 1)):
                    i = torch.stack([i0[:, d], i0[:, d] + 1])  # (2, M)
                    w = torch.stack([1 - frac[:, d], frac[:, d]])
                    inside = (i >= 0) & (i <= last)
                    wts.append(w * inside)
                    idx.append(i.clamp(0, last))
                # accumulator row of pixel (y, x) of folded map bg = b*G + g: (bg*H + y)*W + x
                base = torch.arange(0, BG * H * W, H * W, device=grid.device).repeat_interleave(n * p)
                rows = (base + idx[1].unsqueeze(1) * W + idx[0].unsqueeze(0)).view(4, M)
                cw = (wts[1].unsqueeze(1) * wts[0].unsqueeze(0)).view(4, M, 1).to(grad.dtype)
                src = grad.permute(0, 2, 3, 1).reshape(1, M, Cg)  # point order (bg, n, p)
                acc = sink.accumulator(ctx.level, BG * H * W, src)
                _scatter(acc, rows.view(-1), cw, src)
        return None, grad_grid, None, None


def collect(maps: Sequence[Tensor], num_groups: int, as_tables: bool) -> Tuple[List[Tensor], MapGradSink]:
    """L maps (B, C, H_l, W_l), some requiring grad -> what the stages sample from, and the sink
    that their :func:`bag` / :func:`grid_sample` calls share.

    as_tables: row tables (B*H_l*W_l*G, C/G) (row ``((b*H + y)*W + x)*G + g``; a view of a
        channels-last map, one channels-last copy of a contiguous one) for :func:`bag`; else
        group-folded maps (B*G, C/G, H_l, W_l) for :func:`grid_sample`, views of one per-group
        channels-last copy (B, G, H_l, W_l, C/G) (grid_sample reads a corner's C/G channels
        from adjacent memory: ~3.7x faster forward and point backward than from C/G planes at
        level 0 of the R50 decoder, bit-identical results).
    """
    sink = MapGradSink([m.requires_grad for m in maps])
    out = list(_Collect.apply(sink, num_groups, as_tables, *maps))
    sink.node = out[0].grad_fn
    return out, sink


def bag(rows: Tensor, weights: Tensor, offsets: Tensor, sink: MapGradSink, tables: Sequence[Tensor]) -> Tensor:
    """Sum over the levels l of ``F.embedding_bag(rows[l], tables[l], offsets, "sum",
    per_sample_weights=weights[l])``.

    Args:
        rows: (L, 4*M) int64 table rows, 4 corners per point, point-major.
        weights: (L, 4*M) corner weights (gradient returned exactly).
        offsets: (M,) int64 ``0, 4, 8, ...``.
        sink, tables: from :func:`collect` (``as_tables=True``).
    Returns:
        (M, C/G). The tables' gradient goes to the sink, not through this call's graph edges.
    """
    return _Bag.apply(rows, weights, offsets, sink, *tables)


def grid_sample(feat: Tensor, grid: Tensor, sink: MapGradSink, level: int) -> Tensor:
    """``F.grid_sample(feat, grid, "bilinear", "zeros", align_corners=False)`` (the same kernel:
    the same values and grid gradient) of level ``level``'s folded map (B*G, C/G, H, W) from
    :func:`collect` (``as_tables=False``); grid (B*G, n, p, 2) -> (B*G, C/G, n, p). The map
    gradient goes to the sink (row ``(bg*H + y)*W + x`` of the (B*G*H*W, C/G) accumulator)."""
    return _GridSample.apply(feat, grid, sink, level)
