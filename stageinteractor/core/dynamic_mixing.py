"""Cascade dynamic mixing with cross-stage filter reuse (paper §3.3 Eq. 2-3, spec §2.5(d)).

All mixing is per (query, channel group); the batch of ``M = B*N*G`` independent problems is
handled with ``baddbmm``. Shapes per group: sampled features ``I0 (P_in, C)``, channel filter
``M (C, C)`` (row = input channel), spatial filter ``S (P_out, P_in)``.

Released behaviour (defaults):

1. ``parameter_generator``: Linear(D -> G*(C*C + P_in*P_cur)); per group [M_cur | S_cur].
2. ``mix_bias``: Linear(D -> G*(C + P_out)); per group [b_M | b_S] (``dynamic_bias``).
3. ``X = ReLU(LN_{P_in x C}(I0 @ M_cur + b_M))`` (non-affine LayerNorm over the whole matrix).
4. Cascade over the n reused channel filters M_j of the bank (oldest first)::

       R = I0
       for m in range(n):
           Z = R + static_m(X); R = Z
           X = ReLU(LN(Z @ Mg_m + beta_m))

   ``Mg_m`` by ``filter_usage``: "adapter" (Eq. 3, ``(a c^T)*M_j + (1 - a c^T)*M_cur``, gates
   ``channel_gates``: Linear(D -> G*C*2*n), per group (C, slot, n), slot 0 = column/output gate c,
   slot 1 = row/input gate a); "previous" (``M_j``); "current" (``M_cur``); "none" (no dynamic
   filter: ``X = ReLU(LN(Z + beta_m))``). ``beta_m`` from ``reuse_bias``: Linear(D -> G*n*C)
   (``dynamic_bias``). With ``static_mixing="none"`` the step is a pure cascade, ``Z = X``.
   All gates/filters/biases of all steps are generated and adapted in one batched expression;
   only the inherently sequential mixing runs in the loop.
5. Spatial reuse (N_S > 0): ``S' = (u v^T)*S_prev + (1 - u v^T)*tile(S_cur, N_S)`` with
   ``S_prev`` the first ``N_S*P_cur`` rows of the previous stage's spatial filter, gates
   ``spatial_row_gates`` Linear(D -> G*N_S*P_cur) and ``spatial_col_gates`` Linear(D -> G*P_in);
   ``S_full = [S_cur ; S']``. (N_S = 1 is the released rule; for N_S > 1, P_cur = P_out/(N_S+1)
   and the reused rows of the previous stage are its own generated block followed by its first
   N_S - 1 reused blocks, i.e. filters originating from the N_S previous stages.)
6. ``Y = ReLU(LN_{P_out x C}(S_full @ X + b_S))``; ``q = out_norm(q + out_proj(flat(Y)))`` with
   ``flat`` ordered (g, out-point, channel).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .filter_bank import FilterBank
from .static_mixing import StaticMixing

__all__ = ["CascadeDynamicMixing"]


class CascadeDynamicMixing(nn.Module):
    """See module docstring. ``forward(q, sampled, bank) -> (q, M_cur, S_full)``."""

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
        G, C, n = num_groups, channels, num_reused_channel

        self.parameter_generator = nn.Linear(query_dim, G * (C * C + in_points * self.cur_rows))
        self.mix_bias = nn.Linear(query_dim, G * (C + out_points)) if dynamic_bias else None
        self.out_proj = nn.Linear(G * out_points * C, query_dim)
        self.out_norm = nn.LayerNorm(query_dim)
        if n > 0 and static_mixing != "none":
            self.static = nn.ModuleList(
                StaticMixing(kind=static_mixing, num_points=in_points, num_blocks=num_blocks, channels=C)
                for _ in range(n)
            )
        else:
            self.static = None
        self.channel_gates = nn.Linear(query_dim, G * C * 2 * n) if n > 0 and filter_usage == "adapter" else None
        self.reuse_bias = nn.Linear(query_dim, G * n * C) if n > 0 and dynamic_bias else None
        if num_reused_spatial > 0:
            self.spatial_row_gates = nn.Linear(query_dim, G * self.reused_rows)
            self.spatial_col_gates = nn.Linear(query_dim, G * in_points)
        else:
            self.spatial_row_gates = None
            self.spatial_col_gates = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §5: generator weights 0 (biases keep the PyTorch default U(±1/sqrt(D))), output
        projection weight 0, gate generators weight and bias 0 (gates = 0.5)."""
        nn.init.zeros_(self.parameter_generator.weight)
        nn.init.zeros_(self.out_proj.weight)
        for lin in (self.mix_bias, self.reuse_bias):
            if lin is not None:
                nn.init.zeros_(lin.weight)
        for lin in (self.channel_gates, self.spatial_row_gates, self.spatial_col_gates):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, q: Tensor, sampled: Tensor, bank: FilterBank) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            q: (B*N, D) content after the self-attention.
            sampled: (B*N*G, P_in, C) sampled features I0.
            bank: filters of earlier stages (``bank.channel`` must hold ``num_reused_channel``
                filters and ``bank.spatial`` at least ``reused_rows`` rows when reuse is active).
        Returns:
            q (B*N, D) after ``out_norm(q + out_proj(.))``, the generated channel filter
            M_cur (B*N*G, C, C) and the full spatial filter S_full (B*N*G, P_out, P_in).
        """
        BN = q.shape[0]
        G, C, P = self.num_groups, self.channels, self.in_points
        Mb = BN * G
        n = self.num_reused_channel

        params = self.parameter_generator(q).view(Mb, -1)
        m_cur = params[:, : C * C].view(Mb, C, C)
        s_cur = params[:, C * C :].view(Mb, self.cur_rows, P)
        if self.mix_bias is not None:
            mb = self.mix_bias(q).view(Mb, C + self.out_points)
            x = torch.baddbmm(mb[:, None, :C], sampled, m_cur)
            b_s: Optional[Tensor] = mb[:, C:, None]
        else:
            x = torch.bmm(sampled, m_cur)
            b_s = None
        x = F.layer_norm(x, (P, C)).relu()

        if n > 0:
            filters = self._step_filters(q, m_cur, bank)  # (Mb, n, C, C) or (Mb, C, C) or None
            beta = self.reuse_bias(q).view(Mb, n, 1, C) if self.reuse_bias is not None else None
            residual = sampled
            for m in range(n):
                if self.static is not None:
                    z = self.static[m](x, residual)
                    residual = z
                else:
                    z = x
                if filters is None:  # filter_usage == "none"
                    y = z if beta is None else z + beta[:, m]
                else:
                    f = filters if filters.dim() == 3 else filters[:, m]
                    y = torch.bmm(z, f) if beta is None else torch.baddbmm(beta[:, m], z, f)
                x = F.layer_norm(y, (P, C)).relu()

        if self.spatial_row_gates is not None:
            u = torch.sigmoid(self.spatial_row_gates(q)).view(Mb, self.reused_rows, 1)
            v = torch.sigmoid(self.spatial_col_gates(q)).view(Mb, 1, P)
            s_prev = bank.spatial[:, : self.reused_rows]
            s_rep = s_cur if self.num_reused_spatial == 1 else s_cur.repeat(1, self.num_reused_spatial, 1)
            s_full = torch.cat([s_cur, torch.lerp(s_rep, s_prev, u * v)], dim=1)
        else:
            s_full = s_cur
        y = torch.bmm(s_full, x) if b_s is None else torch.baddbmm(b_s, s_full, x)
        y = F.layer_norm(y, (self.out_points, C)).relu()
        q = self.out_norm(q + self.out_proj(y.view(BN, G * self.out_points * C)))
        return q, m_cur, s_full

    def _step_filters(self, q: Tensor, m_cur: Tensor, bank: FilterBank) -> Optional[Tensor]:
        """Channel filters of all reuse steps at once (see ``filter_usage``)."""
        usage = self.filter_usage
        if usage == "none":
            return None
        if usage == "current":
            return m_cur
        if usage == "previous":
            return bank.channel
        Mb, C, n = m_cur.shape[0], self.channels, self.num_reused_channel
        gates = torch.sigmoid(self.channel_gates(q)).view(Mb, C, 2, n).permute(0, 3, 2, 1)  # (Mb, n, 2, C)
        col, row = gates.unbind(2)  # each (Mb, n, C)
        outer = row.unsqueeze(-1) * col.unsqueeze(-2)  # (Mb, n, C_in, C_out) = a c^T
        return torch.lerp(m_cur.unsqueeze(1), bank.channel, outer)  # Eq. 3
