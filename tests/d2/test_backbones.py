"""Backbones: parameter counts, shapes, normalisation/freezing semantics, DCN, Swin."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("detectron2")

from detectron2.modeling import Backbone  # noqa: E402

from stageinteractor.d2.backbone import (  # noqa: E402
    BottleneckBlock,
    DeformConv2d,
    EvalBatchNorm2d,
    ResNet,
    SwinTransformer,
    build_resnet50,
    build_resnet101,
    build_resnext101_32x4d_dcn,
    build_swin_small,
)
from stageinteractor.d2.backbone import swin as swin_mod  # noqa: E402


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# Swin-S and X101-DCN are slow to build on small CPUs: build each once per module.
@pytest.fixture(scope="module")
def swin_s():
    return build_swin_small()


@pytest.fixture(scope="module")
def x101_dcn():
    return build_resnext101_32x4d_dcn()


# ----------------------------------------------------------------------------- parameter counts
def test_param_count_r50():
    m = build_resnet50()
    assert n_params(m) == 23_508_032  # spec §3, official layout §3 (measured)
    assert len(m.state_dict()) == 318 - 53  # official keys minus num_batches_tracked


def test_param_count_r101():
    assert n_params(build_resnet101()) == 42_500_160


def test_param_count_x101_dcn(x101_dcn):
    m = x101_dcn
    offsets = sum(p.numel() for n, p in m.named_parameters() if "conv2_offset" in n)
    assert offsets == 2_571_804
    n_dcn_blocks = sum(1 for n, _ in m.named_modules() if n.endswith("conv2_offset"))
    assert n_dcn_blocks == 30
    assert n_params(m) - offsets == 42_128_704  # "≈ 42.13M"
    assert n_params(m) == 44_700_508  # official layout §8 (measured)
    assert len(m.state_dict()) == 684 - 104  # official keys minus num_batches_tracked


def test_param_count_swin_s(swin_s):
    m = swin_s
    assert n_params(m) == 48_838_602  # official layout §8 (measured)
    sd = m.state_dict()
    assert len(sd) == 357
    assert sum(1 for k in sd if k.endswith("relative_position_index")) == 24


# ----------------------------------------------------------------------------- ResNet shapes
@pytest.mark.parametrize("name", ["r50", "x101_dcn"])
def test_resnet_outputs(name, request):
    m = (build_resnet50() if name == "r50" else request.getfixturevalue("x101_dcn")).eval()
    assert isinstance(m, Backbone)
    shapes = m.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5"]
    assert [s.channels for s in shapes.values()] == [256, 512, 1024, 2048]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    for name, s in shapes.items():
        assert out[name].shape == (2, s.channels, 64 // s.stride, 64 // s.stride)


def test_resnet_out_features_subset_and_odd_size():
    m = ResNet(50, out_features=("res3", "res5")).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 70, 45))
    assert list(out) == ["res3", "res5"]
    assert out["res3"].shape == (1, 512, 9, 6) and out["res5"].shape == (1, 2048, 3, 2)


def test_resnext_structure(x101_dcn):
    m = x101_dcn
    assert [len(getattr(m, f"res{k}")) for k in range(2, 6)] == [3, 4, 23, 3]
    assert m.res2[0].conv2.weight.shape == (128, 4, 3, 3) and not m.res2[0].dcn
    assert isinstance(m.res3[0].conv2, DeformConv2d)
    assert m.res5[0].conv2.weight.shape == (1024, 32, 3, 3)
    assert m.res4[0].conv2_offset.weight.shape == (18, 512, 3, 3)
    assert m.res4[0].conv2_offset.stride == (2, 2)
    for n, p in m.named_parameters():
        if "conv2_offset" in n:
            assert torch.count_nonzero(p) == 0, n  # zero-initialised like mmcv


# ----------------------------------------------------------------------------- norm / freezing
def test_evalbn_matches_bn_eval_and_never_updates():
    bn = nn.BatchNorm2d(8)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    ebn = EvalBatchNorm2d(8)
    ebn.load_state_dict({k: v for k, v in bn.state_dict().items() if "num_batches" not in k})
    x = torch.randn(4, 8, 5, 5)
    ebn.train()
    assert torch.equal(ebn(x), bn.eval()(x))
    assert torch.equal(ebn.running_mean, bn.running_mean)


def test_resnet_freeze_and_eval_bn_semantics():
    m = build_resnet50()
    m.train()
    for n, p in m.named_parameters():
        frozen = n.startswith("stem.") or n.startswith("res2.")
        assert p.requires_grad == (not frozen), n
    # BN affine of res3-res5 trainable
    assert m.res3[0].conv1.norm.weight.requires_grad and m.res5[2].conv3.norm.bias.requires_grad
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    sum(o.mean() for o in out.values()).backward()
    for k, v in m.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k  # running stats frozen even in train()
    assert m.res3[0].conv1.norm.weight.grad is not None
    assert m.res5[0].conv2.weight.grad is not None
    assert m.stem.conv1.weight.grad is None and m.res2[0].conv1.norm.weight.grad is None
    # train == eval numerically
    m.eval()
    with torch.no_grad():
        out2 = m(x)
    for k in out:
        torch.testing.assert_close(out[k].detach(), out2[k])


@pytest.mark.parametrize(
    "freeze_at,frozen", [(0, ()), (1, ("stem",)), (3, ("stem", "res2", "res3"))]
)
def test_resnet_freeze_at(freeze_at, frozen):
    m = ResNet(50, freeze_at=freeze_at)
    for n, p in m.named_parameters():
        assert p.requires_grad == (n.split(".")[0] not in frozen), n


def test_resnet_frozenbn_option():
    from detectron2.layers import FrozenBatchNorm2d

    m = ResNet(50, norm="FrozenBN")
    assert isinstance(m.res3[0].conv1.norm, FrozenBatchNorm2d)


def test_resnet_channels_last():
    m = build_resnet50().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m2 = m.to(memory_format=torch.channels_last)
        out = m2(x.to(memory_format=torch.channels_last))
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- DCN
def test_deform_conv_zero_offset_is_grouped_conv():
    torch.manual_seed(0)
    dc = DeformConv2d(64, 64, 3, stride=2, padding=1, groups=32)
    x = torch.randn(2, 64, 9, 11)
    off = torch.zeros(2, 18, 5, 6)
    ref = F.conv2d(x, dc.weight, None, 2, 1, 1, 32)
    torch.testing.assert_close(dc(x, off), ref, rtol=1e-4, atol=1e-4)


def test_deform_conv_offset_layout_is_dy_dx():
    """Offsets per kernel tap are (dy, dx): a constant dx = +1 equals sampling x shifted left."""
    torch.manual_seed(0)
    dc = DeformConv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    off = torch.zeros(1, 18, 8, 8)
    off[:, 1::2] = 1.0  # dx for every tap
    out = dc(x, off)
    x_shift = torch.zeros_like(x)
    x_shift[..., :-1] = x[..., 1:]
    ref = F.conv2d(x_shift, dc.weight, None, 1, 1)
    # column 0: the left tap samples x[..., 0] (in range) where the reference sees padding
    torch.testing.assert_close(out[..., 1:], ref[..., 1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[..., 1:], F.conv2d(x, dc.weight, None, 1, 1)[..., 1:])


def test_dcn_block_backward_reaches_offsets():
    torch.manual_seed(0)
    blk = BottleneckBlock(64, 256, bottleneck_channels=128, stride=2, groups=32, dcn=True)
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    out = blk(x)
    assert out.shape == (2, 256, 6, 6)
    out.square().mean().backward()
    g = blk.conv2_offset.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert blk.conv2.weight.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_dcn_block_cpu_bf16_autocast():
    """torchvision has no bf16 CPU deform kernel: DeformConv2d runs it in float32."""
    torch.manual_seed(0)
    blk = BottleneckBlock(64, 256, bottleneck_channels=128, stride=2, groups=32, dcn=True)
    x = torch.randn(2, 64, 12, 12)
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    assert blk.conv2.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- Swin
def test_swin_cpu_bf16_autocast():
    m = _tiny_swin().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(1, 3, 40, 52))
    sum(o.float().mean() for o in out.values()).backward()
    assert all(torch.isfinite(o.float()).all() for o in out.values())


def _tiny_swin(**kw):
    cfg = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
               drop_path_rate=0.0)
    cfg.update(kw)
    return SwinTransformer(**cfg)


def test_swin_s_outputs_random_init(swin_s):
    m = swin_s.eval()
    assert isinstance(m, Backbone)
    shapes = m.output_shape()
    assert [s.channels for s in shapes.values()] == [96, 192, 384, 768]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
    for name, s in shapes.items():
        assert out[name].shape == (1, s.channels, 64 // s.stride, 64 // s.stride)
        assert torch.isfinite(out[name]).all()


@pytest.mark.parametrize("hw", [(61, 75), (33, 130), (4, 4)])
def test_swin_padding_any_size(hw):
    m = _tiny_swin().eval()
    H, W = hw
    with torch.no_grad():
        out = m(torch.randn(2, 3, H, W))
    h, w = -(-H // 4), -(-W // 4)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        assert out[name].shape == (2, 32 * 2 ** i, h, w), name
        h, w = -(-h // 2), -(-w // 2)


def test_swin_every_output_layernormed():
    m = _tiny_swin(out_indices=(0, 1, 2, 3))
    assert all(isinstance(getattr(m, f"norm{i}"), nn.LayerNorm) for i in range(4))
    with torch.no_grad():
        out = m.eval()(torch.randn(1, 3, 64, 64))
    mean = out["res3"].mean(1)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("on_mlp,expected_calls", [(False, 1), (True, 2)])
def test_swin_drop_path_branches(on_mlp, expected_calls, monkeypatch):
    m = _tiny_swin(drop_path_rate=0.3, drop_path_on_mlp=on_mlp).train()
    calls = []
    orig = swin_mod.DropPath.forward

    def counting(self, x):
        calls.append(self)
        return orig(self, x)

    monkeypatch.setattr(swin_mod.DropPath, "forward", counting)
    m(torch.randn(1, 3, 32, 32))
    assert len(calls) == expected_calls * 8  # 8 blocks


def test_swin_s_drop_path_schedule(swin_s):
    probs = [b.drop_path.drop_prob for layer in swin_s.layers for b in layer.blocks]
    assert len(probs) == 24 and probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)
    assert not any(b.drop_path_on_mlp for layer in swin_s.layers for b in layer.blocks)


def test_swin_freeze_at():
    m = _tiny_swin(freeze_at=2)
    for n, p in m.named_parameters():
        frozen = n.startswith("patch_embed") or n.startswith("layers.0.")
        assert p.requires_grad == (not frozen), n


def test_swin_matches_timm_reference():
    """Brute-force check of our Swin (attention, shifted windows, masks, patch merging)
    against timm's independent implementation with the same (Microsoft-layout) weights."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    ours = _tiny_swin().eval()
    for i in range(4):  # non-trivial output norms
        getattr(ours, f"norm{i}").weight.data.uniform_(0.5, 1.5)
        getattr(ours, f"norm{i}").bias.data.normal_()
    ref = timm_swin.SwinTransformer(
        img_size=448, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
        num_classes=0, drop_path_rate=0.0,
    ).eval()
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("norm")}
    missing, unexpected = ref.load_state_dict(timm_swin.checkpoint_filter_fn(sd, ref), strict=False)
    assert not unexpected and all(("relative_position_index" in k or k.startswith("norm")
                                   or "attn_mask" in k) for k in missing), missing
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        out = ours(x)
        feats = ref.forward_intermediates(x, indices=4, norm=False, intermediates_only=True)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        nrm = getattr(ours, f"norm{i}")
        exp = F.layer_norm(feats[i].permute(0, 2, 3, 1), nrm.normalized_shape, nrm.weight,
                           nrm.bias, nrm.eps).permute(0, 3, 1, 2)
        torch.testing.assert_close(out[name], exp, rtol=1e-4, atol=1e-4)
