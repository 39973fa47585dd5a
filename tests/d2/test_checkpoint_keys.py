"""ImageNet key mapping: every supported format loads with no missing/unexpected keys and,
for the ResNets, gives outputs identical to torchvision's own network with the same weights."""
import copy
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("detectron2")
torchvision = pytest.importorskip("torchvision")

from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402

from stageinteractor.d2.backbone import (  # noqa: E402
    SwinTransformer,
    build_resnet50,
    build_resnet101,
    build_resnext101_32x4d_dcn,
    build_swin_small,
)
from stageinteractor.d2.checkpoint import (  # noqa: E402
    StageInteractorCheckpointer,
    UnknownCheckpointKeysError,
    check_against_model,
    convert_file,
    detect_imagenet_format,
    map_imagenet_backbone_state_dict,
)
from stageinteractor.d2.neck import ChannelMapping  # noqa: E402

RETURN = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


def _randomise(tv_model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affine so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for m in tv_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return tv_model.eval()


def _d2_format(tv_sd):
    """detectron2's torchvision -> d2 conversion (tools/convert-torchvision-to-d2.py):
    non-``layer`` keys get ``stem.``; layerN -> res(N+1); bnK -> convK.norm;
    downsample.0/1 -> shortcut / shortcut.norm; numpy values; the R-50.pkl wrapper."""
    out = {}
    for k, v in tv_sd.items():
        nk = k if "layer" in k else "stem." + k
        nk = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", nk)
        nk = re.sub(r"bn(\d)", r"conv\1.norm", nk)
        nk = nk.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[nk] = v.detach().numpy()
    return {"model": out, "__author__": "torchvision", "matching_heuristics": True}


def _assert_identical(ours, ref, x):
    """Identical outputs in float64 (both run plain conv -> BN there), and float32 outputs equal
    up to round-off (ours folds EvalBN into the convs on the CPU in float32: resnet module doc)."""
    with torch.no_grad():
        a = copy.deepcopy(ours).double().eval()(x.double())
        b = copy.deepcopy(ref).double()(x.double())
        a32 = ours.eval()(x)
        b32 = ref(x)
    assert list(a) == ["res2", "res3", "res4", "res5"]
    for tv_name, name in RETURN.items():
        assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a32[name], b32[name], rtol=1e-4, atol=1e-4 * b32[name].abs().max().item())


# ----------------------------------------------------------------------------- torchvision / d2
@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_format_identical_outputs(depth):
    tv = _randomise(getattr(torchvision.models, f"resnet{depth}")(weights=None))
    sd = tv.state_dict()
    assert detect_imagenet_format(sd) == "torchvision"
    mapped, report = map_imagenet_backbone_state_dict(sd, prefix="")
    assert len(report.mapped) + len(report.dropped) == len(sd)
    assert {k for k, _ in report.dropped} == {k for k in sd if k.startswith("fc.")
                                             or k.endswith("num_batches_tracked")}
    ours = (build_resnet50 if depth == 50 else build_resnet101)()
    ours.load_state_dict(mapped, strict=True)  # no missing / unexpected keys
    _assert_identical(ours, IntermediateLayerGetter(tv, RETURN), torch.randn(2, 3, 64, 64))


def test_d2_pkl_format_identical_outputs(tmp_path):
    tv = _randomise(torchvision.models.resnet50(weights=None), seed=1)
    ckpt = _d2_format(tv.state_dict())
    assert "stem.conv1.norm.running_mean" in ckpt["model"] and "stem.fc.weight" in ckpt["model"]
    assert "res2.0.shortcut.norm.weight" in ckpt["model"]
    assert detect_imagenet_format(ckpt) == "d2"
    mapped, report = map_imagenet_backbone_state_dict(ckpt, prefix="")
    assert ("__author__", "checkpoint container entry (not a weight)") in report.dropped
    assert all(isinstance(v, torch.Tensor) for v in mapped.values())
    ours = build_resnet50()
    ours.load_state_dict(mapped, strict=True)
    _assert_identical(ours, IntermediateLayerGetter(tv, RETURN), torch.randn(1, 3, 64, 64))


def test_full_model_prefix_and_check_against_model():
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_resnet50()
            self.neck = ChannelMapping(in_channels=(256, 512, 1024, 2048))

    sd = torchvision.models.resnet50(weights=None).state_dict()
    mapped, _ = map_imagenet_backbone_state_dict(sd)
    assert all(k.startswith("backbone.") for k in mapped)
    assert "backbone.res4.5.conv3.norm.running_var" in mapped
    res = check_against_model(mapped, Det())
    assert res == {"missing": [], "unexpected": [], "shape_mismatch": []}
    missing, unexpected = Det().load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith("neck.") for k in missing)


# ----------------------------------------------------------------------------- open-mmlab ResNeXt
def test_openmmlab_resnext_format_loads_into_x101_dcn():
    from torchvision.models.resnet import Bottleneck, ResNet as TVResNet

    tv = _randomise(TVResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4), seed=2)
    ckpt = {"meta": {"mmcv_version": "1.3.3"}, "state_dict": tv.state_dict()}  # mmcv wrapper
    assert detect_imagenet_format(ckpt) == "torchvision"
    mapped, report = map_imagenet_backbone_state_dict(ckpt, prefix="")
    ours = build_resnext101_32x4d_dcn()
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert len(missing) == 60 and all(".conv2_offset." in k for k in missing)  # stay zero
    # zero offsets: DCN == grouped conv, so the network equals torchvision's ResNeXt
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = ours.eval()(x)
        b = IntermediateLayerGetter(tv, RETURN)(x)
    for tv_name, name in RETURN.items():
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4)


def test_mmdet_dcn_offset_keys_are_mapped():
    sd = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "layer1.0.conv1.weight": torch.zeros(1),
        "layer3.7.conv2.conv_offset.weight": torch.zeros(18, 512, 3, 3),
        "layer3.7.conv2.conv_offset.bias": torch.zeros(18),
    }
    mapped, _ = map_imagenet_backbone_state_dict(sd)
    assert "backbone.res4.7.conv2_offset.weight" in mapped
    assert "backbone.res4.7.conv2_offset.bias" in mapped


# ----------------------------------------------------------------------------- Swin
@pytest.fixture(scope="module")
def swin_s():
    return build_swin_small()


@pytest.fixture(scope="module")
def swin_s_ckpt(swin_s):
    return _official_swin_s_checkpoint(swin_s)


def _official_swin_s_checkpoint(model: SwinTransformer):
    """The official swin_small_patch4_window7_224.pth layout, synthesised from shapes."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not re.match(r"norm\d\.", k)}
    g = torch.Generator().manual_seed(3)
    for k, v in sd.items():
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g) * 0.02)
    sd["norm.weight"] = torch.ones(768)
    sd["norm.bias"] = torch.zeros(768)
    sd["head.weight"] = torch.zeros(1000, 768)
    sd["head.bias"] = torch.zeros(1000)
    for i, (res, depth) in enumerate(zip((56, 28, 14, 7), (2, 2, 18, 2))):
        if res > 7:  # classification Swin has no shift (and no mask) where res == window
            for j in range(1, depth, 2):
                sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros((res // 7) ** 2, 49, 49)
    return {"model": sd}


def test_official_swin_format_loads(swin_s, swin_s_ckpt):
    model, ckpt = swin_s, swin_s_ckpt
    sd = ckpt["model"]
    # spot-check the official names and shapes
    assert sd["patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    assert sd["layers.2.blocks.17.attn.relative_position_bias_table"].shape == (169, 12)
    assert sd["layers.0.downsample.reduction.weight"].shape == (192, 384)
    assert sd["layers.1.blocks.0.mlp.fc1.weight"].shape == (768, 192)
    assert detect_imagenet_format(ckpt) == "swin"
    mapped, report = map_imagenet_backbone_state_dict(ckpt, prefix="")
    dropped = {k for k, _ in report.dropped}
    assert dropped == {"norm.weight", "norm.bias", "head.weight", "head.bias"} | {
        k for k in sd if k.endswith("attn_mask")}
    assert len(dropped) == 4 + 11
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    for k, v in mapped.items():
        assert torch.equal(model.state_dict()[k], v)


def _ms_to_unfold(t):
    """Microsoft patch-merging order -> mmcv Unfold order (what mmdet's converter does)."""
    if t.dim() == 2:
        out, n = t.shape
        return t.reshape(out, 4, n // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out, n)
    n = t.shape[0]
    return t.reshape(4, n // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(n)


def test_swin_mmdet_layout_roundtrip_and_unfold_order():
    torch.manual_seed(0)
    model = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    ms = model.state_dict()
    mm = {}
    for k, v in ms.items():
        nk = (k.replace("layers.", "stages.").replace("attn.", "attn.w_msa.")
              .replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
              .replace("patch_embed.proj.", "patch_embed.projection."))
        mm["backbone." + nk] = _ms_to_unfold(v) if ".downsample." in k else v
    assert detect_imagenet_format(mm) == "swin_mmdet"
    mapped, _ = map_imagenet_backbone_state_dict(mm, prefix="")
    assert set(mapped) == set(ms)
    for k in ms:
        assert torch.equal(mapped[k], ms[k]), k
    # functional: mmcv Unfold patch merging with the mmdet weights == ours
    merge = model.layers[0].downsample
    w_red, w_n, b_n = (mm[f"backbone.stages.0.downsample.{n}"]
                       for n in ("reduction.weight", "norm.weight", "norm.bias"))
    B, H, W, C = 2, 6, 8, 32
    x = torch.randn(B, H * W, C)
    unf = F.unfold(x.view(B, H, W, C).permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2)
    ref = F.linear(F.layer_norm(unf, (4 * C,), w_n, b_n), w_red)
    torch.testing.assert_close(merge(x, H, W), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_unknown_keys_raise_with_full_list():
    sd = dict(torchvision.models.resnet50(weights=None).state_dict())
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    sd["something.else"] = torch.zeros(1)
    with pytest.raises(UnknownCheckpointKeysError) as e:
        map_imagenet_backbone_state_dict(sd)
    assert e.value.keys == ["layer5.0.conv1.weight", "something.else"]
    assert "layer5.0.conv1.weight" in str(e.value) and "something.else" in str(e.value)


def test_caffe2_msra_names_are_rejected():
    sd = {"res2_0_branch2a_w": np.zeros(1), "conv1_w": np.zeros(1)}
    with pytest.raises(ValueError, match="cannot detect"):
        map_imagenet_backbone_state_dict(sd)
    with pytest.raises(UnknownCheckpointKeysError):
        map_imagenet_backbone_state_dict({"stem.conv1.weight": np.zeros(1), **sd}, fmt="d2")


def test_detector_checkpoint_not_detected_as_imagenet():
    sd = {"backbone.stem.conv1.weight": torch.zeros(1), "neck.gn_out.weight": torch.zeros(1)}
    assert detect_imagenet_format({"model": sd}) is None


# ----------------------------------------------------------------------------- detectron2 loading
class _Det(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.neck = ChannelMapping(shapes)


def _files(tmp_path):
    tv = _randomise(torchvision.models.resnet50(weights=None), seed=4)
    pth = tmp_path / "resnet50-tv.pth"
    torch.save(tv.state_dict(), pth)
    pkl = tmp_path / "R-50.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(_d2_format(tv.state_dict()), f)
    return tv, pth, pkl


def test_checkpointer_loads_imagenet_files(tmp_path):
    tv, pth, pkl = _files(tmp_path)
    expected, _ = map_imagenet_backbone_state_dict(tv.state_dict())
    for path in (pth, pkl):
        det = _Det(build_resnet50())
        StageInteractorCheckpointer(det).load(str(path))
        sd = det.state_dict()
        for k, v in expected.items():
            assert torch.equal(sd[k], v), (path, k)


def test_converted_file_loads_with_stock_checkpointer(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    tv, pth, _ = _files(tmp_path)
    out = tmp_path / "r50_d2.pth"
    report = convert_file(str(pth), str(out))
    assert report.format == "torchvision" and len(report.mapped) == 265
    det = _Det(build_resnet50())
    DetectionCheckpointer(det).load(str(out))
    x = torch.randn(1, 3, 64, 64)
    _assert_identical(det.backbone, IntermediateLayerGetter(tv, RETURN), x)


def test_checkpointer_loads_official_swin_file(tmp_path, swin_s, swin_s_ckpt):
    ckpt = swin_s_ckpt
    path = tmp_path / "swin_small_patch4_window7_224.pth"
    torch.save(ckpt, path)
    for p in swin_s.parameters():
        p.data.zero_()
    det = _Det(swin_s)
    StageInteractorCheckpointer(det).load(str(path))
    sd = det.state_dict()
    w = ckpt["model"]["layers.2.blocks.5.attn.qkv.weight"]
    assert torch.equal(sd["backbone.layers.2.blocks.5.attn.qkv.weight"], w)


def test_mixin_composes_with_other_checkpointers(tmp_path):
    """ImageNetInitMixin added in front of any DetectionCheckpointer subclass (e.g. the
    project's AtomicCheckpointer) gives it ImageNet-format loading; detector checkpoints
    still load unchanged."""
    from detectron2.checkpoint import DetectionCheckpointer

    from stageinteractor.d2.checkpoint import ImageNetInitMixin

    class MyCheckpointer(ImageNetInitMixin, DetectionCheckpointer):
        pass

    tv, pth, _ = _files(tmp_path)
    det = _Det(build_resnet50())
    MyCheckpointer(det).load(str(pth))
    assert torch.equal(det.backbone.res3[1].conv2.weight, tv.layer2[1].conv2.weight)
    # a full detector checkpoint passes through untouched
    full = tmp_path / "model_final.pth"
    torch.save({"model": det.state_dict()}, full)
    det2 = _Det(build_resnet50())
    MyCheckpointer(det2, save_dir=str(tmp_path)).resume_or_load(str(full), resume=False)
    for k, v in det.state_dict().items():
        assert torch.equal(det2.state_dict()[k], v), k


def test_train_net_checkpointer_maps_imagenet_init(tmp_path):
    """``train.init_checkpoint`` goes through the trainer's AtomicCheckpointer: a plain
    torchvision ResNet-50 file must land in ``backbone.*`` with the same values."""
    import torchvision
    from torch import nn

    from stageinteractor.d2.backbone import build_resnet50
    from stageinteractor.d2.engine import AtomicCheckpointer

    class _Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_resnet50()
            self.head = nn.Linear(2, 2)

    model = _Model()
    sd = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50_torchvision.pth"
    torch.save(sd, path)
    AtomicCheckpointer(model).load(str(path))
    assert torch.equal(model.backbone.stem.conv1.weight, sd["conv1.weight"])
    assert torch.equal(model.backbone.res5[2].conv3.weight, sd["layer4.2.conv3.weight"])
