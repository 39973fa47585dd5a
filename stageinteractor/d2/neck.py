"""``ChannelMapping`` neck of StageInteractor / AdaMixer (spec §2.2). Not an FPN.

For every level l: ``y_l = GN(Conv1x1_l(C_l))`` with

* ``lateral_convs.{l}``: ``nn.Conv2d(C_l, out_channels, 1, bias=True)``, xavier-uniform weight,
  zero bias (mmcv ``xavier_init``);
* ``gn_out``: **one** ``GroupNorm(num_groups, out_channels)`` shared by all levels (same affine
  parameters applied to each level separately), default init (1, 0);
* no activation, no top-down path, no extra levels.

Params: sum(C_l) * 256 + 4 * 256 + 512 -> 984,576 for (256, 512, 1024, 2048) and 370,176 for
Swin-S (96, 192, 384, 768).

CPU float32 with channels-last inputs (what :class:`~stageinteractor.d2.backbone.ResNet`'s folded
path returns, :func:`~stageinteractor.d2.backbone.resnet.use_folded`): each lateral conv runs on
oneDNN's convolution (dilation 2, no effect on a 1x1 kernel, keeps torch from its ~2x slower THNN
kernel for unstrided 1x1 convs at 1 thread; see the resnet module doc). The maps stay
channels-last, in training too: the decoder's sampler then reads them with its gather kernel.
Measured (R50-100q training step, batch 2, 800x1216, 1 thread, sampler with the shared map
gradient of ``core/shared_grad.py``, one process, interleaved, best of 2, load ~1): 9.3 s with
contiguous training maps (a layout copy per level before the GroupNorm, grid_sample kernel) vs
8.3 s channels-last. (Before that sampler
change the channels-last maps were ~1.4x slower at 512x768.) Other inputs (NCHW, CUDA, autocast,
tracing) run ``nn.Conv2d`` as it is, the layout following the input's.

Official key mapping (mmdet ``neck.``): ``lateral_convs.{l}.conv.{weight,bias}`` ->
``lateral_convs.{l}.{weight,bias}``; ``gn_out.*`` -> ``gn_out.*``.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from .backbone.resnet import use_folded

__all__ = ["ChannelMapping"]


class ChannelMapping(nn.Module):
    """Per-level 1x1 conv to ``out_channels`` followed by ONE shared GroupNorm.

    Args:
        input_shapes: ``backbone.output_shape()`` (dict name -> ShapeSpec); gives the input
            channels and strides of ``in_features``. Either this or ``in_channels``.
        in_features: the backbone feature names to use, fine to coarse.
        out_channels: 256 as released.
        num_groups: GroupNorm groups (32).
        in_channels: explicit input channels per level (alternative to ``input_shapes``).
        strides: strides per level when ``in_channels`` is given (default 4, 8, 16, 32).

    ``forward(features)``: ``features`` is the backbone's dict (or a list/tuple ordered like
    ``in_features``); returns a list of ``len(in_features)`` tensors (B, out_channels, H_l, W_l)
    (channels-last memory format in CPU inference, and in CPU training after the folded ResNet;
    the values do not depend on the layout).
    """

    def __init__(
        self,
        input_shapes: Optional[Mapping[str, ShapeSpec]] = None,
        in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 256,
        num_groups: int = 32,
        *,
        in_channels: Optional[Sequence[int]] = None,
        strides: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.in_features = list(in_features)
        if (input_shapes is None) == (in_channels is None):
            raise ValueError("give exactly one of input_shapes or in_channels")
        if input_shapes is not None:
            in_channels = [input_shapes[f].channels for f in self.in_features]
            strides = [input_shapes[f].stride for f in self.in_features]
        else:
            if len(in_channels) != len(self.in_features):
                raise ValueError("in_channels and in_features must have the same length")
            if strides is None:
                strides = [4 * 2 ** i for i in range(len(in_channels))]
        self.in_channels = [int(c) for c in in_channels]
        self.strides = [None if s is None else int(s) for s in strides]
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, kernel_size=1, bias=True) for c in self.in_channels
        )
        self.gn_out = nn.GroupNorm(num_groups, out_channels)
        self.reset_parameters()

    def reset_parameters(self):
        for conv in self.lateral_convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.ones_(self.gn_out.weight)
        nn.init.zeros_(self.gn_out.bias)

    def forward(
        self, features: Union[Dict[str, torch.Tensor], Sequence[torch.Tensor]]
    ) -> List[torch.Tensor]:
        if isinstance(features, Mapping):
            features = [features[f] for f in self.in_features]
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} levels, got {len(features)}")
        out = [self.gn_out(self._lateral(conv, x)) for conv, x in zip(self.lateral_convs, features)]
        if not self.training and out[0].device.type == "cpu" and not torch.jit.is_tracing():
            # CPU inference: channels-last maps (same values, one layout copy per level). The
            # decoder's sampler reads every map at 4 corners x 100s of points x 6 stages, and
            # the CPU ``grid_sample`` then gathers a pixel's channels from one or two cache lines
            # instead of one plane per channel (3-4x faster at the stride-4 level; see
            # ``PointSampler.fold``). GPUs keep the contiguous layout; CPU training keeps the
            # layout of the lateral convs' result (channels-last after the folded ResNet).
            out = [f.contiguous(memory_format=torch.channels_last) for f in out]
        return out

    def _lateral(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` for x (B, C_l, H, W) -> (B, out_channels, H, W). A channels-last x on the
        folded CPU path runs on oneDNN's convolution (channels-last result; module doc)."""
        if x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous() and use_folded(x):
            return F.conv2d(x, conv.weight, conv.bias, 1, 0, 2)  # dilation 2: oneDNN, not THNN
        return conv(x)

    def output_shape(self) -> List[ShapeSpec]:
        return [ShapeSpec(channels=self.out_channels, stride=s) for s in self.strides]
