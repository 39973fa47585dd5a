"""The samplers' shared map gradient in CPU float32 training (core/shared_grad.py).

Reference: a float64 brute-force multi-level bilinear sampler written here (per point, level,
corner: explicit pixel indices and weights, zero outside the map), differentiated by autograd.
Values and the gradients of the maps and of the points are compared for both kernels
(grid_sample on contiguous maps, gather on channels-last maps), over several stages sampling
the same maps (their map gradients add up in one buffer), with points partly outside the maps.
Then the autograd corner cases (repeated / partial backwards, maps without grad, unused stages,
dense gradients from elsewhere) and the paths that keep plain autograd.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stageinteractor.core.sampler import PointSampler

STRIDES = (4, 8, 16, 32)
B, C, G, N, P = 2, 8, 2, 3, 4
SIZE = (48, 64)  # padded input (H, W)


class GivenPoints(PointSampler):
    """A sampler whose points are given (xy (B, N, G, P, 2) pixels, z (B, N, G, P, 1))."""

    def __init__(self, **kw):
        super().__init__(query_dim=4, num_groups=G, num_points=P, strides=STRIDES, level_offset=1.0, **kw)

    def points(self, q, gen, xyzr, wh, group_major):
        xy, z = gen["xy"], gen["z"]
        if group_major:
            xy, z = xy.transpose(1, 2).contiguous(), z.transpose(1, 2).contiguous()
        return xy, z


def brute_force(maps, xy, z):
    """float64: (B*N*G, P, C/G) = sum_l softmax_l(-(z - c_l)^2 / 2) * bilinear(level l)."""
    Cg = C // G
    centres = [math.log2(s) + 1.0 for s in STRIDES]
    rows = []
    for b in range(B):
        for n in range(N):
            for g in range(G):
                pts = []
                for p in range(P):
                    x, y, zz = xy[b, n, g, p, 0], xy[b, n, g, p, 1], z[b, n, g, p, 0]
                    logits = torch.stack([-0.5 * (zz - c) ** 2 for c in centres])
                    lw = torch.softmax(logits, 0)
                    acc = torch.zeros(Cg, dtype=torch.float64)
                    for lvl, (m, s) in enumerate(zip(maps, STRIDES)):
                        H, W = m.shape[-2:]
                        u, v = x / s - 0.5, y / s - 0.5
                        x0, y0 = int(math.floor(float(u.detach()))), int(math.floor(float(v.detach())))
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < W and 0 <= yi < H:
                                    w = (1 - (u - xi).abs()) * (1 - (v - yi).abs())
                                    acc = acc + lw[lvl] * w * m[b, g * Cg:(g + 1) * Cg, yi, xi]
                    pts.append(acc)
                rows.append(torch.stack(pts))
    return torch.stack(rows)


def make_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    H, W = SIZE
    maps = [torch.randn(B, C, H // s, W // s, generator=g, dtype=torch.float64) for s in STRIDES]
    # points over the map and up to 12 px beyond its border (zero padding), never on a pixel centre
    xy = torch.rand(B, N, G, P, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 24.0, H + 24.0]) - 12
    z = torch.rand(B, N, G, P, 1, generator=g, dtype=torch.float64) * 4 + 1.5
    return maps, xy, z


def run_ours(sampler, maps64, stages, layout, probes):
    """float32 forward + backward of sum_s <sampled_s, probe_s>: (outputs, map grads, point grads)."""
    maps = [m.float().requires_grad_() for m in maps64]
    inp = [m.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else m for m in maps]
    pts = [(xy.float().requires_grad_(), z.float().requires_grad_()) for xy, z in stages]
    prepared = sampler.prepare(inp)
    outs, loss = [], 0
    for (xy, z), probe in zip(pts, probes):
        out, _ = sampler(None, {"xy": xy, "z": z}, torch.zeros(B, N, 4), None, prepared)
        outs.append(out)
        loss = loss + (out * probe.float()).sum()
    loss.backward()
    return prepared, outs, [m.grad for m in maps], [(xy.grad, z.grad) for xy, z in pts]


def run_reference(maps64, stages, probes):
    maps = [m.clone().requires_grad_() for m in maps64]
    pts = [(xy.clone().requires_grad_(), z.clone().requires_grad_()) for xy, z in stages]
    outs, loss = [], 0
    for (xy, z), probe in zip(pts, probes):
        out = brute_force(maps, xy, z)
        outs.append(out)
        loss = loss + (out * probe).sum()
    loss.backward()
    return outs, [m.grad for m in maps], [(xy.grad, z.grad) for xy, z in pts]


def close(a, b, rel=2e-5):
    assert a.shape == b.shape
    err = (a.double() - b).abs().max().item()
    assert err <= rel * max(b.abs().max().item(), 1.0), err


@pytest.mark.parametrize("layout,kernel", [("contiguous", "auto"), ("contiguous", "grid_sample"),
                                           ("channels_last", "auto"), ("contiguous", "gather")])
def test_values_and_gradients_against_float64_brute_force(layout, kernel):
    maps, _, _ = make_inputs(0)
    stages = [make_inputs(s)[1:] for s in (1, 2, 3)]  # 3 stages, different points, same maps
    probes = [torch.randn(B * N * G, P, C // G, generator=torch.Generator().manual_seed(10 + s), dtype=torch.float64)
              for s in range(3)]
    prepared, outs, map_grads, pt_grads = run_ours(GivenPoints(sampling_kernel=kernel), maps, stages, layout, probes)
    assert prepared.sink is not None  # the shared gradient ran
    assert bool(prepared.tables) == (layout == "channels_last" or kernel == "gather")
    r_outs, r_map_grads, r_pt_grads = run_reference(maps, stages, probes)
    for o, r in zip(outs, r_outs):
        close(o, r)
    for gm, r in zip(map_grads, r_map_grads):
        close(gm, r)
    assert any(r.abs().sum() > 0 for r in r_map_grads)
    for (gxy, gz), (rxy, rz) in zip(pt_grads, r_pt_grads):
        close(gxy, rxy, rel=1e-4)
        close(gz, rz, rel=1e-4)
    # the map gradient of the 3 stages is the sum of each stage's own
    per_stage = [run_reference(maps, [st], [pr])[1] for st, pr in zip(stages, probes)]
    for lvl, gm in enumerate(map_grads):
        close(gm, sum(ps[lvl] for ps in per_stage))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, out))
        return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_zero_filled_buffer_per_level_and_no_dense_map_backward(layout):
    maps, _, _ = make_inputs(0)
    stages = [make_inputs(s)[1:] for s in (1, 2, 3)]
    probes = [torch.ones(B * N * G, P, C // G, dtype=torch.float64)] * 3
    mode = _Ops()
    with mode:
        run_ours(GivenPoints(), maps, stages, layout, probes)
    map_numels = {m.numel() for m in maps}
    zeroed = [out for f, a, out in mode.calls
              if isinstance(out, torch.Tensor) and out.numel() in map_numels
              and f.__name__.split(".")[0] in ("zeros", "new_zeros", "zero_", "fill_", "zeros_like")]
    assert len(zeroed) == len(maps), [f for f, _, _ in mode.calls]
    for f, a, _ in mode.calls:
        name = f.__name__.split(".")[0]
        assert name not in ("embedding_bag_backward", "_embedding_bag_backward", "_embedding_bag_dense_backward")
        if name == "grid_sampler_2d_backward":
            assert list(a[-1]) == [False, True]  # no map gradient from the native kernel


def _setup(layout="contiguous", seed=0):
    maps, _, _ = make_inputs(seed)
    stages = [make_inputs(s)[1:] for s in (1, 2)]
    maps = [m.float().requires_grad_() for m in maps]
    inp = [m.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else m for m in maps]
    pts = [(xy.float().requires_grad_(), z.float().requires_grad_()) for xy, z in stages]
    return maps, inp, pts


def _sample(sampler, prepared, xy, z):
    return sampler(None, {"xy": xy, "z": z}, torch.zeros(B, N, 4), None, prepared)[0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_retain_graph_repeated_and_partial_backwards(layout):
    sampler = GivenPoints()
    maps, inp, pts = _setup(layout)
    prepared = sampler.prepare(inp)
    loss = sum((_sample(sampler, prepared, xy, z) ** 2).sum() for xy, z in pts)
    first = [g.clone() for g in torch.autograd.grad(loss, maps, retain_graph=True)]
    if layout == "contiguous":  # the map gradient in the map's own layout
        assert all(g.is_contiguous() for g in torch.autograd.grad(loss, inp, retain_graph=True))
    # a backward that needs only the points: the stages must not leave map gradient behind
    (gxy,) = torch.autograd.grad(loss, [pts[0][0]], retain_graph=True)
    assert gxy.abs().sum() > 0
    loss.backward(inputs=[pts[1][1]], retain_graph=True)
    loss.backward(retain_graph=True)
    for g, f in zip(maps, first):
        torch.testing.assert_close(g.grad, f, rtol=0, atol=0)
    loss.backward()
    for g, f in zip(maps, first):
        torch.testing.assert_close(g.grad, 2 * f, rtol=1e-6, atol=1e-7)
    # plain autograd on the same graph reference (no shared gradient)
    with torch.no_grad():
        ref_prep = GivenPoints(sampling_kernel="grid_sample").prepare([m.detach() for m in inp])
    assert ref_prep.sink is None


def test_maps_without_grad_and_partly_without_grad():
    sampler = GivenPoints()
    maps, inp, pts = _setup()
    frozen = [m.detach() for m in inp]
    prepared = sampler.prepare(frozen)
    assert prepared.sink is None  # nothing to share: plain autograd
    (xy, z) = pts[0]
    _sample(sampler, prepared, xy, z).sum().backward()
    assert xy.grad is not None and xy.grad.abs().sum() > 0
    # levels 0 and 2 require grad, 1 and 3 do not
    mixed = [m if i % 2 == 0 else m.detach() for i, m in enumerate(inp)]
    prepared = sampler.prepare(mixed)
    assert prepared.sink is not None
    out = sum(_sample(sampler, prepared, xy, z).sum() for xy, z in pts)
    grads = torch.autograd.grad(out, [mixed[0], mixed[2]])
    ref_maps = [m.detach().double().requires_grad_() for m in inp]
    ref = sum(brute_force(ref_maps, xy.detach().double(), z.detach().double()).sum() for xy, z in pts)
    rg = torch.autograd.grad(ref, ref_maps)
    close(grads[0], rg[0])
    close(grads[1], rg[2])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unused_stage_and_dense_gradient_from_elsewhere(layout):
    sampler = GivenPoints()
    maps, inp, pts = _setup(layout)
    prepared = sampler.prepare(inp)
    used = _sample(sampler, prepared, *pts[0])
    _sample(sampler, prepared, *pts[1])  # a stage whose output is not used (its backward never runs)
    with torch.no_grad():
        _sample(sampler, prepared, *pts[1])  # and one under no_grad
    (used.sum() + 3 * inp[1].sum()).backward()  # a dense gradient reaching a map directly
    ref_maps = [m.detach().double().requires_grad_() for m in maps]
    brute_force(ref_maps, pts[0][0].detach().double(), pts[0][1].detach().double()).sum().backward()
    for lvl, (m, r) in enumerate(zip(maps, ref_maps)):
        close(m.grad, r.grad + (3.0 if lvl == 1 else 0.0))


def test_plain_autograd_where_the_shared_gradient_does_not_apply():
    sampler = GivenPoints()
    maps, inp, pts = _setup()
    with torch.no_grad():
        assert sampler.prepare(inp).sink is None
    assert sampler.prepare([m.double() for m in inp]).sink is None  # float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampler.prepare(inp).sink is None
    meta = [torch.empty(m.shape, device="meta", requires_grad=True) for m in inp]
    prep = sampler.prepare(meta)
    assert prep.sink is None
    xy = torch.empty(B, N, G, P, 2, device="meta", requires_grad=True)
    z = torch.empty(B, N, G, P, 1, device="meta", requires_grad=True)
    sampler.to("meta")
    _sample(sampler, prep, xy, z).sum().backward()
    assert meta[0].grad is not None and meta[0].grad.device.type == "meta"
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(m) for m in inp]
        assert GivenPoints().prepare(fake).sink is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backward", [True, False])
def test_freed_without_the_cycle_collector(layout, backward):
    """The sink and the graph go when the last reference does (no reference cycle)."""
    import gc
    import weakref

    sampler = GivenPoints()
    maps, inp, pts = _setup(layout)
    enabled = gc.isenabled()
    gc.disable()
    try:
        prepared = sampler.prepare(inp)
        loss = _sample(sampler, prepared, *pts[0]).sum()
        if backward:
            loss.backward()
        sink, node = weakref.ref(prepared.sink), weakref.ref(prepared.sink.node)
        del prepared, loss
        assert sink() is None and node() is None
    finally:
        if enabled:
            gc.enable()
