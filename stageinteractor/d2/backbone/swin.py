"""Swin Transformer backbone (Swin-S as released with StageInteractor), pure PyTorch.

Written for this project (spec §2.1, §7.14). Hyper-parameters of :func:`build_swin_small`:
embed 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7, mlp ratio 4, qkv bias,
drop_path_rate 0.2 (linearly increasing over the 24 blocks), no absolute position embedding,
a LayerNorm on every output (``norm0..norm3``), outputs at strides 4/8/16/32 with channels
96/192/384/768.

Released quirk (mmcv 1.3.3 FFN API): stochastic depth is applied to the **attention branch
only**; the MLP branch has none. ``drop_path_on_mlp=False`` (default) reproduces this; set it
to True for the standard Swin behaviour (DropPath on both residual branches).

Arbitrary input sizes: the image is zero-padded (bottom/right) to a multiple of the patch
size, every block pads its (normed) tokens to a multiple of the window and crops afterwards,
and patch merging pads odd sizes. The shifted-window mask is built for the padded size.

State-dict naming = the original Microsoft Swin layout (so the official ImageNet checkpoint
``swin_small_patch4_window7_224.pth`` maps by only dropping ``head.*``, ``norm.*`` and the
``attn_mask`` buffers)::

    patch_embed.proj.{weight,bias}   patch_embed.norm.{weight,bias}
    layers.{i}.blocks.{j}.norm1.*    layers.{i}.blocks.{j}.attn.relative_position_bias_table
    layers.{i}.blocks.{j}.attn.relative_position_index (persistent int64 buffer)
    layers.{i}.blocks.{j}.attn.qkv.* layers.{i}.blocks.{j}.attn.proj.*
    layers.{i}.blocks.{j}.norm2.*    layers.{i}.blocks.{j}.mlp.fc1.*   ...mlp.fc2.*
    layers.{i}.downsample.reduction.weight (no bias), layers.{i}.downsample.norm.*  (i = 0..2)
    norm{i}.{weight,bias}            (output LayerNorms, i = 0..3)

Patch merging concatenates the 2x2 neighbours in Microsoft order (x[0::2,0::2], x[1::2,0::2],
x[0::2,1::2], x[1::2,1::2]). The mmdet fork stores ``downsample.reduction``/``downsample.norm``
in nn.Unfold order (permutation [0, 2, 1, 3] of the four C-sized chunks) under
``stages.{i}.downsample.*``; a converter for the authors' trained checkpoint must undo that
(``stageinteractor.official.checkpoint`` does).

Feature names: ``res2..res5`` (same names as the ResNet backbones, so neck configs are
backbone-agnostic).
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

__all__ = ["DropPath", "SwinTransformer", "build_swin_small", "build_swin_tiny"]


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth per sample (scaled by 1/keep_prob during training)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws*ws, C); H, W multiples of ws."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into a ((2ws-1)^2, heads) bias table (Swin's definition)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ).flatten(1)  # (2, ws*ws)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel.permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) additive (0 / -100) or None."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (Bw, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            nW = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.view(1, nW, 1, N, N)  # (1, nW, h, N, N)
            bias = bias.expand(Bw // nW, -1, -1, -1, -1).reshape(Bw, self.num_heads, N, N)
        bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 drop_path_on_mlp: bool = False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop
        )
        self.drop_path = DropPath(drop_path)
        self.drop_path_on_mlp = drop_path_on_mlp
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(
        self, x: torch.Tensor, H: int, W: int, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        B, L, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            mask = None
        x = window_reverse(self.attn(window_partition(x, ws), mask), ws, Hp, Wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :H, :W, :]
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        y = self.mlp(self.norm2(x))
        if self.drop_path_on_mlp:
            y = self.drop_path(y)
        return x + y


class PatchMerging(nn.Module):
    """2x2 neighbour concat (Microsoft order) -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        x = x.view(B, -1, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: Optional[float], drop: float, attn_drop: float,
                 drop_paths: Sequence[float], downsample: bool, drop_path_on_mlp: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else self.shift_size,
                      mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_paths[j],
                      drop_path_on_mlp)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def _shift_mask(self, Hp: int, Wp: int, device) -> torch.Tensor:
        ws, s = self.window_size, self.shift_size
        img = torch.zeros(1, Hp, Wp, 1, device=device)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        win = window_partition(img, ws).squeeze(-1)  # (nW, N)
        mask = win.unsqueeze(1) - win.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor, H: int, W: int):
        ws = self.window_size
        Hp, Wp = int(math.ceil(H / ws)) * ws, int(math.ceil(W / ws)) * ws
        mask = self._shift_mask(Hp, Wp, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, H, W, mask)
        if self.downsample is None:
            return x, H, W, x, H, W
        x_down = self.downsample(x, H, W)
        return x, H, W, x_down, (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor):
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x)
        Hp, Wp = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, Hp, Wp


class SwinTransformer(Backbone):
    """Swin Transformer as a detectron2 ``Backbone``.

    Args:
        patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias,
        qk_scale, drop_rate, attn_drop_rate, drop_path_rate, patch_norm: as in Swin.
        out_indices: which stages (0..3) to return; each gets a LayerNorm ``norm{i}``.
        drop_path_on_mlp: False (default) = released quirk, DropPath on the attention branch
            only; True = standard Swin (both branches).
        freeze_at: 0 = nothing frozen (default, as released), 1 = patch_embed,
            k >= 2 = patch_embed + stages 0..k-2 (``layers.{i}`` incl. their downsample).
        out_feature_names: names of stages 0..3 (default ``res2..res5``).

    ``forward(x)``: x (B, 3, H, W), any H, W; returns ``{name: (B, C_i, ceil(H/4)/2^i..)}``.
    """

    def __init__(
        self,
        *,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_on_mlp: bool = False,
        freeze_at: int = 0,
        out_feature_names: Sequence[str] = ("res2", "res3", "res4", "res5"),
    ):
        super().__init__()
        self.num_layers = len(depths)
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(
                SwinStage(
                    self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                    qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    dpr[sum(depths[:i]): sum(depths[: i + 1])],
                    downsample=i < self.num_layers - 1, drop_path_on_mlp=drop_path_on_mlp,
                )
            )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        names = list(out_feature_names)
        self._stage_names = names
        self._out_features = [names[i] for i in self.out_indices]
        self._out_feature_channels = {names[i]: self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {names[i]: patch_size * 2 ** i for i in self.out_indices}
        self._last_stage = max(self.out_indices)
        self.apply(self._init_weights)
        self.freeze_at = freeze_at
        self.freeze(freeze_at)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def freeze(self, freeze_at: int = 0) -> "SwinTransformer":
        if freeze_at >= 1:
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)
        for i in range(min(max(freeze_at - 1, 0), self.num_layers)):
            for p in self.layers[i].parameters():
                p.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x, H, W = self.patch_embed(x)
        x = self.pos_drop(x)
        outs = {}
        for i in range(self._last_stage + 1):
            x_out, Ho, Wo, x, H, W = self.layers[i](x, H, W)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x_out)
                outs[self._stage_names[i]] = (
                    y.view(-1, Ho, Wo, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
                )
        return outs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def build_swin_small(**kwargs) -> SwinTransformer:
    """Swin-S as released with StageInteractor (drop_path_rate 0.2, attention-only DropPath)."""
    cfg = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
               drop_path_rate=0.2)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)


def build_swin_tiny(**kwargs) -> SwinTransformer:
    """Swin-T (not used by the paper's tables; handy for quick experiments)."""
    cfg = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
               drop_path_rate=0.2)
    cfg.update(kwargs)
    return SwinTransformer(**cfg)
