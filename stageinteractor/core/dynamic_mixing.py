"""Cascade dynamic mixing with cross-stage filter reuse (paper §3.3 Eq. 2-3, spec §2.5(d)).

All mixing is per (query, channel group); the batch of ``Mb = B*N*G`` independent problems is
handled with ``bmm``/``baddbmm``. Shapes per group: sampled features ``I0 (P_in, C)``, channel
filter ``M (C, C)`` (row = input channel), spatial filter ``S (P_out, P_in)``.

**One generator.** Every content-conditioned quantity of the mixing (filters, dynamic biases,
adapter gates) comes from the stage's single fused ``generator`` Linear (see
:class:`~stageinteractor.core.stage.DecoderStage`), whose rows are, per group g (g-major), the
sampler's blocks followed by the blocks below (absent blocks are not built). This is the
row-wise, per-group concatenation of the official layers (``official_checkpoint_layout.md`` §7):

===========  =====================  ==========================================================
block        rows per group         official source (per-group rows, same internal order)
===========  =====================  ==========================================================
``M``        C*C (i*C + o)          ``parameter_generator`` (first C*C rows of each group)
``S``        P_cur*P_in (row-major) ``parameter_generator`` (remaining rows)
``b_M``      C                      ``mix_bias`` (dynamic_bias)
``b_S``      P_out                  ``mix_bias``
``beta``     n*C  (m, c)            ``M_score_list_mix_bias`` (n > 0 and dynamic_bias)
``gates``    C*2*n (c, slot, m)     ``M_score_list`` (n > 0 and filter_usage="adapter")
``u``        N_S*P_cur              ``S_score_list`` (N_S > 0)
``v``        P_in                   ``S_score_list2`` (N_S > 0)
===========  =====================  ==========================================================

:func:`fuse_group_rows` builds a fused weight/bias from the official tensors.

Released behaviour (defaults):

1. ``X = ReLU(LN_{P_in x C}(I0 @ M_cur + b_M))`` (non-affine LayerNorm over the whole matrix).
2. Cascade over the n reused channel filters M_j of the bank (oldest first)::

       R = I0
       for m in range(n):
           Z = R + static_m(X); R = Z
           X = ReLU(LN(Z @ Mg_m + beta_m))

   ``Mg_m`` by ``filter_usage``: "adapter" (Eq. 3, ``(a c^T)*M_j + (1 - a c^T)*M_cur``, slot 0
   of ``gates`` = column/output gate c, slot 1 = row/input gate a, sigmoid); "previous"
   (``M_j``); "current" (``M_cur``); "none" (no dynamic filter: ``X = ReLU(LN(Z + beta_m))``).
   With ``static_mixing="none"`` the step is a pure cascade, ``Z = X``. All gates/filters/biases
   of all steps are generated in the one generator GEMM and adapted in one batched expression;
   only the inherently sequential mixing runs in the loop.
3. Spatial reuse (N_S > 0): ``S' = (u v^T)*S_prev + (1 - u v^T)*tile(S_cur, N_S)`` with
   ``S_prev`` the first ``N_S*P_cur`` rows of the previous stage's spatial filter;
   ``S_full = [S_cur ; S']``. (N_S = 1 is the released rule; for N_S > 1, P_cur = P_out/(N_S+1)
   and the reused rows of the previous stage are its own generated block followed by its first
   N_S - 1 reused blocks, i.e. filters originating from the N_S previous stages.)
4. ``Y = ReLU(LN_{P_out x C}(S_full @ X + b_S))``; ``q = out_norm(q + out_proj(flat(Y)))`` with
   ``flat`` ordered (g, out-point, channel).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .filter_bank import FilterBank
from .gemm import Linear
from .static_mixing import StaticMixing

__all__ = ["CascadeDynamicMixing", "fuse_group_rows"]

_SIGMOID_BLOCKS = ("gates", "u", "v")


def fuse_group_rows(parts: Sequence[Tensor], num_groups: int) -> Tensor:
    """Concatenate per-group row blocks: each part (G*r_i, ...) -> (G*sum(r_i), ...), g-major.

    Used to build ``generator.weight`` / ``.bias`` from the official tensors (in the block order
    of the module docstring)."""
    G = num_groups
    return torch.cat([p.reshape(G, -1, *p.shape[1:]) for p in parts], dim=1).reshape(-1, *parts[0].shape[1:])


class _AdaptedFilter(torch.autograd.Function):
    """Eq. 3 for one reused filter, ``lerp(M_cur, M_j, a c^T)`` (the same forward expression as
    the inference path), with a backward that saves only its inputs.

    Plain autograd would keep the (Mb, C, C) interpolation weight ``a c^T``, one tensor per reuse
    step, for the gradient of the lerp; here the backward recomputes what it needs
    from ``M_cur``, ``M_j`` (both kept alive anyway: each is a filter its own stage multiplied
    with) and the gates. With ``w = a c^T`` and ``d = M_j - M_cur`` (``Mg = M_cur + w * d``):
    ``dM_cur = g * (1 - w)``, ``dM_j = g * w``, ``da = (g * d) c``, ``dc = a^T (g * d)``.

    Shapes: ``m_cur``, ``m_j`` (Mb, C_in, C_out); ``a`` (Mb, C_in, 1); ``c`` (Mb, 1, C_out).
    """

    @staticmethod
    def forward(ctx, m_cur: Tensor, m_j: Tensor, a: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(m_cur, m_j, a, c)
        return torch.lerp(m_cur, m_j, a * c)

    @staticmethod
    def backward(ctx, grad: Tensor):
        m_cur, m_j, a, c = ctx.saved_tensors
        need_cur, need_j, need_a, need_c = ctx.needs_input_grad
        g_cur = g_j = g_a = g_c = None
        if need_cur or need_j:
            g_j = grad * (a * c)
            g_cur = grad - g_j if need_cur else None
            g_j = g_j if need_j else None
        if need_a or need_c:
            gd = grad * (m_j - m_cur)
            g_a = torch.bmm(gd, c.transpose(1, 2)) if need_a else None
            g_c = torch.bmm(a.transpose(1, 2), gd) if need_c else None
        return g_cur, g_j, g_a, g_c


def _matrix_norm(x: Tensor) -> Tensor:
    """Non-affine LayerNorm over each (rows, C) matrix of x (Mb, rows, C), i.e.
    ``F.layer_norm(x, x.shape[1:])``, computed as a one-group GroupNorm (the same statistics and
    eps; equal up to float round-off, ~5e-7): the CPU GroupNorm kernel is 1.7-2.5x faster than
    LayerNorm's over rows of 2k-8k elements."""
    return F.group_norm(x, 1)


def _adapt_inference(m_cur: Tensor, m_j: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """``lerp(M_cur, M_j, a c^T)`` with the result written over the outer-product weight (one
    (Mb, C, C) buffer; no autograd). One pass over M_cur and M_j: ~15 % faster than two
    interpolations (rows with a, then columns with c), which give the same values up to float
    round-off."""
    w = a * c  # (Mb, C, C)
    if torch.is_grad_enabled() or torch.jit.is_tracing():  # fvcore / ONNX traces: no out=
        return torch.lerp(m_cur, m_j, w)
    return torch.lerp(m_cur, m_j, w, out=w)


class CascadeDynamicMixing(nn.Module):
    """See module docstring. ``forward(q, gen, sampled, bank) -> (q, M_cur, S_full, S_cur)``."""

    def __init__(
        self,
        *,
        query_dim: int = 256,
        num_groups: int = 4,
        channels: int = 64,
        in_points: int = 32,
        out_points: int = 128,
        num_blocks: int = 4,
        num_reused_channel: int = 0,
        num_reused_spatial: int = 0,
        filter_usage: str = "adapter",
        static_mixing: str = "channel_spatial",
        dynamic_bias: bool = True,
    ):
        super().__init__()
        self.query_dim = query_dim
        self.num_groups = num_groups
        self.channels = channels
        self.in_points = in_points
        self.out_points = out_points
        self.num_reused_channel = num_reused_channel
        self.num_reused_spatial = num_reused_spatial
        self.filter_usage = filter_usage
        self.static_kind = static_mixing
        self.dynamic_bias = dynamic_bias
        if out_points % (num_reused_spatial + 1):
            raise ValueError(
                f"out_points ({out_points}) must be divisible by num_reused_spatial_filters + 1 "
                f"({num_reused_spatial + 1})"
            )
        self.cur_rows = out_points // (num_reused_spatial + 1)
        self.reused_rows = out_points - self.cur_rows
        G, C, n, P = num_groups, channels, num_reused_channel, in_points

        blocks: List[Tuple[str, int]] = [("M", C * C), ("S", P * self.cur_rows)]
        if dynamic_bias:
            blocks += [("b_M", C), ("b_S", out_points)]
            if n > 0:
                blocks.append(("beta", n * C))
        if n > 0 and filter_usage == "adapter":
            blocks.append(("gates", C * 2 * n))
        if num_reused_spatial > 0:
            blocks += [("u", self.reused_rows), ("v", P)]
        self.blocks = blocks
        self.out_proj = Linear(G * out_points * C, query_dim)  # oneDNN on CPU float32 (core.gemm)
        self.out_norm = nn.LayerNorm(query_dim)
        if n > 0 and static_mixing != "none":
            self.static = nn.ModuleList(
                StaticMixing(kind=static_mixing, num_points=P, num_blocks=num_blocks, channels=C) for _ in range(n)
            )
        else:
            self.static = None
        self.reset_parameters()

    def generator_blocks(self) -> List[Tuple[str, int]]:
        """Per-group row blocks this module needs from the stage's fused generator."""
        return list(self.blocks)

    def init_generator_bias(self, bias: Dict[str, Tensor]) -> None:
        """Spec §5 for this module's generator blocks (views (G, rows), in place): filter and bias
        blocks keep the PyTorch default U(±1/sqrt(D)); gate blocks get 0 (gates = 0.5).
        (The generator weight is all zero.)"""
        bound = 1.0 / math.sqrt(self.query_dim)
        for name, _ in self.blocks:
            if name in _SIGMOID_BLOCKS:
                bias[name].zero_()
            else:
                bias[name].uniform_(-bound, bound)

    @staticmethod
    def sigmoid_blocks() -> Tuple[str, ...]:
        """Blocks that are gates (sigmoid applied by the caller); they come last, contiguous."""
        return _SIGMOID_BLOCKS

    def reset_parameters(self) -> None:
        """Output projection weight 0 (spec §5); static layers zero-init themselves."""
        nn.init.zeros_(self.out_proj.weight)

    def forward(
        self, q: Tensor, gen: Dict[str, Tensor], sampled: Tensor, bank: FilterBank
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            q: (B*N, D) content after the self-attention.
            gen: this module's generator blocks, each (B*N*G, rows) (:meth:`generator_blocks`),
                with the sigmoid already applied to the gate blocks "gates", "u", "v" (the stage
                generates them as one contiguous block and applies one sigmoid).
            sampled: (B*N*G, P_in, C) sampled features I0.
            bank: filters of earlier stages (``bank.filters``: n (Mb, C_in, C_out) must hold
                ``num_reused_channel`` filters and ``bank.spatial`` at least ``reused_rows`` rows
                when reuse is active).
        Returns:
            q (B*N, D) after ``out_norm(q + out_proj(.))``, the generated channel filter
            M_cur (B*N*G, C, C), the full spatial filter S_full (B*N*G, P_out, P_in) and its
            generated part S_cur (B*N*G, P_cur, P_in) (= the first P_cur rows of S_full).
        """
        BN = q.shape[0]
        G, C, P = self.num_groups, self.channels, self.in_points
        Mb = BN * G
        n = self.num_reused_channel
        m_cur = gen["M"].view(Mb, C, C)
        s_cur = gen["S"].view(Mb, self.cur_rows, P)
        if self.dynamic_bias:
            x = torch.baddbmm(gen["b_M"].view(Mb, 1, C), sampled, m_cur)
        else:
            x = torch.bmm(sampled, m_cur)
        # ReLU in place on the LayerNorm output (LayerNorm's backward does not need its output)
        x = _matrix_norm(x).relu_()

        if n > 0:
            filters = self._step_filters(gen, m_cur, bank)  # n filters (Mb, C, C) or None
            betas = gen["beta"].view(Mb, n, 1, C).unbind(1) if self.dynamic_bias else None
            z = sampled  # the residual stream (Mb, P, C) of the static layers
            for m in range(n):
                z = x if self.static is None else self.static[m](x, z)
                if filters is None:  # filter_usage == "none": no dynamic filter in this step
                    y = z if betas is None else z + betas[m]
                else:
                    y = torch.bmm(z, filters[m]) if betas is None else torch.baddbmm(betas[m], z, filters[m])
                x = _matrix_norm(y).relu_()

        if self.num_reused_spatial > 0:
            u = gen["u"].view(Mb, self.reused_rows, 1)  # sigmoid already applied
            v = gen["v"].view(Mb, 1, P)
            s_prev = bank.spatial
            if s_prev.shape[1] != self.reused_rows:
                s_prev = s_prev[:, : self.reused_rows]
            s_rep = s_cur if self.num_reused_spatial == 1 else s_cur.repeat(1, self.num_reused_spatial, 1)
            s_full = torch.cat([s_cur, torch.lerp(s_rep, s_prev, u * v)], dim=1)
        else:
            s_full = s_cur
        if self.dynamic_bias:
            y = torch.baddbmm(gen["b_S"].view(Mb, self.out_points, 1), s_full, x)
        else:
            y = torch.bmm(s_full, x)
        y = _matrix_norm(y).relu_()
        q = self.out_norm(q + self.out_proj(y.view(BN, G * self.out_points * C)))
        return q, m_cur, s_full, s_cur

    def _step_filters(self, gen: Dict[str, Tensor], m_cur: Tensor, bank: FilterBank) -> Optional[Sequence[Tensor]]:
        """Channel filters of all reuse steps, adapted at once (see ``filter_usage``)."""
        usage = self.filter_usage
        n = self.num_reused_channel
        if usage == "none":
            return None
        if usage == "current":
            return [m_cur] * n
        if usage == "previous":
            return bank.filters
        Mb, C = m_cur.shape[0], self.channels
        # sigmoid already applied; per group (c, slot, m): 2n gates (Mb, C, 1), slot 0 = column /
        # output gates c_m, slot 1 = row / input gates a_m
        gates = gen["gates"].view(Mb, C, 2 * n, 1)
        rows = gates.unbind(2)  # (Mb, C, 1) each: a_m = rows[n + m]
        # column gates as contiguous (Mb, 1, C) rows (one small copy of all n): as strided views
        # (stride 2n) they would make the outer product's inner loop unvectorisable
        cols = gates[:, :, :n].transpose(1, 3).contiguous().unbind(2)
        # Eq. 3 as one interpolation towards M_j with the weight a c^T: exactly
        # (a c^T)*M_j + (1 - a c^T)*M_cur. Applied per reused filter of the bank (its own
        # tensor: no stacked copy of the bank is made or kept for backward); each result is a
        # contiguous (Mb, C_in, C_out) matrix (fast batched GEMM).
        # In training, _AdaptedFilter computes the same expression without keeping the
        # weight a c^T for backward (one (Mb, C, C) tensor less per reuse step).
        train = torch.is_grad_enabled() and not torch.jit.is_tracing()
        return [
            _AdaptedFilter.apply(m_cur, m_j, rows[n + m], cols[m])
            if train
            else _adapt_inference(m_cur, m_j, rows[n + m], cols[m])
            for m, m_j in enumerate(bank.filters)
        ]
