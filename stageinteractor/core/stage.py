"""One StageInteractor decoder stage (spec §2.5; released ``StageInteractorHead``)."""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import IoFSelfAttention
from .dynamic_mixing import CascadeDynamicMixing, fuse_group_rows
from .filter_bank import FilterBank
from .gemm import Linear, wide_linear
from .position_encoding import SineBoxEmbedding
from .sampler import GroupedPointSampler, Point3DSampler, SamplingMaps, num_spatial_blocks

__all__ = ["DecoderStage", "fuse_group_rows", "OFFICIAL_GENERATOR_SOURCES"]

# generator block -> official per-stage layer (``roi_head.bbox_head.{s}.`` + name); blocks that
# share a source (M/S, b_M/b_S) are consecutive and in the source's own per-group row order.
OFFICIAL_GENERATOR_SOURCES = {
    "offsets": "feat_extractor.gen_one_d.0",
    "sub_offsets": None,  # per_group sub-point offsets: no official counterpart
    "M": "dynamic_conv.parameter_generator",
    "S": "dynamic_conv.parameter_generator",
    "b_M": "dynamic_conv.mix_bias",
    "b_S": "dynamic_conv.mix_bias",
    "beta": "dynamic_conv.M_score_list_mix_bias",
    "gates": "dynamic_conv.M_score_list",
    "u": "dynamic_conv.S_score_list",
    "v": "dynamic_conv.S_score_list2",
}


class DecoderStage(nn.Module):
    """Self-attention (IoF bias) -> sampling -> cascade dynamic mixing -> FFN -> cls/reg heads.

    All content-conditioned generators of the stage (sampling offsets, dynamic filters, dynamic
    biases, adapter gates) are **one** Linear, ``generator`` (D -> G*T), evaluated as one GEMM on
    the post-attention content; its rows are per group g (g-major) the blocks of
    ``generator_layout`` (sampler blocks, then mixing blocks). ``OFFICIAL_GENERATOR_SOURCES``
    names the official layer of every block: a converter builds ``generator.weight``/``.bias``
    with ``fuse_group_rows([official tensors in block order], G)`` (M and S share
    ``parameter_generator``, b_M and b_S share ``mix_bias``: pass those once).

    ``forward(q, xyzr, wh, boxes, maps, bank)`` returns a dict with ``q`` (B*N, D), ``logits``
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
        sampling_kernel: str = "auto",
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
                sampling_kernel=sampling_kernel,
            )
        else:
            self.sampler = Point3DSampler(
                query_dim=query_dim,
                num_groups=num_groups,
                num_points=num_points,
                strides=strides,
                group_init=sampler == "3d_group_init",
                sampling_kernel=sampling_kernel,
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
        self.num_groups = num_groups
        self.generator_layout = self.sampler.generator_blocks() + self.mixing.generator_blocks()
        gate_names = self.mixing.sigmoid_blocks()
        self._plain_layout = [b for b in self.generator_layout if b[0] not in gate_names]
        self._gate_layout = [b for b in self.generator_layout if b[0] in gate_names]
        if self.generator_layout != self._plain_layout + self._gate_layout:
            raise AssertionError("gate blocks must be the trailing blocks of the generator")
        self._gate_rows = sum(r for _, r in self._gate_layout)
        # every Linear of the stage is gemm.Linear: oneDNN products (forward and backward) on
        # CPU float32, nn.Linear elsewhere; same parameters and state dict
        self.generator = Linear(query_dim, num_groups * sum(r for _, r in self.generator_layout))
        # the (rows, D) weight stored column-major (D-major). Same shape, values and state-dict
        # entry. Measured at 200 x 256 x 28080 on one EPYC core, oneDNN forward / grad-input /
        # grad-weight: 14.2 / 14.9 / 15.2 ms column-major vs 15.0 / 21.2 / 19.2 ms row-major
        # (and the gradient takes the weight's layout: no copy); for MKL (oneDNN off) ~20 %
        # faster too. Strides survive load_state_dict, .to() and autograd.
        rows_total, cols = self.generator.weight.shape
        self.generator.weight = nn.Parameter(torch.empty(cols, rows_total).t())
        self.ffn_fc1 = Linear(query_dim, ffn_dim)
        self.ffn_fc2 = Linear(ffn_dim, query_dim)
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.cls_fc = Linear(query_dim, query_dim)
        self.cls_norm = nn.LayerNorm(query_dim)
        self.cls_logits = Linear(query_dim, num_classes)
        self.reg_fc = Linear(query_dim, query_dim)
        self.reg_norm = nn.LayerNorm(query_dim)
        self.reg_delta = Linear(query_dim, 4)
        self.register_buffer("half_sign", torch.tensor([-0.5, 0.5]), persistent=False)
        self.register_buffer("corner_half", torch.tensor([-0.5, -0.5, 0.5, 0.5]), persistent=False)
        limit = torch.tensor([2.0**20, 2.0**20, 32.0, 32.0])
        self.register_buffer("xyzr_min", -limit, persistent=False)
        self.register_buffer("xyzr_max", limit, persistent=False)
        self.reset_parameters()

    def generate(self, q: Tensor) -> Dict[str, Tensor]:
        """One GEMM for all generator blocks: (B*N, D) -> {block: (B*N*G, rows)}; a single sigmoid
        is applied to the trailing gate blocks."""
        # oneDNN on CPU float32 (training and inference), else column-blocked MKL in CPU inference
        # (stageinteractor.core.gemm): same values up to float round-off
        out = wide_linear(q, self.generator.weight, self.generator.bias).view(q.shape[0] * self.num_groups, -1)
        names = [n for n, _ in self._plain_layout]
        parts = list(out.split([r for _, r in self._plain_layout] + [self._gate_rows], 1))
        gen = dict(zip(names, parts))
        if self._gate_rows:
            gates = torch.sigmoid(parts[-1]).split([r for _, r in self._gate_layout], 1)
            gen.update(zip((n for n, _ in self._gate_layout), gates))
        return gen

    def generator_bias_blocks(self) -> Dict[str, Tensor]:
        """Views (G, rows) of ``generator.bias`` per block (for init / inspection)."""
        bias = self.generator.bias.detach().view(self.num_groups, -1)
        out, start = {}, 0
        for name, rows in self.generator_layout:
            out[name] = bias[:, start : start + rows]
            start += rows
        return out

    def reset_parameters(self) -> None:
        """Spec §5 for the layers owned here (attention/sampler/mixing init the rest): generator
        weight 0 and per-block biases (sampler offsets, default U(±1/16) filters/biases, 0 gates)."""
        nn.init.zeros_(self.generator.weight)
        with torch.no_grad():
            blocks = self.generator_bias_blocks()
            self.sampler.init_generator_bias(blocks)
            self.mixing.init_generator_bias(blocks)
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
        boxes: Tensor,
        maps: SamplingMaps,
        bank: FilterBank,
        return_sampling_points: bool = False,
    ) -> Dict[str, Optional[Tensor]]:
        """
        Args:
            q: (B*N, D) content.
            xyzr, wh, boxes: (B, N, 4), (B, N, 2), (B, N, 4) the detached input boxes as xyzr,
                their widths/heights and xyxy (all three describe the same boxes).
            maps: the feature pyramid prepared by ``self.sampler.prepare`` (shared by all stages);
            bank: filters of earlier stages.
        """
        B, N = xyzr.shape[:2]
        # (a)+(b) box embedding and IoF-biased self-attention (boxes carry no gradient)
        log_iof = self.attention.log_iof(boxes, wh.prod(-1))
        x = q + self.pos_embed.rows(xyzr)
        attn = self.attention(x, log_iof)
        q = self.attention_norm((x if self.pe_residual == "stream" else q) + attn)
        # (c) sampling, (d) cascade dynamic mixing
        gen = self.generate(q)
        sampled, points = self.sampler(q, gen, xyzr, wh, maps, return_sampling_points)
        q, m_cur, s_full, s_cur = self.mixing(q, gen, sampled, bank)
        # (e) FFN and heads
        q = self.ffn_norm(q + self.ffn_fc2(self.ffn_fc1(q).relu_()))
        logits = self.cls_logits(self.cls_norm(self.cls_fc(q)).relu_())
        delta = self.reg_delta(self.reg_norm(self.reg_fc(q)).relu_()).view(B, N, 4)
        new_xyzr, new_wh, new_boxes = self.refine(xyzr, wh, delta)
        return {
            "q": q,
            "logits": logits.view(B, N, self.num_classes),
            "xyzr": new_xyzr,
            "wh": new_wh,
            "boxes": new_boxes,
            "m_cur": m_cur,
            "s_full": s_full,
            "s_cur": s_cur,
            "sampling_points": points,
        }

    def refine(self, xyzr: Tensor, wh: Tensor, delta: Tensor):
        """Spec §2.4: ``x += dx*w, y += dy*h`` ("wh") or ``*2^z`` ("2z"); ``z += dz, r += dr``.
        Returns the refined xyzr, its (w, h) and its xyxy box, each (B, N, 4 | 2 | 4)."""
        # one addcmul with the per-coordinate scale (w, h, 1, 1) (or (2^z, 2^z, 1, 1)): the same
        # values as x + dx*w and z + dz computed separately (a product by 1 is exact)
        scale = wh if self.refine_mode == "wh" else torch.pow(2.0, xyzr[..., 2:3]).expand(-1, -1, 2)
        new_xyzr = torch.addcmul(xyzr, delta, F.pad(scale, (0, 2), value=1.0))
        if torch.is_grad_enabled():
            # training: a diverging (AMP) step must give finite boxes -- finite or overflowing
            # losses the GradScaler can skip, not an error of the matcher. |x|, |y| <= 2^20 px
            # and |z|, |r| <= 32 (w, h <= 2^48) are far beyond any real box, so this changes
            # nothing else (NaN stays NaN). Not in inference: one aten op per stage.
            new_xyzr = torch.clamp(new_xyzr, min=self.xyzr_min, max=self.xyzr_max)
        new_xy, z, r = new_xyzr.split([2, 1, 1], dim=-1)
        new_wh = torch.pow(2.0, torch.addcmul(z, r, self.half_sign))
        boxes = torch.addcmul(new_xy.repeat(1, 1, 2), new_wh.repeat(1, 1, 2), self.corner_half)
        return new_xyzr, new_wh, boxes
