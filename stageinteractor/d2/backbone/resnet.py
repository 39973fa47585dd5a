"""ResNet / ResNeXt(-DCN) backbones for StageInteractor (detectron2 ``Backbone``).

Behaviour follows the released mmdet configs (spec §2.1):

* "pytorch" style bottleneck: the stride sits on the 3x3 conv (``conv2``); a 1x1 projection
  shortcut (conv + norm) on the first block of every stage (also res2, 64 -> 256, stride 1).
* Normalisation ``norm="EvalBN"`` (default): :class:`EvalBatchNorm2d`, a BatchNorm that is
  **always** in inference mode (running statistics never update, also under
  ``model.train()``) while its affine gamma/beta stay ordinary trainable parameters. Together
  with ``freeze_at=2`` (stem + res2 get ``requires_grad=False``) this reproduces mmdet's
  ``frozen_stages=1, norm_eval=True, requires_grad=True``: the BN affine of res3-res5 trains.
  Any detectron2 norm name (``"FrozenBN"``, ``"BN"``, ``"SyncBN"``, ...) or a callable
  ``channels -> nn.Module`` is accepted too.
* ResNeXt: ``groups`` / ``width_per_group`` (32x4d -> bottleneck widths 128/256/512/1024).
* Deformable conv v1 (``stage_with_dcn``): the 3x3 conv of the chosen stages becomes
  :class:`DeformConv2d` computed with ``torchvision.ops.deform_conv2d`` (CPU and CUDA). Its
  offsets come from a sibling plain conv ``conv2_offset`` (3x3, same stride, with bias,
  zero-initialised, ``2 * deform_groups * 9`` channels, offset layout per kernel tap
  ``(dy, dx)`` which is the layout of mmcv's DCN and of torchvision).

State-dict naming (detectron2 convention, so ``R-50.pkl`` style keys match one to one)::

    stem.conv1.weight                       stem.conv1.norm.{weight,bias,running_mean,running_var}
    res{k}.{b}.conv{1,2,3}.weight           res{k}.{b}.conv{1,2,3}.norm.{...}
    res{k}.0.shortcut.weight                res{k}.0.shortcut.norm.{...}
    res{k}.{b}.conv2_offset.{weight,bias}   (DCN stages only)

with k = 2..5 (torchvision ``layer{k-1}``). :class:`EvalBatchNorm2d` has no
``num_batches_tracked`` buffer. Feature names: ``res2..res5`` (strides 4/8/16/32, channels
256/512/1024/2048 for every depth here).

**Folded CPU path** (:func:`use_folded`; CPU float32, no autocast, not tracing / exporting /
compiling, oneDNN available). An EvalBN after a conv is an affine map per output channel, so
``BN(conv(x, W)) = conv(x, W * s) + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta -
mean * s`` (:meth:`Conv2dNorm.folded`; the gradients to ``W``, ``gamma`` and ``beta`` flow through
autograd of this small expression). The backbone then runs channels-last (NHWC) on oneDNN's
convolutions with the bias fused, 1x1 convs included (:meth:`Conv2dNorm.forward_folded`: ~2x the
rate of the THNN kernel torch otherwise picks for them at 1 thread; measured also against 1x1
convs as oneDNN GEMMs over the pixel rows with fused ReLU / residual add, which were 2-5 % slower
in the whole backbone). No BatchNorm pass runs, forward or backward, and no conv output is kept
for one; the residual add runs in place. The values equal the conv + BN path's up to float
round-off; the output maps are channels-last (same shapes and values;
``ChannelMapping`` reads their pixel rows without a copy). Every other case (CUDA, meta / fake
stand-ins, autocast, float64, tracing, DCN blocks, detectron2 norms) runs the plain
``conv -> norm`` modules.

Measured on the 2-core AMD EPYC (AVX-512), R50 + ChannelMapping forward and backward, training
mode, batch 2, 800x1216, one process interleaved with the plain path (other jobs on the cores,
load 1.8-2.4), best of 3: 1 thread 12.3 -> 7.7 s (process CPU time 12.1 -> 7.6 s), 2 threads
6.1 -> 3.9 s; peak memory above the model 2395 -> 1532 MiB. Whole R50-100q training step, 1
thread, best of 2: 15.9 -> 12.3 s.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import Backbone

from stageinteractor.core.tracing import is_tracing

__all__ = [
    "EvalBatchNorm2d",
    "Conv2dNorm",
    "DeformConv2d",
    "BottleneckBlock",
    "ResNetStem",
    "ResNet",
    "RESNET_DEPTHS",
    "build_resnet50",
    "build_resnet101",
    "build_resnext101_32x4d_dcn",
    "use_folded",
]

NormSpec = Union[str, Callable[[int], nn.Module], None]

# number of bottleneck blocks in res2..res5
RESNET_DEPTHS: Dict[int, Tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class EvalBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its running statistics.

    ``weight``/``bias`` are trainable ``nn.Parameter``\\ s (they can be frozen through
    ``requires_grad``); ``running_mean``/``running_var`` are buffers that are never updated,
    whatever ``self.training`` is. Numerically identical to ``nn.BatchNorm2d(...).eval()``.
    There is no ``num_batches_tracked`` buffer (it would never change).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training=False: use (and never update) the running statistics.
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _make_norm(norm: NormSpec, channels: int) -> Optional[nn.Module]:
    if norm == "EvalBN":
        return EvalBatchNorm2d(channels)
    return get_norm(norm, channels)


def use_folded(x: torch.Tensor) -> bool:
    """Whether the backbone runs ``x`` on the folded channels-last CPU path (module doc): a CPU
    float32 tensor, no CPU autocast, not tracing / exporting / compiling, oneDNN enabled."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not is_tracing()
    )


class Conv2dNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm stored as the child ``.norm``.

    Same state-dict layout as ``detectron2.layers.Conv2d`` (``weight``, ``norm.*``).

    With an :class:`EvalBatchNorm2d` norm, :meth:`forward_folded` computes the same function with
    the norm folded into the conv (see the module doc)."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return x

    @property
    def foldable(self) -> bool:
        """The norm is an :class:`EvalBatchNorm2d` (an affine map per channel) and the conv has
        no padding mode other than zeros."""
        return isinstance(self.norm, EvalBatchNorm2d) and self.padding_mode == "zeros"

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W * s, t)``: weight (out, in/groups, kh, kw) and bias (out,) of the conv with the
        EvalBN folded in, ``s = gamma / sqrt(running_var + eps)``, ``t = beta - running_mean * s``
        (+ ``conv.bias * s``). Differentiable in ``weight``, ``gamma``, ``beta`` (and the bias)."""
        bn = self.norm
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        t = bn.bias - bn.running_mean * s
        if self.bias is not None:
            t = t + self.bias * s
        return self.weight * s.view(-1, 1, 1, 1), t

    def forward_folded(self, x: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
        """``self(x)`` (then a ReLU, in place, with ``relu``) for a :attr:`foldable` conv with the
        norm folded in (CPU, :func:`use_folded`): ``F.conv2d(x, W * s, t)`` on a channels-last x,
        which oneDNN computes with the bias fused (channels-last out). An unstrided 1x1 conv is
        given dilation 2 (no effect on a 1x1 kernel): torch sends unstrided undilated 1x1 convs at
        1 thread and batch < 16 to its THNN kernel, at about half oneDNN's rate forward and
        backward on the measured CPU (module doc)."""
        w, t = self.folded()
        dilation = self.dilation
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            dilation = (2, 2)
        y = F.conv2d(
            x.contiguous(memory_format=torch.channels_last), w, t,
            self.stride, self.padding, dilation, self.groups,
        )
        return F.relu_(y) if relu else y


class DeformConv2d(nn.Module):
    """Deformable convolution v1 (no modulation mask) via ``torchvision.ops.deform_conv2d``.

    ``forward(x, offset)``; ``offset``: (B, 2 * deform_groups * kh * kw, H_out, W_out), per
    deform group and kernel tap (row-major) the pair (dy, dx). Parameters: ``weight``
    (out, in/groups, kh, kw), optional ``bias``, optional ``norm`` child."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        assert in_channels % groups == 0 and out_channels % groups == 0
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # same as nn.Conv2d's default

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # The op runs in float32 (fp32/fp64 inputs run as they are). This covers CUDA fp16 and
        # CPU bf16 autocast (torchvision has no reduced-precision CPU kernel); the result keeps
        # the input's dtype, like torchvision's own autocast wrapper.
        dtype = x.dtype
        low = dtype in (torch.float16, torch.bfloat16)
        if low or torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = deform_conv2d(
                    x.float(), offset.float(), self.weight.float(),
                    None if self.bias is None else self.bias.float(),
                    stride=self.stride, padding=self.padding, dilation=self.dilation,
                ).to(dtype)
        else:
            x = deform_conv2d(
                x, offset, self.weight, self.bias,
                stride=self.stride, padding=self.padding, dilation=self.dilation,
            )
        if self.norm is not None:
            x = self.norm(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class BottleneckBlock(nn.Module):
    """Pytorch-style bottleneck: 1x1 -> 3x3 (stride, groups, optional DCN) -> 1x1, + shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        groups: int = 1,
        norm: NormSpec = "EvalBN",
        dcn: bool = False,
        deform_groups: int = 1,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        if in_channels != out_channels or stride != 1:
            self.shortcut = Conv2dNorm(
                in_channels, out_channels, 1, stride=stride, bias=False,
                norm=_make_norm(norm, out_channels),
            )
        else:
            self.shortcut = None
        self.conv1 = Conv2dNorm(
            in_channels, bottleneck_channels, 1, bias=False,
            norm=_make_norm(norm, bottleneck_channels),
        )
        self.dcn = dcn
        if dcn:
            self.conv2_offset = nn.Conv2d(
                bottleneck_channels, 2 * deform_groups * 9, 3, stride=stride, padding=1, bias=True
            )
            self.conv2 = DeformConv2d(
                bottleneck_channels, bottleneck_channels, 3, stride=stride, padding=1,
                groups=groups, deform_groups=deform_groups, bias=False,
                norm=_make_norm(norm, bottleneck_channels),
            )
        else:
            self.conv2 = Conv2dNorm(
                bottleneck_channels, bottleneck_channels, 3, stride=stride, padding=1,
                groups=groups, bias=False, norm=_make_norm(norm, bottleneck_channels),
            )
        self.conv3 = Conv2dNorm(
            bottleneck_channels, out_channels, 1, bias=False, norm=_make_norm(norm, out_channels)
        )
        self._init_weights()

    def _init_weights(self):
        # Random-init defaults (ImageNet weights normally overwrite them): kaiming for convs.
        for m in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if m is not None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.dcn:  # mmcv DeformConv2dPack: offsets start at exactly 0
            nn.init.zeros_(self.conv2_offset.weight)
            nn.init.zeros_(self.conv2_offset.bias)

    @property
    def foldable(self) -> bool:
        """Every conv is a :attr:`Conv2dNorm.foldable` conv (EvalBN, no DCN)."""
        return not self.dcn and all(
            m.foldable for m in (self.conv1, self.conv2, self.conv3, self.shortcut) if m is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.foldable and use_folded(x):
            return self.forward_folded(x)
        out = F.relu_(self.conv1(x))
        if self.dcn:
            out = self.conv2(out, self.conv2_offset(out))
        else:
            out = self.conv2(out)
        out = F.relu_(out)
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + identity)

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The same function on the folded channels-last path (module doc): x (N, C, H, W)
        -> (N, C_out, H', W') channels-last."""
        out = self.conv1.forward_folded(x, relu=True)
        out = self.conv2.forward_folded(out, relu=True)
        out = self.conv3.forward_folded(out)
        identity = x if self.shortcut is None else self.shortcut.forward_folded(x)
        # conv3's output is not saved by its backward: the residual add can run in place
        return F.relu_(out.add_(identity))


class ResNetStem(nn.Module):
    """7x7/2 conv (``conv1``, with ``conv1.norm``) + ReLU + 3x3/2 max-pool: stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: NormSpec = "EvalBN"):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = Conv2dNorm(
            in_channels, out_channels, 7, stride=2, padding=3, bias=False,
            norm=_make_norm(norm, out_channels),
        )
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1.foldable and use_folded(x):
            x = self.conv1.forward_folded(x, relu=True)  # channels-last
        else:
            x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet(Backbone):
    """ResNet / ResNeXt backbone with optional DCNv1, as a detectron2 ``Backbone``.

    Args:
        depth: 50, 101 or 152.
        groups: cardinality of the 3x3 convs (32 for ResNeXt-32x4d).
        width_per_group: bottleneck width per group in res2 (64 for ResNet, 4 for 32x4d);
            res_k uses ``groups * width_per_group * 2**(k-2)``.
        stage_with_dcn: 4 booleans for res2..res5 (X101-DCN: ``(False, True, True, True)``).
        deform_groups: offset groups of the DCN (1 as released).
        norm: ``"EvalBN"`` (default, see module doc), a detectron2 norm name or a callable.
        freeze_at: detectron2 semantics: 0 = nothing frozen, 1 = stem, 2 = stem + res2
            (default; = mmdet ``frozen_stages=1``), k = stem + res2..res_k. Frozen parameters get
            ``requires_grad=False``.
        out_features: subset of ``("res2", "res3", "res4", "res5")``.
        in_channels: image channels.

    ``forward(x)`` with x (B, 3, H, W) returns ``{name: (B, C, ceil(H/s), ceil(W/s))}``
    (channels-last maps on the folded CPU path of EvalBN ResNets, see the module doc).
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        deform_groups: int = 1,
        norm: NormSpec = "EvalBN",
        freeze_at: int = 2,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        in_channels: int = 3,
    ):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if len(stage_with_dcn) != 4:
            raise ValueError("stage_with_dcn needs one flag per stage res2..res5")
        self.depth = depth
        self.groups = groups
        self.width_per_group = width_per_group
        self.stage_with_dcn = tuple(bool(b) for b in stage_with_dcn)
        self.stem = ResNetStem(in_channels, 64, norm)

        self._out_feature_strides = {"stem": 4}
        self._out_feature_channels = {"stem": 64}
        self.stage_names = []
        prev = 64
        for i, n_blocks in enumerate(RESNET_DEPTHS[depth]):
            name = f"res{i + 2}"
            out_ch = 256 * 2 ** i
            bottleneck = groups * width_per_group * 2 ** i
            blocks = []
            for b in range(n_blocks):
                blocks.append(
                    BottleneckBlock(
                        prev, out_ch, bottleneck_channels=bottleneck,
                        stride=(2 if (b == 0 and i > 0) else 1), groups=groups, norm=norm,
                        dcn=self.stage_with_dcn[i], deform_groups=deform_groups,
                    )
                )
                prev = out_ch
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._out_feature_strides[name] = 4 * 2 ** i
            self._out_feature_channels[name] = out_ch

        out_features = tuple(out_features)
        for f in out_features:
            if f not in self._out_feature_channels:
                raise ValueError(f"unknown out feature {f!r}")
        self._out_features = list(out_features)
        # stop after the last requested stage
        last = max(self.stage_names.index(f) if f != "stem" else -1 for f in out_features)
        self._run_stages = self.stage_names[: last + 1]
        self.freeze_at = freeze_at
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "ResNet":
        """Set ``requires_grad=False`` on the stem (freeze_at >= 1) and res2..res_{freeze_at}."""
        if freeze_at >= 1:
            for p in self.stem.parameters():
                p.requires_grad_(False)
        for i, name in enumerate(self.stage_names):
            if freeze_at >= i + 2:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ResNet takes an input of shape (N, C, H, W), got {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self._run_stages:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def build_resnet50(**kwargs) -> ResNet:
    """R50 as released (torchvision weights, freeze_at=2, EvalBN)."""
    return ResNet(50, **kwargs)


def build_resnet101(**kwargs) -> ResNet:
    """R101 as released."""
    return ResNet(101, **kwargs)


def build_resnext101_32x4d_dcn(**kwargs) -> ResNet:
    """X101-32x4d with DCNv1 in res3-res5 (deform_groups=1), as released."""
    kwargs.setdefault("groups", 32)
    kwargs.setdefault("width_per_group", 4)
    kwargs.setdefault("stage_with_dcn", (False, True, True, True))
    return ResNet(101, **kwargs)
