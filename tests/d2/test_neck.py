"""ChannelMapping neck: parameter counts, single shared GroupNorm, init, forward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("detectron2")

from detectron2.layers import ShapeSpec  # noqa: E402

from stageinteractor.d2.neck import ChannelMapping  # noqa: E402

R_CH = (256, 512, 1024, 2048)
SWIN_CH = (96, 192, 384, 768)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_param_count_r_family():
    assert n_params(ChannelMapping(in_channels=R_CH)) == 984_576


def test_param_count_swin():
    assert n_params(ChannelMapping(in_channels=SWIN_CH)) == 370_176


def test_from_backbone_output_shape():
    shapes = {f"res{k}": ShapeSpec(channels=c, stride=2 ** k) for k, c in zip(range(2, 6), SWIN_CH)}
    neck = ChannelMapping(shapes)
    assert neck.in_channels == list(SWIN_CH)
    assert [s.stride for s in neck.output_shape()] == [4, 8, 16, 32]
    assert all(s.channels == 256 for s in neck.output_shape())


def test_single_shared_groupnorm_and_keys():
    neck = ChannelMapping(in_channels=R_CH)
    gns = [m for m in neck.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 1 and gns[0].num_groups == 32 and gns[0].num_channels == 256
    assert not any(isinstance(m, (nn.ReLU, nn.GELU)) for m in neck.modules())
    keys = sorted(neck.state_dict())
    assert keys == sorted(
        [f"lateral_convs.{l}.{p}" for l in range(4) for p in ("weight", "bias")]
        + ["gn_out.weight", "gn_out.bias"]
    )


def test_init():
    torch.manual_seed(0)
    neck = ChannelMapping(in_channels=R_CH)
    for l, conv in enumerate(neck.lateral_convs):
        assert conv.kernel_size == (1, 1) and conv.weight.shape == (256, R_CH[l], 1, 1)
        assert torch.count_nonzero(conv.bias) == 0
        bound = (6.0 / (R_CH[l] + 256)) ** 0.5  # xavier-uniform, fan_in + fan_out
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.9 * bound
    assert torch.equal(neck.gn_out.weight, torch.ones(256))
    assert torch.equal(neck.gn_out.bias, torch.zeros(256))


def test_forward_matches_formula_dict_and_list():
    torch.manual_seed(0)
    neck = ChannelMapping(in_channels=SWIN_CH)
    neck.gn_out.weight.data.normal_()
    neck.gn_out.bias.data.normal_()
    for c in neck.lateral_convs:
        c.bias.data.normal_()
    feats = {f"res{k}": torch.randn(2, c, 64 >> k, 48 >> k) for k, c in zip(range(2, 6), SWIN_CH)}
    out = neck(feats)
    out_list = neck(list(feats.values()))
    assert len(out) == 4
    for l, (name, x) in enumerate(feats.items()):
        conv = neck.lateral_convs[l]
        gn = neck.gn_out
        ref = F.group_norm(F.conv2d(x, conv.weight, conv.bias), 32, gn.weight, gn.bias)
        torch.testing.assert_close(out[l], ref)
        assert torch.equal(out[l], out_list[l])
        assert out[l].shape == (2, 256, 64 >> (l + 2), 48 >> (l + 2))


def test_gradient_reaches_shared_gn_from_all_levels():
    neck = ChannelMapping(in_channels=R_CH)
    feats = [torch.randn(1, c, 4, 4) for c in R_CH]
    grads = []
    for l in range(4):
        neck.zero_grad()
        (neck(feats)[l] * torch.randn(1, 256, 4, 4)).sum().backward()
        grads.append(neck.gn_out.weight.grad.abs().sum().item())
    assert all(g > 0 for g in grads)


def test_bad_args():
    with pytest.raises(ValueError):
        ChannelMapping()
    with pytest.raises(ValueError):
        ChannelMapping(in_channels=(256, 512))


def test_cpu_inference_maps_are_channels_last_with_the_same_values():
    """Issue 15: in CPU inference the neck hands the decoder channels-last maps (its sampler reads
    them 3-4x faster); training keeps the contiguous layout; the values are the same."""
    torch.manual_seed(0)
    neck = ChannelMapping(in_channels=SWIN_CH)
    xs = [torch.randn(2, c, 64 // 2 ** i, 48 // 2 ** i) for i, c in enumerate(SWIN_CH)]
    with torch.no_grad():
        train_out = neck.train()(xs)
        eval_out = neck.eval()(xs)
    assert all(t.is_contiguous() for t in train_out)
    assert all(e.is_contiguous(memory_format=torch.channels_last) for e in eval_out)
    assert all(torch.equal(t, e) for t, e in zip(train_out, eval_out))
