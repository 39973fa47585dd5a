"""Dual cross-attention (DCA) for DINO (paper Sec. 4, Table 4).

"To achieve larger model capacity, we opt to simply double the cross-attention": every decoder
layer applies two multi-scale deformable cross-attentions with *separate* weights, each followed
by its own LayerNorm::

    self_attn -> norm -> cross_attn -> norm -> cross_attn -> norm -> ffn -> norm

This is detrex's own ``BaseTransformerLayer`` with a third attention module and a longer
``operation_order`` -- no new layer code. Two things stop it from being a pure config of detrex's
``DINOTransformerDecoder``: that class builds its layer inside ``__init__`` (the attention list and
order are not arguments), and DINO passes ``attn_masks=[dn_mask, None]`` (two entries) while a
three-attention layer asserts three. :class:`DCADINOTransformerDecoder` therefore rebuilds the
layers with the extra cross-attention and pads ``attn_masks`` with ``None`` for it; the decoder's
forward (reference-point refinement, look-forward-twice, heads) is detrex's.
"""

import copy
from typing import Optional

import torch.nn as nn

from detrex.layers import (
    FFN,
    BaseTransformerLayer,
    MultiheadAttention,
    MultiScaleDeformableAttention,
)
from projects.dino.modeling import DINOTransformerDecoder

__all__ = ["DCADINOTransformerDecoder", "DCA_OPERATION_ORDER"]

DCA_OPERATION_ORDER = (
    "self_attn",
    "norm",
    "cross_attn",
    "norm",
    "cross_attn",
    "norm",
    "ffn",
    "norm",
)


class DCADINOTransformerDecoder(DINOTransformerDecoder):
    """detrex ``DINOTransformerDecoder`` whose layers carry ``num_cross_attn`` deformable
    cross-attentions (2 = DCA; 1 gives detrex's layer). Same constructor arguments otherwise."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        attn_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        num_layers: int = 6,
        return_intermediate: bool = True,
        num_feature_levels: int = 4,
        look_forward_twice: bool = True,
        use_checkpoint: bool = True,
        num_cross_attn: int = 2,
    ):
        super().__init__(
            embed_dim=embed_dim,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            attn_dropout=attn_dropout,
            ffn_dropout=ffn_dropout,
            num_layers=num_layers,
            return_intermediate=return_intermediate,
            num_feature_levels=num_feature_levels,
            look_forward_twice=look_forward_twice,
            use_checkpoint=use_checkpoint,
        )
        if num_cross_attn < 1:
            raise ValueError(
                f"DCADINOTransformerDecoder: num_cross_attn must be >= 1, got {num_cross_attn}"
            )
        self.num_cross_attn = int(num_cross_attn)
        order = (
            ("self_attn", "norm") + ("cross_attn", "norm") * self.num_cross_attn + ("ffn", "norm")
        )
        cross = [
            MultiScaleDeformableAttention(
                embed_dim=embed_dim,
                num_heads=num_heads,
                dropout=attn_dropout,
                batch_first=True,
                num_levels=num_feature_levels,
            )
            for _ in range(self.num_cross_attn)
        ]
        layer = BaseTransformerLayer(
            attn=[
                MultiheadAttention(
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    attn_drop=attn_dropout,
                    batch_first=True,
                ),
                *cross,
            ],
            ffn=FFN(
                embed_dim=embed_dim,
                feedforward_dim=feedforward_dim,
                output_dim=embed_dim,
                ffn_drop=ffn_dropout,
            ),
            norm=nn.LayerNorm(embed_dim),
            operation_order=order,
        )
        # BaseTransformerLayer deep-copies ffn/norm per use; the attentions are distinct modules,
        # and deep-copying the layer gives every decoder layer its own weights (as detrex does).
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, *args, attn_masks: Optional[list] = None, **kwargs):
        """detrex's forward; ``attn_masks`` ([self_attn_mask, cross_mask]) is padded with None."""
        num_attn = self.layers[0].num_attn
        if isinstance(attn_masks, (list, tuple)) and len(attn_masks) < num_attn:
            attn_masks = list(attn_masks) + [None] * (num_attn - len(attn_masks))
        return super().forward(*args, attn_masks=attn_masks, **kwargs)
