"""One StageInteractor decoder stage (spec §2.5; released ``StageInteractorHead``)."""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import IoFSelfAttention, iof_log_bias
from .dynamic_mixing import CascadeDynamicMixing
from .filter_bank import FilterBank
from .position_encoding import SineBoxEmbedding
from .sampler import GroupedPointSampler, Point3DSampler, num_spatial_blocks

__all__ = ["DecoderStage"]


class DecoderStage(nn.Module):
    """Self-attention (IoF bias) -> sampling -> cascade dynamic mixing -> FFN -> cls/reg heads.

    ``forward(q, xyzr, wh, features, bank)`` returns a dict with ``q`` (B*N, D), ``logits``
    (B, N, K), ``xyzr`` (B, N, 4) refined (attached to the graph), ``wh`` (B, N, 2) of the refined
    boxes, ``boxes`` (B, N, 4) xyxy, ``m_cur`` / ``s_full`` (filters for the bank) and
    optionally ``sampling_points`` (B, N, G, P, 3).
    """

    def __init__(
        self,
        *,
        num_classes: int = 80,
        query_dim: int = 256,
        num_heads: int = 8,
        num_groups: int = 4,
        ffn_dim: int = 2048,
        num_points: int = 32,
        out_points: int = 128,
        strides=(4, 8, 16, 32),
        sampler: str = "grouped",
        subpoint_offsets: str = "shared",
        refine_mode: str = "wh",
        pe_residual: str = "stream",
        dynamic_bias: bool = True,
        num_reused_channel: int = 0,
        num_reused_spatial: int = 0,
        filter_usage: str = "adapter",
        static_mixing: str = "channel_spatial",
    ):
        super().__init__()
        if query_dim % num_groups:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by num_groups ({num_groups})")
        if query_dim % 4:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by 4 (xyzr embedding)")
        self.num_classes = num_classes
        self.refine_mode = refine_mode
        self.pe_residual = pe_residual
        self.pos_embed = SineBoxEmbedding(num_feats=query_dim // 4)
        self.attention = IoFSelfAttention(embed_dim=query_dim, num_heads=num_heads)
        self.attention_norm = nn.LayerNorm(query_dim)
        if sampler == "grouped":
            self.sampler = GroupedPointSampler(
                query_dim=query_dim,
                num_groups=num_groups,
                num_points=num_points,
                strides=strides,
                subpoint_offsets=subpoint_offsets,
            )
        else:
            self.sampler = Point3DSampler(
                query_dim=query_dim,
                num_groups=num_groups,
                num_points=num_points,
                strides=strides,
                group_init=sampler == "3d_group_init",
            )
        self.mixing = CascadeDynamicMixing(
            query_dim=query_dim,
            num_groups=num_groups,
            channels=query_dim // num_groups,
            in_points=num_points,
            out_points=out_points,
            num_blocks=num_spatial_blocks(num_points),
            num_reused_channel=num_reused_channel,
            num_reused_spatial=num_reused_spatial,
            filter_usage=filter_usage,
            static_mixing=static_mixing,
            dynamic_bias=dynamic_bias,
        )
        self.ffn_fc1 = nn.Linear(query_dim, ffn_dim)
        self.ffn_fc2 = nn.Linear(ffn_dim, query_dim)
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.cls_fc = nn.Linear(query_dim, query_dim)
        self.cls_norm = nn.LayerNorm(query_dim)
        self.cls_logits = nn.Linear(query_dim, num_classes)
        self.reg_fc = nn.Linear(query_dim, query_dim)
        self.reg_norm = nn.LayerNorm(query_dim)
        self.reg_delta = nn.Linear(query_dim, 4)
        self.register_buffer("half_sign", torch.tensor([-0.5, 0.5]), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §5 for the layers owned here (attention/sampler/mixing init themselves)."""
        for lin in (self.ffn_fc1, self.ffn_fc2, self.cls_fc, self.reg_fc, self.cls_logits):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.reg_delta.weight)
        nn.init.zeros_(self.reg_delta.bias)

    def forward(
        self,
        q: Tensor,
        xyzr: Tensor,
        wh: Tensor,
        features: List[Tensor],
        bank: FilterBank,
        return_sampling_points: bool = False,
    ) -> Dict[str, Optional[Tensor]]:
        """
        Args:
            q: (B*N, D) content; xyzr: (B, N, 4) detached input boxes; wh: (B, N, 2) their w, h.
            features: L maps (B, D, H_l, W_l); bank: filters of earlier stages.
        """
        B, N = xyzr.shape[:2]
        xy = xyzr[..., :2]
        # (a)+(b) box embedding and IoF-biased self-attention (boxes carry no gradient)
        half = wh * 0.5
        log_iof = iof_log_bias(torch.cat([xy - half, xy + half], dim=-1))
        x = q + self.pos_embed(xyzr).view(B * N, -1)
        attn = self.attention(x, log_iof)
        q = self.attention_norm((x if self.pe_residual == "stream" else q) + attn)
        # (c) sampling, (d) cascade dynamic mixing
        sampled, points = self.sampler(q, xyzr, wh, features, return_sampling_points)
        q, m_cur, s_full = self.mixing(q, sampled, bank)
        # (e) FFN and heads
        q = self.ffn_norm(q + self.ffn_fc2(self.ffn_fc1(q).relu()))
        logits = self.cls_logits(self.cls_norm(self.cls_fc(q)).relu())
        delta = self.reg_delta(self.reg_norm(self.reg_fc(q)).relu()).view(B, N, 4)
        # refinement (spec §2.4): "wh" uses w for x and h for y, "2z" uses 2^z for both
        scale = wh if self.refine_mode == "wh" else torch.pow(2.0, xyzr[..., 2:3])
        new_xyzr = torch.cat([torch.addcmul(xy, delta[..., :2], scale), xyzr[..., 2:] + delta[..., 2:]], dim=-1)
        new_wh = torch.pow(2.0, torch.addcmul(new_xyzr[..., 2:3], new_xyzr[..., 3:4], self.half_sign))
        new_half = new_wh * 0.5
        boxes = torch.cat([new_xyzr[..., :2] - new_half, new_xyzr[..., :2] + new_half], dim=-1)
        return {
            "q": q,
            "logits": logits.view(B, N, self.num_classes),
            "xyzr": new_xyzr,
            "wh": new_wh,
            "boxes": boxes,
            "m_cur": m_cur,
            "s_full": s_full,
            "sampling_points": points,
        }
