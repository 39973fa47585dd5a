"""The folded channels-last CPU path of the ResNet backbone and the neck (EvalBN folded into the
convs, every conv on oneDNN's channels-last convolution, 1x1 convs included).

Reference: a float64 brute-force ResNet written here from the module's parameters with plain
``F.conv2d`` + ``F.batch_norm(training=False)`` + ``F.relu`` + ``F.max_pool2d`` (it never calls the
backbone's forward), and ``F.conv2d`` + ``F.group_norm`` for the neck. Outputs and the gradients
of a random projection of them (input, conv weights, BN gamma / beta, neck parameters) must agree
with it at the float32 floor; BN statistics random, so a lost shift / scale / stride fails.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

from stageinteractor.d2.backbone import EvalBatchNorm2d, ResNet, build_resnet50  # noqa: E402
from stageinteractor.d2.backbone import resnet as resnet_mod  # noqa: E402
from stageinteractor.d2.neck import ChannelMapping  # noqa: E402

TOL = 2e-5  # relative to each tensor's max |x|; float32 round-off over ~50 layers is ~5e-6


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, EvalBatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def _conv_bn(conv, x, p):
    """conv(x) + EvalBN from the parameter dict ``p`` (float64 copies, names ``conv.*``)."""
    pre = conv
    y = F.conv2d(x, p[pre + ".weight"], None, STRIDES[pre], PADS[pre])
    return F.batch_norm(
        y, p[pre + ".norm.running_mean"], p[pre + ".norm.running_var"],
        p[pre + ".norm.weight"], p[pre + ".norm.bias"], False, 0.0, 1e-5,
    )


STRIDES, PADS = {}, {}


def _reference(model, x, p):
    """Brute-force float64 forward of a ResNet with EvalBN from its parameters ``p``."""
    STRIDES.clear()
    PADS.clear()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            STRIDES[name], PADS[name] = m.stride, m.padding
    out = {}
    y = F.relu(_conv_bn("stem.conv1", x, p))
    y = F.max_pool2d(y, 3, 2, 1)
    for stage in model.stage_names:
        for b in range(len(getattr(model, stage))):
            pre = f"{stage}.{b}"
            h = F.relu(_conv_bn(pre + ".conv1", y, p))
            h = F.relu(_conv_bn(pre + ".conv2", h, p))
            h = _conv_bn(pre + ".conv3", h, p)
            sc = _conv_bn(pre + ".shortcut", y, p) if pre + ".shortcut" in STRIDES else y
            y = F.relu(h + sc)
        out[stage] = y
    return out


def _leaf64(model, requires_grad_all):
    p = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        q = t.detach().double().clone()
        if isinstance(t, torch.nn.Parameter) and (t.requires_grad or requires_grad_all):
            q.requires_grad_(True)
        p[n] = q
    return p


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# Gradients that pass back through the stem's max-pool (the input, the stem, res2) differ between
# ANY float32 run and float64 by ~1e-3 (norm-relative): near-ties of the pool's maximum and
# pre-activations within round-off of the ReLU kink pick another branch. The plain conv -> BN
# path measures 1.3e-3 / 2.3e-3 there, the folded path 0.8e-3 / 2.1e-3 (input / worst
# parameter); a missing BN scale or shift is O(1).
KINK_TOL = 1e-2


@pytest.mark.parametrize("freeze_at", [2, 0])
def test_folded_resnet_matches_float64_conv_bn_reference(freeze_at):
    torch.manual_seed(0)
    model = build_resnet50(freeze_at=freeze_at).train()
    _randomize_bn(model)
    x = torch.randn(2, 3, 70, 100)  # odd sizes: ceil-mode strides
    x.requires_grad_(freeze_at == 0)
    assert resnet_mod.use_folded(x)
    out = model(x)
    assert set(out) == {"res2", "res3", "res4", "res5"}
    proj = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in out.items()}
    sum((out[k] * proj[k].float()).sum() for k in out).backward()

    x64 = x.detach().double().requires_grad_(freeze_at == 0)
    p = _leaf64(model, False)
    ref = _reference(model, x64, p)
    sum((ref[k] * proj[k]).sum() for k in ref).backward()
    for k in out:
        assert out[k].shape == ref[k].shape
        # the folded path hands out channels-last maps
        assert out[k].is_contiguous(memory_format=torch.channels_last), k
        assert _rel(out[k], ref[k]) < TOL, (k, _rel(out[k], ref[k]))
    if freeze_at == 0:
        assert _rel_norm(x.grad, x64.grad) < KINK_TOL
    n_checked = 0
    for n, prm in model.named_parameters():
        frozen = freeze_at == 2 and n.split(".")[0] in ("stem", "res2")
        assert prm.requires_grad == (not frozen), n
        if frozen:
            assert prm.grad is None, n
            continue
        assert prm.grad is not None and prm.grad.shape == prm.shape, n
        if n.split(".")[0] in ("stem", "res2"):  # behind the max-pool (KINK_TOL)
            assert _rel_norm(prm.grad, p[n].grad) < KINK_TOL, (n, _rel_norm(prm.grad, p[n].grad))
        else:
            assert _rel(prm.grad, p[n].grad) < TOL, (n, _rel(prm.grad, p[n].grad))
        n_checked += 1
    assert n_checked == sum(1 for q in model.parameters() if q.requires_grad) > 100
    # running statistics never move
    for n, b in model.named_buffers():
        assert torch.equal(b.double(), p[n]), n


def test_folded_path_equals_plain_path_and_keeps_the_state_dict():
    torch.manual_seed(1)
    model = ResNet(50, out_features=("res3", "res5")).train()
    _randomize_bn(model, 1)
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    fast = model(x)
    # float64 input: the plain conv -> BN modules (not the folded path)
    model64 = ResNet(50, out_features=("res3", "res5")).double()
    model64.load_state_dict(model.state_dict())
    assert not resnet_mod.use_folded(x.double())
    plain = model64(x.double())
    assert set(fast) == {"res3", "res5"}
    for k in fast:
        assert plain[k].is_contiguous()  # the plain path keeps the input's layout
        assert _rel(fast[k], plain[k]) < TOL
    assert list(model.state_dict()) == keys


def test_folded_path_steps_aside_for_autocast_tracing_and_other_norms():
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not resnet_mod.use_folded(x)
        out = build_resnet50().eval()(x)
    assert out["res5"].dtype == torch.bfloat16
    assert not resnet_mod.use_folded(torch.empty(1, 3, 8, 8, device="meta"))
    m = ResNet(50, norm="FrozenBN")
    assert not m.res3[0].foldable and not m.stem.conv1.foldable
    assert build_resnet50().res3[0].foldable


def test_folded_resnet_traces_with_plain_ops():
    model = build_resnet50(out_features=("res4",)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)["res4"]
        traced = torch.jit.trace(model, x, strict=False, check_trace=False)
        graph = str(traced.inlined_graph)
    assert "_linear_pointwise" not in graph and "batch_norm" in graph
    assert _rel(traced(x)["res4"], ref) < TOL


def test_neck_on_channels_last_maps_matches_float64_reference():
    torch.manual_seed(0)
    chans = (256, 512, 1024, 2048)
    neck = ChannelMapping(in_channels=chans)
    with torch.no_grad():
        neck.gn_out.weight.normal_()
        neck.gn_out.bias.normal_()
        for c in neck.lateral_convs:
            c.bias.normal_()
    xs = [torch.randn(2, c, 40 >> i, 24 >> i).contiguous(memory_format=torch.channels_last)
          .requires_grad_(True) for i, c in enumerate(chans)]
    for training in (True, False):
        neck.train(training)
        neck.zero_grad()
        for x in xs:
            x.grad = None
        out = neck(xs)
        # channels-last maps in training and inference (the sampler's gather kernel reads them)
        for o in out:
            assert o.is_contiguous(memory_format=torch.channels_last)
        proj = [torch.randn(o.shape, dtype=torch.float64) for o in out]
        sum((o * q.float()).sum() for o, q in zip(out, proj)).backward()
        p = {n: t.detach().double().requires_grad_(True) for n, t in neck.named_parameters()}
        x64 = [x.detach().double().requires_grad_(True) for x in xs]
        ref = [
            F.group_norm(F.conv2d(x, p[f"lateral_convs.{l}.weight"], p[f"lateral_convs.{l}.bias"]),
                         32, p["gn_out.weight"], p["gn_out.bias"])
            for l, x in enumerate(x64)
        ]
        sum((r * q).sum() for r, q in zip(ref, proj)).backward()
        for o, r in zip(out, ref):
            assert _rel(o, r) < TOL
        for x, r in zip(xs, x64):
            assert _rel(x.grad, r.grad) < TOL
        for n, prm in neck.named_parameters():
            assert _rel(prm.grad, p[n].grad) < TOL, n
