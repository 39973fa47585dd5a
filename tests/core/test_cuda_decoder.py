"""The decoder on the accelerator (issue 14, issue 21; ``gpu`` tests, ``accel`` fixture).

Structure (every device, stand-ins included): the CPU reference runs first on the same input
tensors (as a CPU-vs-accelerator comparison does), then the accelerator run; its outputs and
gradients must be on the device with the parameter's shape and dtype, its inputs must be leaves
that receive a gradient, the set of parameters that get a gradient must be the CPU's, and no
CPU tensor may be mixed in (the stand-ins raise on that). On ``meta`` the backward runs too.
On ``fake_cuda`` the CUDA code paths run (``is_cuda`` is true) and an inference must not read
anything on the host (a read raises there; the independent probe counts copies too).

Values (real CUDA only; skipped on a stand-in): same weights and inputs, float32 (TF32 off):
forward and backward of the R50 layout (256-d, 100 queries, 6 stages, paper sizes) and of the
demo size, with the StageInteractor defaults and with the AdaMixer baseline switches.

Tolerances: the two devices run the same float32 maths in different orders (GEMM blocking,
reductions, atomics in the sampler's backward), i.e. round-off of ~1e-7 relative per op. Six
stages compound it -- each stage's boxes move the next stage's sampling points, and bilinear
sampling turns a position difference into a feature difference -- the way the official-code
parity test sees it (per-stage logits within 1.7e-4, boxes within 4.7e-3 px at stage 5 between
two float32 implementations). The bounds below leave ~5x margin over that: logits 1e-3
absolute, boxes 2e-2 px, gradients 1e-3 of their global norm (2e-2 per tensor). A device or
dtype bug (a missing ``.to``, a wrong dtype under the hood, a CPU-only code path) is off by
orders of magnitude more.
"""

import copy

import pytest
import torch

from stageinteractor.core.decoder import StageInteractorDecoder

pytestmark = pytest.mark.gpu

R50 = dict(num_classes=80, num_queries=100, num_stages=6, query_dim=256)  # paper sizes
DEMO = dict(num_classes=5, num_queries=20, num_stages=4, query_dim=64, num_heads=4, num_groups=4,
            ffn_dim=256, first_stage_points=32, num_points=8, out_points=16)
STRIDES = (4, 8, 16, 32)
PAD = (128, 192)  # padded input size: small, so the CPU reference stays cheap
SIZES = [pytest.param(R50, marks=pytest.mark.slow, id="r50_100q"), pytest.param(DEMO, id="demo")]
SWITCHES = pytest.mark.parametrize("adamixer", [False, True], ids=["stageinteractor", "adamixer"])


def _build(sizes, adamixer):
    torch.manual_seed(0)
    if adamixer:
        return StageInteractorDecoder.adamixer(**sizes)
    return StageInteractorDecoder(**sizes)


def _inputs(dim, batch=2):
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(batch, dim, PAD[0] // s, PAD[1] // s, generator=gen) for s in STRIDES]
    sizes = torch.tensor([[120.0, 180.0], [128.0, 150.0]])[:batch]
    return feats, sizes


def _place(t, accel):
    """A copy of CPU tensor ``t`` on the run's device (``accel`` None: the CPU) -- never the
    caller's tensor itself, so that the two runs have their own leaves and gradients."""
    return t.detach().clone() if accel is None else accel.to(t)


def _run(decoder, feats, sizes, accel=None, backward=True):
    """Forward (and backward) of ``decoder`` (already on the device); returns the inputs (leaves),
    the outputs and the gradients by name, all detached and left on the device."""
    feats = [_place(f, accel).requires_grad_(True) for f in feats]
    outs = decoder(feats, _place(sizes, accel))
    grads = {}
    if backward:
        # a loss that touches every stage's logits and boxes
        loss = sum(o["logits"].sigmoid().mean() + o["boxes"].mean() / 100.0 for o in outs)
        loss.backward()
        grads = {n: p.grad.detach() for n, p in decoder.named_parameters() if p.grad is not None}
        grads.update({f"feature{i}": f.grad.detach() for i, f in enumerate(feats)})
    outs = [{k: o[k].detach() for k in ("logits", "boxes", "xyzr", "input_xyzr")} for o in outs]
    return feats, outs, grads


def _check_structure(accel, decoder, sizes, feats, outs, grads, ref_grads):
    B = feats[0].shape[0]
    shapes = {"logits": (B, sizes["num_queries"], sizes["num_classes"]),
              "boxes": (B, sizes["num_queries"], 4), "xyzr": (B, sizes["num_queries"], 4),
              "input_xyzr": (B, sizes["num_queries"], 4)}
    assert len(outs) == sizes["num_stages"]
    for s, o in enumerate(outs):
        for k, shape in shapes.items():
            assert o[k].device.type == accel.device.type, (s, k, o[k].device)
            assert o[k].dtype == torch.float32 and tuple(o[k].shape) == shape, (s, k)
    for f in feats:
        assert f.is_leaf and f.requires_grad and f.device.type == accel.device.type
    if not accel.backward:
        return
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    params = dict(decoder.named_parameters())
    for k, g in grads.items():
        like = params[k] if k in params else feats[int(k[len("feature"):])]
        assert g.device.type == accel.device.type, (k, g.device)
        assert g.dtype == like.dtype and g.shape == like.shape, k


@SWITCHES
@pytest.mark.parametrize("sizes", SIZES)
def test_decoder_forward_backward_structure_on_accel(accel, sizes, adamixer):
    decoder = _build(sizes, adamixer)
    feats, image_sizes = _inputs(sizes["query_dim"])
    _, _, ref_grads = _run(copy.deepcopy(decoder), feats, image_sizes)  # CPU reference first
    dec = accel.to(copy.deepcopy(decoder))
    with accel.run():
        ins, outs, grads = _run(dec, feats, image_sizes, accel, backward=accel.backward)
    _check_structure(accel, dec, sizes, ins, outs, grads, ref_grads)


@SWITCHES
def test_decoder_built_on_accel_takes_device_paths(accel, host_probe, adamixer):
    """Built on the device (every buffer and parameter created there), run outside the
    device context: a tensor the forward creates without ``device=`` stays on the CPU and
    would raise. Inference (no_grad, eval) must not read anything on the host."""
    dec = accel.build(_build, DEMO, adamixer).eval()
    assert all(t.device.type == accel.device.type
               for t in list(dec.parameters()) + list(dec.buffers()))
    feats, image_sizes = _inputs(DEMO["query_dim"], batch=1)
    probe = host_probe
    with torch.no_grad(), accel.run(probe):
        outs = dec(accel.to(feats), accel.to(image_sizes[:1]))
    assert outs[-1]["boxes"].device.type == accel.device.type
    if accel.kind == "fake_cuda":  # the CUDA kernels were chosen: grid_sample, no gather tables
        with accel.run():
            maps = dec.stages[0].sampler.prepare(accel.to(feats))
        assert maps.folded and not maps.tables
    assert probe.total == 0, probe.sites


@SWITCHES
@pytest.mark.parametrize("sizes", SIZES)
def test_decoder_forward_backward_accel_equals_cpu(accel, sizes, adamixer):
    accel.require_values()
    decoder = _build(sizes, adamixer)
    feats, image_sizes = _inputs(sizes["query_dim"])
    _, ref_out, ref_grad = _run(copy.deepcopy(decoder), feats, image_sizes)
    _, out, grad = _run(accel.to(copy.deepcopy(decoder)), feats, image_sizes, accel)
    out = [{k: v.cpu() for k, v in o.items()} for o in out]
    grad = {k: v.cpu() for k, v in grad.items()}
    # the CPU reference's tensors are its own (not the inputs' or the accelerator run's)
    assert all(grad[k].data_ptr() != ref_grad[k].data_ptr() for k in grad)
    assert len(out) == sizes["num_stages"]
    for s, (a, b) in enumerate(zip(out, ref_out)):
        torch.testing.assert_close(a["logits"], b["logits"], atol=1e-3, rtol=0, msg=f"stage {s}")
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=2e-2, rtol=0, msg=f"stage {s}")
    assert set(grad) == set(ref_grad)
    diff = torch.sqrt(sum(((grad[k] - ref_grad[k]) ** 2).sum() for k in grad))
    norm = torch.sqrt(sum((ref_grad[k] ** 2).sum() for k in grad))
    assert diff <= 1e-3 * norm, (float(diff), float(norm))
    for k in grad:
        scale = ref_grad[k].norm().clamp(min=1e-3 * norm / len(grad) ** 0.5)
        assert (grad[k] - ref_grad[k]).norm() <= 2e-2 * scale, k
