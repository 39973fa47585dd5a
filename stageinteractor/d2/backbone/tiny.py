"""A tiny 4-level convolutional backbone for the CPU demo and fast tests.

Not part of the paper: it only exists so that ``configs/demo/*`` can train from scratch in a
few minutes on two CPU cores. The interface matches the ResNet backbones (detectron2
``Backbone`` returning ``res2..res5`` at strides 4/8/16/32), so every decoder/neck setting of
the paper runs unchanged on top of it.

Layout (``widths = (c2, c3, c4, c5)``)::

    stem : conv3x3/2 (3 -> c2/2) GN ReLU, conv3x3/2 (c2/2 -> c2) GN ReLU       stride 4
    res2 : ``depth`` x [conv3x3 GN ReLU] (c2)                                     stride 4
    res_k: conv3x3/2 (c_{k-1} -> c_k) GN ReLU, then ``depth - 1`` x [conv3x3 GN ReLU],
           k = 3, 4, 5                                                          stride 4*2^(k-2)

Each repeated conv block is residual (x + block(x)).
"""
from typing import Dict, Sequence

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

__all__ = ["TinyBackbone"]


def _conv_gn_relu(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(groups, cout), cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class TinyBackbone(Backbone):
    """Small residual conv net with outputs ``res2..res5`` (strides 4, 8, 16, 32).

    Args:
        widths: channels of res2..res5.
        depth: conv blocks per stage (>= 1).
        gn_groups: GroupNorm groups (capped by the channel count).
        out_features: subset of ``("res2", "res3", "res4", "res5")``.

    ``forward(x)`` with x (B, 3, H, W), H and W multiples of 32, returns
    ``{name: (B, C_name, H/s, W/s)}``.
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (32, 64, 128, 256),
        depth: int = 1,
        gn_groups: int = 8,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or any(w <= 0 for w in widths):
            raise ValueError(f"TinyBackbone: widths must be 4 positive ints, got {widths}")
        if int(depth) < 1:
            raise ValueError(f"TinyBackbone: depth must be >= 1, got {depth}")
        names = ("res2", "res3", "res4", "res5")
        for f in out_features:
            if f not in names:
                raise ValueError(f"TinyBackbone: unknown out feature {f!r}, expected one of {names}")
        half = max(widths[0] // 2, 1)
        self.stem = nn.Sequential(
            _conv_gn_relu(3, half, 2, gn_groups), _conv_gn_relu(half, widths[0], 2, gn_groups)
        )
        prev = widths[0]
        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        for i, (name, w) in enumerate(zip(names, widths)):
            layers = [] if i == 0 else [_conv_gn_relu(prev, w, 2, gn_groups)]
            n_res = int(depth) if i == 0 else int(depth) - 1
            layers += [_Residual(_conv_gn_relu(w, w, 1, gn_groups)) for _ in range(n_res)]
            self.add_module(name, nn.Sequential(*layers))
            self._out_feature_strides[name] = 4 * 2 ** i
            self._out_feature_channels[name] = w
            prev = w
        self._out_features = list(out_features)
        self._names = names

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"TinyBackbone takes (B, C, H, W), got {tuple(x.shape)}")
        out = {}
        x = self.stem(x)
        for name in self._names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                out[name] = x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }
