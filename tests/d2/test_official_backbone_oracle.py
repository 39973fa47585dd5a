"""Value oracle for the authors'-checkpoint converter's backbones (issue 24).

The round-trip tests (tests/d2/test_official_checkpoint.py) cannot see a mapping that is wrong
the same way in both directions between same-shaped tensors (e.g. ``bn1`` <-> ``bn2``). Here
the authors' backbone keys are loaded, under their own names, into an independent
implementation, and its outputs are compared with our backbone loaded from the converter's
output (and the reverse conversion likewise):

* R50 / R101: torchvision's ResNet (the authors' names are torchvision's once ``backbone.`` is
  stripped; torchvision puts the stride on the 3x3 conv, as mmdet's "pytorch" style).
* X101-32x4d-DCN: torchvision's ResNeXt with every layer2-4 ``conv2`` replaced by a deformable
  convolution written here from its definition (bilinear sampling at ``p + offset`` per kernel
  tap, ``(dy, dx)`` pairs, zero outside, then a grouped sum), plus a hand-written table of the
  keys of one plain and one DCN block.
* Swin-S: timm's SwinTransformer (``always_partition=True``: shifted windows at every stage, as
  the authors' mmdet Swin) with the authors' patch merging written here from mmcv's definition
  (``nn.Unfold`` order, so the authors' ``downsample`` weights load unpermuted), the output
  LayerNorms ``norm0..3`` applied by hand, and the key names mapped by a hand-written table.

All in float64 (comparisons at 1e-9 relative); the random official values are generated from
the layout with a small decoder (the decoder part has its own oracle: the parity fixture).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("detectron2")
torchvision = pytest.importorskip("torchvision")

from torchvision.models.resnet import Bottleneck  # noqa: E402
from torchvision.models.resnet import ResNet as TVResNet  # noqa: E402

from stageinteractor.d2.backbone import (  # noqa: E402
    build_resnet50,
    build_resnet101,
    build_resnext101_32x4d_dcn,
    build_swin_small,
)
from stageinteractor.official.checkpoint import (  # noqa: E402
    convert_official_to_ours,
    convert_ours_to_official,
    official_layout,
)
from stageinteractor.official.layout import DecoderHParams  # noqa: E402

# a small decoder: only the backbone is under test here
HP = DecoderHParams(num_queries=2, num_classes=3, num_stages=3, dim=32, ffn_dim=16, num_heads=2, groups=4,
                    first_points=2, points=2, subpoints=2, out_points=8)
RTOL = ATOL = 1e-9


@pytest.fixture(autouse=True)
def _float64_default():
    """Build everything in float64; restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _relative_position_index(ws):
    """Swin's (ws^2, ws^2) index into the bias table, from its definition."""
    coords = [(i, j) for i in range(ws) for j in range(ws)]
    return torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + (a[1] - b[1] + ws - 1) for b in coords]
                         for a in coords], dtype=torch.int64)


def _value(key, shape, gen):
    """A random value in the authors' layout: BN statistics positive, conv weights He-scaled
    (so that 100 layers keep O(1) activations), dead decoder layers 0."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith("relative_position_index"):
        return _relative_position_index(7)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if "subbox_score_list" in key or key.endswith("iou_snyc_statistics.running_var"):
        return torch.zeros(shape)
    if key.startswith("backbone.") and len(shape) == 4:
        if ".conv_offset." in key:  # offsets of a few pixels, fractional
            return torch.randn(shape, generator=gen) * 0.02
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5
    if key.startswith("backbone.") and key.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
        return torch.rand(shape, generator=gen) * 0.5 + 0.5
    if key.endswith("conv_offset.bias"):
        return torch.randn(shape, generator=gen) * 0.7
    return (torch.rand(shape, generator=gen) - 0.5) * 0.4


def _official(kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: _value(k, s, gen) for k, s in official_layout(kind, HP.num_queries, HP).items()}


def _backbone_part(sd, prefix="backbone."):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _ours_loaded(build, ours_sd):
    net = build(freeze_at=0)
    net.load_state_dict(_backbone_part(ours_sd), strict=True)
    return net.eval()


# ------------------------------------------------------------------------------------------
# ResNet / ResNeXt reference: torchvision
# ------------------------------------------------------------------------------------------
def _bilinear_zero(x, py, px):
    """x (B, C, H, W); py, px (B, Ho, Wo) real positions -> (B, C, Ho, Wo); zero outside."""
    B, C, H, W = x.shape
    y0, x0 = torch.floor(py), torch.floor(px)
    out = x.new_zeros(B, C, *py.shape[1:])
    flat = x.reshape(B, C, H * W)
    for dy in (0, 1):
        for dx in (0, 1):
            yc, xc = y0 + dy, x0 + dx
            w = (1 - (py - yc).abs()) * (1 - (px - xc).abs())  # bilinear weight of this corner
            inside = (yc >= 0) & (yc < H) & (xc >= 0) & (xc < W)
            idx = (yc.clamp(0, H - 1) * W + xc.clamp(0, W - 1)).long().reshape(B, 1, -1).expand(B, C, -1)
            val = flat.gather(2, idx).reshape(out.shape)
            out += val * (w * inside)[:, None]
    return out


def deform_conv_by_hand(x, offset, weight, stride, groups):
    """DCNv1, 3x3, padding 1, one offset group: tap k = (ky, kx) samples x at
    (i*stride - 1 + ky + dy_k, j*stride - 1 + kx + dx_k), offset channels (2k, 2k+1) = (dy, dx)."""
    B, C, H, W = x.shape
    O, Ho, Wo = weight.shape[0], offset.shape[2], offset.shape[3]
    base_y = (torch.arange(Ho, dtype=x.dtype) * stride - 1)[None, :, None]
    base_x = (torch.arange(Wo, dtype=x.dtype) * stride - 1)[None, None, :]
    cols = torch.stack([
        _bilinear_zero(x, base_y + k // 3 + offset[:, 2 * k], base_x + k % 3 + offset[:, 2 * k + 1])
        for k in range(9)
    ], dim=2)  # (B, C, 9, Ho, Wo)
    cg, og = C // groups, O // groups
    cols = cols.reshape(B, groups, cg * 9, Ho, Wo)  # per group: (input channel, tap)
    w = weight.reshape(groups, og, cg * 9)
    return torch.einsum("bgkhw,gok->bgohw", cols, w).reshape(B, O, Ho, Wo)


class HandDeformConv(nn.Module):
    """The authors' ``conv2`` of a DCN block (mmcv DeformConv2dPack): ``weight`` + ``conv_offset``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.groups = conv.stride[0], conv.groups
        self.weight = nn.Parameter(torch.empty_like(conv.weight))
        self.conv_offset = nn.Conv2d(conv.in_channels, 18, 3, stride=self.stride, padding=1, bias=True)

    def forward(self, x):
        return deform_conv_by_hand(x, self.conv_offset(x), self.weight, self.stride, self.groups)


def _torchvision_resnet(kind):
    if kind == "r50":
        return TVResNet(Bottleneck, [3, 4, 6, 3])
    if kind == "r101":
        return TVResNet(Bottleneck, [3, 4, 23, 3])
    net = TVResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    for layer in (net.layer2, net.layer3, net.layer4):
        for block in layer:
            block.conv2 = HandDeformConv(block.conv2)
    return net


def _tv_loaded(kind, official_sd):
    net = _torchvision_resnet(kind)
    res = net.load_state_dict(_backbone_part(official_sd), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys, res
    return net.eval()


def _tv_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        x = layer(x)
        out[f"res{i + 2}"] = x
    return out


RESNETS = {"r50": build_resnet50, "r101": build_resnet101, "x101_dcn": build_resnext101_32x4d_dcn}


def _assert_same_features(ours, ref):
    assert sorted(ours) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["r50", "r101", "x101_dcn"])
def test_resnet_backbones_match_torchvision_both_directions(kind):
    official = _official(kind)
    ours_sd, report = convert_official_to_ours(official, hp=HP)
    assert report.backbone == kind
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    tv, ours = _tv_loaded(kind, official), _ours_loaded(RESNETS[kind], ours_sd)
    with torch.no_grad():
        ref = _tv_features(tv, x)
        _assert_same_features(ours(x), ref)
        # the reverse direction: our weights (new values) -> the authors' layout -> torchvision
        gen = torch.Generator().manual_seed(2)
        ours2 = {k: (v * (1 + 0.2 * torch.rand(v.shape, generator=gen)) if k.startswith("backbone.")
                     and v.is_floating_point() else v) for k, v in ours_sd.items()}
        back = convert_ours_to_official(ours2, hp=HP)
        tv.load_state_dict(_backbone_part(back), strict=False)
        ours.load_state_dict(_backbone_part(ours2), strict=True)
        ref2 = _tv_features(tv, x)
        _assert_same_features(ours(x), ref2)
    assert not torch.allclose(ref["res5"], ref2["res5"])


def test_deform_conv_by_hand_reduces_to_grouped_conv_and_shifts():
    """The by-hand DCN itself: zero offsets = F.conv2d with groups; a whole-pixel offset
    (dy, dx) = (1, -2) on every tap = the convolution of the shifted input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 7, 9, generator=g)
    w = torch.randn(12, 2, 3, 3, generator=g)
    for stride in (1, 2):
        ref = F.conv2d(x, w, stride=stride, padding=1, groups=4)
        off = torch.zeros(2, 18, *ref.shape[2:])
        torch.testing.assert_close(deform_conv_by_hand(x, off, w, stride, 4), ref)
    off = torch.zeros(2, 18, 7, 9)
    off[:, 0::2], off[:, 1::2] = 1.0, -2.0
    # tap (ky, kx) of output (i, j) reads x[i + ky, j + kx - 3], zero outside x: a valid
    # convolution over x zero-padded by 3, rows from 3 and columns from 0
    xp = F.pad(x, (3, 3, 3, 3))[:, :, 3:3 + 7 + 2, 0:9 + 2]
    torch.testing.assert_close(deform_conv_by_hand(x, off, w, 1, 4), F.conv2d(xp, w, groups=4))
    # a half-pixel dx averages two neighbours: output (1, 1)'s centre tap reads x[1, 1.5]
    off = torch.zeros(1, 18, 3, 3)
    off[:, 1::2] = 0.5
    one = torch.zeros(1, 1, 3, 3)
    one[0, 0, 1, 1] = 1.0  # centre tap only
    xs = torch.arange(9.0).view(1, 1, 3, 3)
    out = deform_conv_by_hand(xs, off, one, 1, 1)
    assert out[0, 0, 1, 1].item() == pytest.approx((4.0 + 5.0) / 2)
    assert out[0, 0, 1, 2].item() == pytest.approx(5.0 / 2)  # x[1, 2.5]: half outside


# authors' key -> (shape, our key) for the stem, one plain block (layer1.0, with the projection
# shortcut) and one DCN block (layer2.0, stride 2) of X101-32x4d-DCN, written out by hand
X101_KEY_TABLE = {
    "backbone.conv1.weight": ((64, 3, 7, 7), "backbone.stem.conv1.weight"),
    "backbone.bn1.weight": ((64,), "backbone.stem.conv1.norm.weight"),
    "backbone.bn1.running_var": ((64,), "backbone.stem.conv1.norm.running_var"),
    "backbone.layer1.0.conv1.weight": ((128, 64, 1, 1), "backbone.res2.0.conv1.weight"),
    "backbone.layer1.0.bn1.bias": ((128,), "backbone.res2.0.conv1.norm.bias"),
    "backbone.layer1.0.conv2.weight": ((128, 4, 3, 3), "backbone.res2.0.conv2.weight"),
    "backbone.layer1.0.bn2.weight": ((128,), "backbone.res2.0.conv2.norm.weight"),
    "backbone.layer1.0.bn2.running_mean": ((128,), "backbone.res2.0.conv2.norm.running_mean"),
    "backbone.layer1.0.conv3.weight": ((256, 128, 1, 1), "backbone.res2.0.conv3.weight"),
    "backbone.layer1.0.bn3.weight": ((256,), "backbone.res2.0.conv3.norm.weight"),
    "backbone.layer1.0.downsample.0.weight": ((256, 64, 1, 1), "backbone.res2.0.shortcut.weight"),
    "backbone.layer1.0.downsample.1.running_var": ((256,), "backbone.res2.0.shortcut.norm.running_var"),
    "backbone.layer2.0.conv1.weight": ((256, 256, 1, 1), "backbone.res3.0.conv1.weight"),
    "backbone.layer2.0.bn1.weight": ((256,), "backbone.res3.0.conv1.norm.weight"),
    "backbone.layer2.0.conv2.weight": ((256, 8, 3, 3), "backbone.res3.0.conv2.weight"),
    "backbone.layer2.0.conv2.conv_offset.weight": ((18, 256, 3, 3), "backbone.res3.0.conv2_offset.weight"),
    "backbone.layer2.0.conv2.conv_offset.bias": ((18,), "backbone.res3.0.conv2_offset.bias"),
    "backbone.layer2.0.bn2.weight": ((256,), "backbone.res3.0.conv2.norm.weight"),
    "backbone.layer2.0.bn2.running_mean": ((256,), "backbone.res3.0.conv2.norm.running_mean"),
    "backbone.layer2.0.conv3.weight": ((512, 256, 1, 1), "backbone.res3.0.conv3.weight"),
    "backbone.layer2.0.bn3.bias": ((512,), "backbone.res3.0.conv3.norm.bias"),
    "backbone.layer2.0.downsample.0.weight": ((512, 256, 1, 1), "backbone.res3.0.shortcut.weight"),
    "backbone.layer4.2.conv2.weight": ((1024, 32, 3, 3), "backbone.res5.2.conv2.weight"),
    "backbone.layer4.2.conv2.conv_offset.weight": ((18, 1024, 3, 3), "backbone.res5.2.conv2_offset.weight"),
}


def test_x101_dcn_key_table_by_hand():
    layout = official_layout("x101_dcn", HP.num_queries, HP)
    official = _official("x101_dcn")
    ours, report = convert_official_to_ours(official, hp=HP)
    mapped = dict(report.mapped)
    for key, (shape, our_key) in X101_KEY_TABLE.items():
        assert layout[key] == shape, key
        assert mapped[key] == our_key, key
        assert torch.equal(ours[our_key], official[key]), key
    # DCN in layer2-4 only (30 blocks), one offset group: 18 offset channels
    offsets = [k for k in layout if k.endswith("conv_offset.weight")]
    assert len(offsets) == 4 + 23 + 3 and not any(".layer1." in k for k in offsets)
    assert {layout[k][0] for k in offsets} == {18}
    groups = {k: layout[k][0] // layout[k][1] for k in layout
              if re.search(r"layer\d\.\d+\.conv2\.weight$", k)}
    assert set(groups.values()) == {32}  # every 3x3 conv has 32 groups


# ------------------------------------------------------------------------------------------
# Swin-S reference: timm
# ------------------------------------------------------------------------------------------
class UnfoldPatchMerging(nn.Module):
    """The authors' patch merging (mmcv ``PatchMerging``): 2x2 neighbourhoods gathered by
    ``nn.Unfold`` (channel c*4 + kernel position), LayerNorm(4C), Linear(4C -> 2C, no bias).
    Takes and returns timm's NHWC tokens."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L)
        y = cols.transpose(1, 2).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(y))


# the authors' Swin names -> timm's, by hand (stage i's downsample is timm's stage i+1's)
SWIN_RENAMES = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.attn\.w_msa\.", r"layers.\1.blocks.\2.attn."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d)\.blocks\.", r"layers.\1.blocks."),
]


def _to_timm(official_backbone):
    out, norms = {}, {}
    for k, v in official_backbone.items():
        if k.endswith("relative_position_index"):
            assert torch.equal(v, _relative_position_index(7))
            continue
        m = re.match(r"^norm(\d)\.(weight|bias)$", k)
        if m:
            norms.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        m = re.match(r"^stages\.(\d)\.downsample\.(.+)$", k)
        if m:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
            continue
        for pat, repl in SWIN_RENAMES:
            if re.match(pat, k):
                k = re.sub(pat, repl, k)
                break
        out[k] = v
    return out, norms


def _timm_swin_features(official_sd, x):
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    net = SwinTransformer(img_size=tuple(x.shape[2:]), embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                          window_size=7, always_partition=True, num_classes=0, drop_path_rate=0.0)
    assert timm.__version__
    for i in (1, 2, 3):
        net.layers[i].downsample = UnfoldPatchMerging(96 * 2 ** (i - 1))
    timm_sd, norms = _to_timm(_backbone_part(official_sd))
    res = net.load_state_dict(timm_sd, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    assert all(k.startswith("norm.") for k in res.missing_keys), res.missing_keys  # timm's head norm
    net.eval()
    y = net.patch_embed(x)
    out = {}
    for i in range(4):
        y = net.layers[i](y)
        n = F.layer_norm(y, (y.shape[-1],), norms[i]["weight"], norms[i]["bias"])
        out[f"res{i + 2}"] = n.permute(0, 3, 1, 2)
    return out


def test_swin_s_matches_timm_with_the_authors_patch_merging():
    pytest.importorskip("timm")
    official = _official("swin_s")
    ours_sd, report = convert_official_to_ours(official, hp=HP)
    assert report.backbone == "swin_s"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    net = build_swin_small()
    net.load_state_dict(_backbone_part(ours_sd), strict=True)
    with torch.no_grad():
        ref = _timm_swin_features(official, x)
        _assert_same_features(net.eval()(x), ref)
