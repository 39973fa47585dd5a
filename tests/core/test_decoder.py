"""Decoder behaviour against hand-computed / brute-force answers (small dimensions)."""
import math

import pytest
import torch

import stageinteractor.core.decoder as decoder_mod
from stageinteractor.core.attention import iof_log_bias
from stageinteractor.core.dynamic_mixing import CascadeDynamicMixing
from stageinteractor.core.filter_bank import FilterBank, update_bank
from stageinteractor.core.position_encoding import SineBoxEmbedding
from stageinteractor.core.postprocess import topk_detections
from stageinteractor.core.query_generator import InitialQueryGenerator
from stageinteractor.core.sampler import GroupedPointSampler
from decoder_helpers import SMALL, small  # noqa: E402  (tests/core helper)

def feats(B=2, dim=32, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, dim, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]


def perturb(module, scale=0.05, seed=0):
    """Spec §5: many weights start at 0 (no gradient flows); perturb them first."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- small components
def test_sine_embedding_hand_values():
    pe = SineBoxEmbedding(num_feats=4)
    xyzr = torch.tensor([[500.0, 250.0, 3.0, -1.0]])
    out = pe(xyzr)
    v = [0.5, 0.25, 3.0, -1.0]
    exp = []
    for c in range(4):
        for m in range(2):
            f = v[c] / 10000 ** (2 * m / 4)
            exp += [math.sin(f), math.cos(f)]
    assert torch.allclose(out, torch.tensor([exp]), atol=1e-6)
    assert torch.equal(pe.rows(xyzr.view(1, 1, 4)), out)


def test_iof_bias_hand_values():
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 4.0, 6.0], [10.0, 10.0, 11.0, 11.0]]])
    iof = iof_log_bias(boxes).exp() - 1e-7  # (1, 1, 3, 3)
    exp = torch.tensor([[1.0, 4 / 16, 0.0], [4 / 8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert iof.shape == (1, 1, 3, 3)
    assert torch.allclose(iof[0, 0], exp, atol=1e-6)


def test_query_generator_full_image_boxes():
    qg = InitialQueryGenerator(num_queries=3, query_dim=8)
    content, xyzr, wh, boxes = qg(torch.tensor([[600.0, 800.0], [32.0, 64.0]]))
    assert content.shape == (6, 8)
    assert torch.allclose(content.mean(-1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(content.var(-1, unbiased=False), torch.ones(6), atol=1e-3)
    assert torch.allclose(xyzr[0, 0], torch.tensor([400.0, 300.0, math.log2(math.sqrt(480000)), math.log2(0.75)]))
    assert torch.allclose(xyzr[1, 2], torch.tensor([32.0, 16.0, 0.5 * math.log2(2048), -1.0]))
    assert torch.equal(boxes[1, 0], torch.tensor([0.0, 0.0, 64.0, 32.0]))
    assert torch.equal(wh[0, 1], torch.tensor([800.0, 600.0]))


def test_adapter_equals_eq3_outer_product():
    C, G, n, Mb = 4, 2, 3, 5
    mix = CascadeDynamicMixing(query_dim=8, num_groups=G, channels=C, in_points=8, out_points=16,
                               num_blocks=2, num_reused_channel=n, num_reused_spatial=1)
    g = torch.Generator().manual_seed(0)
    gates = torch.randn(Mb, C * 2 * n, generator=g)
    m_cur = torch.randn(Mb, C, C, generator=g)
    bank = torch.randn(Mb, C, n, C, generator=g)  # (Mb, C_in, n, C_out)
    sig = torch.sigmoid(gates)  # the stage's generator applies the sigmoid to the gate blocks
    got = mix._step_filters({"gates": sig}, m_cur, FilterBank(channel=bank))
    sig = sig.view(Mb, C, 2, n)
    for m in range(n):
        for b in range(Mb):
            a_row = sig[b, :, 1, m]  # row / input-channel gate
            c_col = sig[b, :, 0, m]  # column / output-channel gate
            w = torch.outer(a_row, c_col)
            exp = w * bank[b, :, m] + (1 - w) * m_cur[b]
            assert torch.allclose(got[m][b], exp, atol=1e-6)


def test_stage_generator_blocks_and_gate_sigmoid():
    d = small()
    st = d.stages[5]
    assert [b for b, _ in st.generator_layout] == ["offsets", "M", "S", "b_M", "b_S", "beta", "gates", "u", "v"]
    perturb(st)
    q = torch.randn(3, 32)
    gen = st.generate(q)
    raw = st.generator(q).view(3 * 4, -1)
    start = 0
    for name, rows in st.generator_layout:
        exp = raw[:, start:start + rows]
        exp = torch.sigmoid(exp) if name in ("gates", "u", "v") else exp
        assert torch.allclose(gen[name], exp, atol=1e-6), name
        start += rows


def _bilinear_zero_pad(fmap, fx, fy):
    """fmap (C, H, W); continuous pixel coords with centres at integers."""
    C, H, W = fmap.shape
    x0, y0 = math.floor(fx), math.floor(fy)
    out = torch.zeros(C, dtype=torch.float64)
    for xi, yi, wgt in ((x0, y0, (x0 + 1 - fx) * (y0 + 1 - fy)), (x0 + 1, y0, (fx - x0) * (y0 + 1 - fy)),
                        (x0, y0 + 1, (x0 + 1 - fx) * (fy - y0)), (x0 + 1, y0 + 1, (fx - x0) * (fy - y0))):
        if 0 <= xi < W and 0 <= yi < H:
            out += wgt * fmap[:, yi, xi].double()
    return out


@pytest.mark.parametrize("kernel", ["grid_sample", "gather"])
def test_grouped_sampling_matches_brute_force(kernel):
    B, N, G, D, P = 2, 2, 2, 8, 8  # K = 2 blocks x S = 4 sub-points
    strides = (4, 8)
    torch.manual_seed(0)
    smp = GroupedPointSampler(query_dim=D, num_groups=G, num_points=P, strides=strides, sampling_kernel=kernel)
    with torch.no_grad():
        smp.gen_double_d.weight.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    fm = [torch.randn(B, D, 8, 8, generator=g), torch.randn(B, D, 4, 4, generator=g)]
    q = torch.randn(B * N, D, generator=g)
    off = torch.randn(B * N * G, 3 * 2, generator=g) * 0.4
    # the last box sits on the map's corner: some of its points fall outside (zero padding)
    xyzr = torch.tensor([[[14.0, 17.0, 3.2, 0.3], [20.0, 9.0, 2.5, -0.4]], [[6.0, 25.0, 2.8, 0.1], [31.0, 1.0, 3.5, 0.2]]])
    wh = torch.pow(2.0, xyzr[..., 2:3] + xyzr[..., 3:4] * torch.tensor([-0.5, 0.5]))
    maps = smp.prepare(fm)
    assert bool(maps.tables) == (kernel == "gather")
    out, pts = smp(q, {"offsets": off}, xyzr, wh, maps, return_points=True)
    assert out.shape == (B * N * G, P, D // G) and pts.shape == (B, N, G, P, 3)
    sub = smp.gen_double_d(q).view(B * N, 4, 3)
    o1 = off.view(B * N, G, 2, 3)
    outside = 0
    for b in range(B):
        for n in range(N):
            x, y, z, r = xyzr[b, n].tolist()
            w, h = 2 ** (z - r / 2), 2 ** (z + r / 2)
            bn = b * N + n
            for gi in range(G):
                for k in range(2):
                    dx0, dy0, dz0 = o1[bn, gi, k].tolist()
                    for j in range(4):
                        dx1, dy1, dz1 = sub[bn, j].tolist()
                        px = x + w * (dx0 + 2 ** dz0 * dx1)
                        py = y + h * (dy0 + 2 ** dz0 * dy1)
                        pz = z + dz0 + dz1
                        outside += not (0 <= px / 4 - 0.5 <= 7 and 0 <= py / 4 - 0.5 <= 7)
                        logits = torch.tensor([-(pz - 3 - lvl) ** 2 / 2 for lvl in range(2)], dtype=torch.float64)
                        lw = logits.softmax(0)
                        exp = sum(
                            lw[lvl] * _bilinear_zero_pad(fm[lvl][b, gi * 4:(gi + 1) * 4], px / s - 0.5, py / s - 0.5)
                            for lvl, s in enumerate(strides)
                        )
                        got = out[bn * G + gi, k * 4 + j].double()
                        assert torch.allclose(got, exp, atol=1e-5), (b, n, gi, k, j)
                        exp_pt = torch.tensor([px, py, pz], dtype=torch.float64)
                        assert torch.allclose(pts[b, n, gi, k * 4 + j].double(), exp_pt, atol=1e-4)
    assert outside > 0  # the zero-padding branch was exercised


def test_initial_sampling_points_within_box_spec5():
    d = small()
    out = d(feats(), torch.tensor([[64, 64], [40, 56]]), return_sampling_points=True)
    pts = out[0]["sampling_points"]  # (B, N, G, 64, 3)
    assert pts.shape == (2, 6, 4, 64, 3)
    w = torch.tensor([64.0, 56.0]).view(2, 1, 1, 1)
    h = torch.tensor([64.0, 40.0]).view(2, 1, 1, 1)
    assert ((pts[..., 0] - w / 2).abs() <= 0.86 * w).all() and ((pts[..., 1] - h / 2).abs() <= 0.86 * h).all()
    # sub-point j = 0 sits at its block centre; all points use the box's own z at init
    z = 0.5 * torch.log2(w * h)
    assert torch.allclose(pts[..., 2], z.expand_as(pts[..., 2]))


# ---------------------------------------------------------------- initialisation (spec §5)
def test_initialisation_spec5():
    d = small()
    for st in d.stages:
        assert torch.all(st.reg_delta.weight == 0) and torch.all(st.reg_delta.bias == 0)
        assert torch.allclose(st.cls_logits.bias, torch.full((5,), -math.log(99.0)))
        assert torch.all(st.generator.weight == 0) and torch.all(st.mixing.out_proj.weight == 0)
        assert (st.attention.iof_tau >= 0).all() and (st.attention.iof_tau <= 4).all()
        blocks = st.generator_bias_blocks()
        for name in ("gates", "u", "v"):
            if name in blocks:
                assert torch.all(blocks[name] == 0)
        assert blocks["M"].abs().max() <= 1 / math.sqrt(32) and blocks["M"].abs().max() > 0
        off = blocks["offsets"].view(4, -1, 3)
        assert torch.all(off[..., 2] == 0) and off[..., :2].abs().max() <= 0.5
        sub = st.sampler.gen_double_d.bias.view(8, 3)
        assert torch.all(sub[0] == 0) and torch.all(sub[:, 2] == 0) and sub[1:, :2].abs().max() <= 0.5 / math.sqrt(2)
        if st.mixing.static is not None:
            assert all(torch.all(p == 0) for p in st.mixing.static.parameters())


# ---------------------------------------------------------------- bank and gradients
def test_bank_bookkeeping():
    M = torch.zeros(3, 2, 2)
    S = torch.zeros(3, 4, 2)
    empty = FilterBank()
    b0 = update_bank(empty, M + 0, S, stage=0, reuse_start=2, max_channel=4, keep_spatial=True)
    assert b0.channel is None and b0.spatial is None  # stage 0's filters are never reused
    b1 = update_bank(b0, M + 1, S, stage=1, reuse_start=2, max_channel=4, keep_spatial=True)
    b2 = update_bank(b1, M + 2, S, stage=2, reuse_start=2, max_channel=4, keep_spatial=True)
    b3 = update_bank(b2, M + 3, S, stage=3, reuse_start=2, max_channel=2, keep_spatial=False)
    assert b1.num_channel == 1 and b2.num_channel == 2 and b3.num_channel == 2
    assert [float(b2.channel[0, 0, i, 0]) for i in range(2)] == [1.0, 2.0]  # oldest first
    assert [float(b3.channel[0, 0, i, 0]) for i in range(2)] == [2.0, 3.0]  # newest max_channel kept
    assert b3.spatial is None and b2.spatial is S


def test_gradient_reaches_second_stage_generator_through_bank(monkeypatch):
    d = small(num_stages=4)
    perturb(d)
    x, sizes = feats(B=1), torch.tensor([[60, 50]])

    def grads(detach_bank):
        d.zero_grad()
        if detach_bank:
            orig = update_bank

            def detached(bank, m, s, **kw):
                return orig(bank, m.detach(), s.detach(), **kw)

            monkeypatch.setattr(decoder_mod, "update_bank", detached)
        out = d(x, sizes)
        monkeypatch.undo()
        out[-1]["logits"].sum().backward()  # the LAST stage's output only
        return {s: d.stages[s].generator.weight.grad.clone() for s in range(4)}

    attached, detached = grads(False), grads(True)
    sl = d.stages[1].generator_bias_blocks()
    G = 4
    rows = attached[1].view(G, -1, attached[1].shape[-1])
    rows_det = detached[1].view(G, -1, attached[1].shape[-1])
    start = sum(r for name, r in d.stages[1].generator_layout[:1])  # offsets come first
    m_rows = slice(start, start + sl["M"].shape[1])
    diff = (rows[:, m_rows] - rows_det[:, m_rows]).abs().max()
    assert diff > 1e-6 * rows[:, m_rows].abs().max() and diff > 0
    # with the bank detached, stage 1's filter rows still get gradient through its own mixing
    assert rows_det[:, m_rows].abs().max() > 0


def test_boxes_detached_between_stages_content_not():
    d = small(num_stages=3)
    perturb(d)
    out = d(feats(B=1), torch.tensor([[60, 50]]))
    assert all(o["xyzr"].requires_grad and o["boxes"].requires_grad for o in out)
    assert all(not o["input_xyzr"].requires_grad for o in out)
    # content is not detached: stage-0 parameters receive gradient from the last stage's logits
    out[-1]["logits"].sum().backward()
    assert d.stages[0].ffn_fc2.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- forward contract and robustness
def test_forward_contract_and_backward_finite():
    d = small()
    perturb(d)
    out = d(feats(), torch.tensor([[64, 64], [40, 56]]))
    assert len(out) == 6
    for o in out:
        assert o["logits"].shape == (2, 6, 5) and o["xyzr"].shape == (2, 6, 4) and o["boxes"].shape == (2, 6, 4)
        assert set(o) == {"logits", "xyzr", "boxes", "input_xyzr"}
    loss = sum(o["logits"].sum() + o["boxes"].sum() * 1e-3 for o in out)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
    from stageinteractor.core.box_ops import xyzr_to_xyxy
    assert torch.allclose(out[3]["boxes"], xyzr_to_xyxy(out[3]["xyzr"]), atol=1e-4)


def test_autocast_bfloat16_cpu_forward_backward_finite():
    d = small(num_stages=3)
    perturb(d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(feats(B=1), torch.tensor([[60, 50]]))
        loss = sum(o["logits"].float().sum() + o["boxes"].float().sum() * 1e-3 for o in out)
    loss.backward()
    assert all(torch.isfinite(o["boxes"]).all() and torch.isfinite(o["logits"].float()).all() for o in out)
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)


def test_bad_inputs_raise_clear_errors():
    d = small(num_stages=2)
    f = feats(B=1)
    sizes = torch.tensor([[60, 50]])
    bad = [t.clone() for t in f]
    bad[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features\[2\] contains NaN or Inf"):
        d(bad, sizes)
    bad = [t.clone() for t in f]
    bad[0][0, 3, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"features\[0\] contains NaN or Inf"):
        d(bad, sizes)
    with pytest.raises(ValueError, match="image_sizes contains NaN"):
        d(f, torch.tensor([[float("nan"), 50.0]]))
    with pytest.raises(ValueError, match=r"features\[1\] \(stride 8\) must have shape \(B=1, C=32, H≈8, W≈8\)"):
        d([f[0], f[1][:, :16], f[2], f[3]], sizes)
    with pytest.raises(ValueError, match=r"features\[3\] \(stride 32\) must have shape"):
        d([f[0], f[1], f[2], torch.zeros(1, 32, 5, 2)], sizes)
    with pytest.raises(ValueError, match="list of 4 maps"):
        d(f[:3], sizes)
    with pytest.raises(ValueError, match=r"image_sizes must have shape \(B=1, 2\)"):
        d(f, torch.tensor([60, 50]))


def test_zero_area_and_out_of_image_sizes():
    d = small(num_stages=2)
    out = d(feats(B=3), torch.tensor([[0, 0], [1000, 10], [-5, 64]]))
    x0 = out[0]["input_xyzr"]
    assert torch.isfinite(x0).all()
    # clamped to [1, padded size 64]: (h, w) = (1, 1), (64, 10), (1, 64)
    assert torch.allclose(x0[:, 0, :2], torch.tensor([[0.5, 0.5], [5.0, 32.0], [32.0, 0.5]]))
    assert all(torch.isfinite(o["boxes"]).all() and torch.isfinite(o["logits"]).all() for o in out)


# ---------------------------------------------------------------- postprocess
def test_topk_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=g)
    boxes = torch.randn(2, 5, 4, generator=g)
    det = topk_detections(logits, boxes)
    assert det["scores"].shape == (2, 5) and det["boxes"].shape == (2, 5, 4)
    for b in range(2):
        pairs = sorted(((torch.sigmoid(logits[b, q, c]).item(), q, c) for q in range(5) for c in range(3)), reverse=True)[:5]
        assert [(q, c) for _, q, c in pairs] == list(zip(det["query_index"][b].tolist(), det["labels"][b].tolist()))
        assert torch.allclose(det["scores"][b], torch.tensor([s for s, _, _ in pairs]))
        assert torch.equal(det["boxes"][b], boxes[b, det["query_index"][b]])
    assert topk_detections(logits, boxes, k=7)["labels"].shape == (2, 7)


# ---------------------------------------------------------------- CPU layout paths (issue 15)
@pytest.mark.parametrize("B", [1, 2])
def test_channels_last_maps_give_the_same_outputs(B):
    """grid_sample kernel: the sampler reads channels-last maps through a free view (batch 1)
    or one grouped copy (batch > 1) and returns the same values as for the contiguous maps."""
    d = small(sampling_kernel="grid_sample").eval()
    perturb(d)
    f = feats(B=B)
    sizes = torch.tensor([[60.0, 50.0]] * B)
    with torch.no_grad():
        ref = d(f, sizes)
        out = d([x.contiguous(memory_format=torch.channels_last) for x in f], sizes)
    for a, b in zip(ref, out):
        for k in ("logits", "boxes", "xyzr"):
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    folded = d.stages[0].sampler.fold([x.contiguous(memory_format=torch.channels_last) for x in f])
    assert all(torch.equal(v, x.view(B * 4, 8, *x.shape[2:])) for v, x in zip(folded, f))
    if B == 1:  # a free view of the channels-last maps
        cl = [x.contiguous(memory_format=torch.channels_last) for x in f]
        assert d.stages[0].sampler.fold(cl)[0].data_ptr() == cl[0].data_ptr()


@pytest.mark.parametrize("B", [1, 2])
def test_gather_kernel_is_the_same_function_as_grid_sample(B):
    """The CPU default for channels-last maps ("auto" -> gather) against grid_sample: equal to
    1e-12 in float64 (the same function), and in float32 no farther from the float64 result
    than grid_sample itself (they differ only in round-off: grid_sample goes through
    normalised coordinates, gather computes x / stride - 0.5 directly)."""
    f = feats(B=B)
    cl = [x.contiguous(memory_format=torch.channels_last) for x in f]
    sizes = torch.tensor([[60.0, 50.0]] * B)
    decs = {}
    for kernel in ("auto", "grid_sample"):
        decs[kernel] = small(sampling_kernel=kernel).eval()
        perturb(decs[kernel])
    assert decs["auto"].stages[0].sampler.prepare(cl).tables  # auto picks gather here
    assert not decs["auto"].stages[0].sampler.prepare(f).tables  # and grid_sample for NCHW
    with torch.no_grad():
        ref64 = decs["grid_sample"].double()([x.double() for x in f], sizes)
        got64 = decs["auto"].double()([x.double() for x in cl], sizes)
        for a, b in zip(ref64, got64):
            for k in ("logits", "boxes", "xyzr"):
                assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10), k
        out = {k: d.float()(cl, sizes) for k, d in decs.items()}
    for s, r in enumerate(ref64):
        for k in ("logits", "boxes", "xyzr"):
            err = {kern: (o[s][k].double() - r[k]).abs().max().item() for kern, o in out.items()}
            assert err["auto"] <= 3 * err["grid_sample"] + 1e-5, (s, k, err)


def test_gather_kernel_gradients_match_grid_sample():
    """Training on CPU with channels-last maps: gradients w.r.t. the maps and all parameters
    (sampling offsets included) equal grid_sample's (float64)."""
    f = [x.double().contiguous(memory_format=torch.channels_last).requires_grad_() for x in feats(B=2)]
    sizes = torch.tensor([[60.0, 50.0]] * 2)
    grads = {}
    for kernel in ("gather", "grid_sample"):
        d = small(sampling_kernel=kernel).double()
        perturb(d)
        out = d(f, sizes)
        loss = sum((o["logits"].sigmoid() ** 2).sum() + o["boxes"].sum() * 1e-3 for o in out)
        params = [p for _, p in sorted(d.named_parameters())]
        grads[kernel] = torch.autograd.grad(loss, f + params, allow_unused=True)
    n_nonzero = 0
    for a, b in zip(grads["gather"], grads["grid_sample"]):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
        n_nonzero += bool(b.abs().sum() > 0)
    assert n_nonzero > 20


def test_sampling_kernel_choice_is_validated_and_gather_refuses_export():
    with pytest.raises(ValueError, match="sampling_kernel"):
        small(sampling_kernel="bilinear")
    smp = GroupedPointSampler(query_dim=8, num_groups=2, num_points=8, strides=(4, 8), sampling_kernel="gather")
    fm = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    maps = smp.prepare(fm)  # explicit gather on NCHW maps: one channels-last copy of the rows
    assert maps.tables[0].shape == (8 * 8 * 2, 4) and maps.tables[0].is_contiguous()
    assert torch.equal(maps.tables[0].view(8, 8, 2, 4)[3, 5, 1], fm[0][0, 4:, 3, 5])

    def trace(x):
        return smp.prepare([x, fm[1]]).tables[0]

    with pytest.raises(ValueError, match="cannot be traced"):
        torch.jit.trace(trace, (fm[0],))


def test_generator_weight_column_major_survives_load_and_casts():
    d = small()
    perturb(d)
    w = d.stages[1].generator.weight
    assert w.stride() == (1, w.shape[0])  # (rows, D) stored D-major
    sd = {k: v.contiguous() for k, v in d.state_dict().items()}
    e = small()
    e.load_state_dict(sd)
    e = e.double()
    we = e.stages[1].generator.weight
    assert we.stride() == (1, we.shape[0]) and torch.equal(we, w.double())
    d.train()
    out = d(feats(), torch.tensor([[60.0, 50.0], [40.0, 64.0]]))
    sum(o["logits"].sum() + o["boxes"].sum() for o in out).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
