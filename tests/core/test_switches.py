"""Ablation switches: validation, and every switch changes what it claims (small dims)."""
import pytest
import torch

from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.sampler import GroupedPointSampler, Point3DSampler
from stageinteractor.core.switches import ADAMIXER_BASELINE, resolve_switches
from decoder_helpers import SMALL, small  # noqa: E402  (tests/core helper)

def shapes(d):
    return {k: tuple(v.shape) for k, v in d.state_dict().items()}


def layouts(d):
    return [st.generator_layout for st in d.stages]


@pytest.mark.parametrize(
    "name,value",
    [
        ("sampler", "vanilla"),
        ("subpoint_offsets", "per_point"),
        ("refine_mode", "2^z"),
        ("pe_residual", "both"),
        ("dynamic_bias", 1),
        ("first_stage_points", 48),
        ("reuse", "yes"),
        ("max_reused_channel_filters", 5),
        ("num_reused_spatial_filters", 2),
        ("filter_usage", "adapters"),
        ("static_mixing", "channel-spatial"),
        ("reuse_start", 0),
    ],
)
def test_invalid_values_name_switch_and_allowed(name, value):
    with pytest.raises(ValueError) as err:
        resolve_switches(num_stages=6, **{name: value})
    msg = str(err.value)
    assert name in msg and "one of" in msg


def test_reuse_off_rejects_reuse_only_switches():
    for kw in (
        dict(max_reused_channel_filters=2),
        dict(num_reused_spatial_filters=1),
        dict(filter_usage="adapter"),
        dict(static_mixing="channel"),
    ):
        with pytest.raises(ValueError, match="reuse=False"):
            resolve_switches(num_stages=6, reuse=False, **kw)
    sw = resolve_switches(num_stages=6, reuse=False, max_reused_channel_filters=0, static_mixing="none")
    assert (sw.max_reused_channel_filters, sw.num_reused_spatial_filters) == (0, 0)
    with pytest.raises(ValueError, match="reuse=False"):
        resolve_switches(num_stages=6, reuse=True, max_reused_channel_filters=0, num_reused_spatial_filters=0)
    with pytest.raises(ValueError, match="subpoint_offsets"):
        resolve_switches(num_stages=6, sampler="3d", subpoint_offsets="per_group")


def test_released_defaults():
    sw = resolve_switches(num_stages=6)
    assert sw.as_dict() == dict(
        sampler="grouped", subpoint_offsets="shared", refine_mode="wh", pe_residual="stream", dynamic_bias=True,
        first_stage_points=64, reuse=True, reuse_start=2, max_reused_channel_filters=4,
        num_reused_spatial_filters=1, filter_usage="adapter", static_mixing="channel_spatial",
    )
    d = small()
    assert d.stage_points == [64, 32, 32, 32, 32, 32]
    assert d.stage_reused_channel == [0, 0, 1, 2, 3, 4]
    assert d.stage_reused_spatial == [0, 0, 1, 1, 1, 1]


def test_reuse_off_has_no_adapter_or_static_params():
    d = small(reuse=False)
    keys = list(d.state_dict())
    assert not any(".static." in k for k in keys)
    for lay in layouts(d):
        assert [b for b, _ in lay] == ["offsets", "M", "S", "b_M", "b_S"]
    # every stage generates its whole spatial filter (P_out rows)
    for st in d.stages:
        assert st.mixing.cur_rows == SMALL["out_points"] and st.mixing.static is None


def test_adamixer_baseline_structure():
    d = StageInteractorDecoder.adamixer(**SMALL)
    assert d.switches.refine_mode == "2z" and not d.switches.dynamic_bias and not d.switches.reuse
    for s, st in enumerate(d.stages):
        assert isinstance(st.sampler, Point3DSampler) and st.refine_mode == "2z"
        P = 64 if s == 0 else 32
        C = SMALL["query_dim"] // SMALL["num_groups"]
        assert st.generator_layout == [("offsets", 3 * P), ("M", C * C), ("S", P * SMALL["out_points"])]
        assert st.mixing.static is None
    assert not any("gen_double_d" in k or ".static." in k for k in d.state_dict())
    assert set(ADAMIXER_BASELINE) == {"sampler", "refine_mode", "reuse", "dynamic_bias", "first_stage_points"}


def test_param_sets_change_as_claimed():
    base = shapes(small())
    # max reused channel filters (Tab. 10): number of static pairs / gate rows per stage
    for k in range(1, 5):
        d = small(max_reused_channel_filters=k)
        assert [st.mixing.num_reused_channel for st in d.stages] == [0, 0] + [min(s - 1, k) for s in range(2, 6)]
        assert [len(st.mixing.static) if st.mixing.static is not None else 0 for st in d.stages][-1] == min(4, k)
    # reused spatial filters (Tab. 8): generated rows P_out/(N_S+1), gate rows N_S*P_cur
    for ns, rows in ((0, 16), (1, 8), (3, 4)):
        d = small(num_reused_spatial_filters=ns, max_reused_channel_filters=1)
        st = d.stages[3]
        assert st.mixing.cur_rows == rows and st.mixing.reused_rows == 16 - rows
        assert dict(st.generator_layout).get("u", 0) == 16 - rows
    # filter usage (Tab. 11): only "adapter" has gate rows
    for usage in ("none", "previous", "current"):
        d = small(filter_usage=usage)
        assert all("gates" not in dict(lay) for lay in layouts(d))
    assert "gates" in dict(small().stages[5].generator_layout)
    # static mixing (Tab. 16)
    kinds = {}
    for kind in ("none", "channel", "spatial", "channel_spatial"):
        kinds[kind] = sorted(k.split(".static.0.")[1] for k in shapes(small(static_mixing=kind)) if "stages.5.mixing.static.0." in k)
    assert kinds == {
        "none": [], "channel": ["channel.bias", "channel.weight"], "spatial": ["spatial.bias", "spatial.weight"],
        "channel_spatial": ["inter.bias", "inter.weight", "intra.bias", "intra.weight"],
    }
    # sampler (Tab. 17) and first-stage points (Tab. 18)
    d3 = small(sampler="3d")
    assert isinstance(d3.stages[0].sampler, Point3DSampler) and dict(d3.stages[0].generator_layout)["offsets"] == 192
    assert isinstance(small().stages[0].sampler, GroupedPointSampler)
    assert dict(small(first_stage_points=32).stages[0].generator_layout)["offsets"] == 3 * 4
    assert dict(small().stages[0].generator_layout)["offsets"] == 3 * 8
    # sub-point offsets: shared Linear vs per-group generator rows
    pg = shapes(small(subpoint_offsets="per_group"))
    assert "stages.0.sampler.gen_double_d.weight" in base and "stages.0.sampler.gen_double_d.weight" not in pg
    assert dict(small(subpoint_offsets="per_group").stages[0].generator_layout)["sub_offsets"] == 24
    # dynamic biases
    assert all("b_M" not in dict(lay) and "beta" not in dict(lay) for lay in layouts(small(dynamic_bias=False)))


def _outputs(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, SMALL["query_dim"], 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]
    with torch.no_grad():
        for p in d.parameters():  # leave the zero init so that every path is active
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return d(feats, torch.tensor([[60, 50]]))[-1]


@pytest.fixture(scope="module")
def ref_outputs():
    return _outputs(small(num_stages=4))


@pytest.mark.parametrize(
    "kw",
    [
        # same parameter set as the reference: the same perturbation, only the forward differs.
        # (filter_usage, static_mixing and reuse_start change the parameter set: they are checked
        # at the place they act and on one shared state dict below.)
        dict(pe_residual="query"),
        dict(refine_mode="2z"),
    ],
)
def test_behaviour_switches_change_outputs(kw, ref_outputs):
    ref = ref_outputs
    out = _outputs(small(num_stages=4, **kw))
    assert not torch.allclose(ref["logits"], out["logits"]) or not torch.allclose(ref["boxes"], out["boxes"])


@pytest.mark.parametrize(
    "kw",
    [
        dict(sampler="3d"),
        dict(sampler="3d_group_init", refine_mode="2z"),
        dict(subpoint_offsets="per_group"),
        dict(num_reused_spatial_filters=3),
        dict(num_reused_spatial_filters=0, max_reused_channel_filters=1),
        dict(first_stage_points=32, reuse_start=1),
        dict(dynamic_bias=False),
        dict(static_mixing="channel"),
        dict(static_mixing="spatial", filter_usage="none"),
        dict(reuse=False),
    ],
)
def test_every_setting_runs_forward_backward(kw):
    d = small(num_stages=4, **kw)
    out = _outputs(d)
    assert out["logits"].shape == (1, 6, 5) and torch.isfinite(out["boxes"]).all()
    full = d(_feats(), torch.tensor([[60, 50]]))
    sum(o["logits"].sum() + o["boxes"].sum() * 1e-3 for o in full).backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)


def _feats():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, SMALL["query_dim"], 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]


def test_spatial_reuse_needs_equal_points():
    with pytest.raises(ValueError, match="equal point counts"):
        small(reuse_start=1)  # stage 0 (64 points) would feed stage 1 (32 points)


def test_group_init_changes_only_init():
    torch.manual_seed(0)
    a = small(sampler="3d")
    torch.manual_seed(0)
    b = small(sampler="3d_group_init")
    assert shapes(a) == shapes(b)
    ba = a.stages[1].generator_bias_blocks()["offsets"].view(4, 32, 3)
    bb = b.stages[1].generator_bias_blocks()["offsets"].view(4, 32, 3)
    assert torch.all(ba[..., 2] == -1) and torch.all(bb[..., 2] == -1)
    # group init: 8 sub-points of each block share the block centre offset at j = 0 pattern
    sub = bb[..., :2].view(4, 4, 8, 2) - bb[..., :2].view(4, 4, 8, 2)[:, :, :1]
    assert torch.allclose(sub[:, 0], sub[:, 1]) and not torch.allclose(ba, bb)


# ---------------------------------------------------------------------------------------------
# Value oracles: each filter_usage / static_mixing variant at the place it acts (issue 24)
# ---------------------------------------------------------------------------------------------
from stageinteractor.core.dynamic_mixing import CascadeDynamicMixing  # noqa: E402
from stageinteractor.core.filter_bank import FilterBank  # noqa: E402


def _ln(y):
    """Non-affine LayerNorm over a whole (rows, C) matrix, written out."""
    mean = y.mean()
    var = ((y - mean) ** 2).mean()
    return (y - mean) / torch.sqrt(var + 1e-5)


def _static_by_hand(mod, x, residual):
    """``residual + static(x)`` for one (P, C) matrix, from the static_mixing docstring."""
    K, S, C = mod.num_blocks, mod.num_sub, mod.channels
    out = residual.clone()
    if mod.kind == "channel":
        for p in range(K * S):
            out[p] += mod.channel.weight @ x[p] + mod.channel.bias
    elif mod.kind == "spatial":
        for c in range(C):
            out[:, c] += mod.spatial.weight @ x[:, c] + mod.spatial.bias
    else:
        for k in range(K):  # intra: the S sub-points x C channels of block k (row-major (s, c))
            out[k * S:(k + 1) * S] += (mod.intra.weight @ x[k * S:(k + 1) * S].reshape(-1) + mod.intra.bias).view(S, C)
        for j in range(S):  # inter: sub-point j of every block, (k, c) row-major
            rows = [k * S + j for k in range(K)]
            out[rows] += (mod.inter.weight @ x[rows].reshape(-1) + mod.inter.bias).view(K, C)
    return out


def _mixing_by_hand(mod, q, gen, sampled, bank):
    """CascadeDynamicMixing.forward, one (query, group) problem at a time, from Eq. 2-3 and the
    module docstring (gates per group as (c, slot, m): slot 0 = output gate c_m, slot 1 = input
    gate a_m; betas (m, c))."""
    G, C, P, n = mod.num_groups, mod.channels, mod.in_points, mod.num_reused_channel
    BN = q.shape[0]
    ys = []
    for i in range(BN * G):
        i0 = sampled[i]
        m_cur = gen["M"][i].view(C, C)
        x = torch.relu(_ln(i0 @ m_cur + gen["b_M"][i]))
        r = i0
        for m in range(n):
            z = x if mod.static is None else _static_by_hand(mod.static[m], x, r)
            r = z
            beta = gen["beta"][i].view(n, C)[m]
            if mod.filter_usage == "none":
                x = torch.relu(_ln(z + beta))
                continue
            if mod.filter_usage == "previous":
                mg = bank.filters[m][i]
            elif mod.filter_usage == "current":
                mg = m_cur
            else:
                gates = gen["gates"][i].view(C, 2, n)
                w = torch.outer(gates[:, 1, m], gates[:, 0, m])  # a c^T, (C_in, C_out)
                mg = w * bank.filters[m][i] + (1 - w) * m_cur
            x = torch.relu(_ln(z @ mg + beta))
        s_cur = gen["S"][i].view(mod.cur_rows, P)
        if mod.num_reused_spatial:
            uv = torch.outer(gen["u"][i], gen["v"][i])
            s_prev = bank.spatial[i][: mod.reused_rows]
            s_full = torch.cat([s_cur, uv * s_prev + (1 - uv) * s_cur.repeat(mod.num_reused_spatial, 1)])
        else:
            s_full = s_cur
        ys.append(torch.relu(_ln(s_full @ x + gen["b_S"][i][:, None])))
    flat = torch.stack(ys).view(BN, G * mod.out_points * C)  # (g, out point, channel)
    return mod.out_norm(q + mod.out_proj(flat))


def _mixing_case(filter_usage, static_mixing, num_reused_spatial=1, seed=0):
    torch.manual_seed(seed)
    G, C, P, n, P_out = 2, 4, 8, 2, 8
    mod = CascadeDynamicMixing(
        query_dim=G * C, num_groups=G, channels=C, in_points=P, out_points=P_out, num_blocks=2,
        num_reused_channel=n, num_reused_spatial=num_reused_spatial, filter_usage=filter_usage,
        static_mixing=static_mixing,
    ).double()
    with torch.no_grad():
        for p in mod.parameters():  # static layers and out_proj start at 0: make every path act
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    BN = 3
    Mb = BN * G
    gen = {}
    for name, rows in mod.generator_blocks():
        t = torch.randn(Mb, rows, dtype=torch.float64)
        gen[name] = torch.sigmoid(t) if name in mod.sigmoid_blocks() else t
    bank = FilterBank(filters=tuple(torch.randn(Mb, C, C, dtype=torch.float64) for _ in range(n)),
                      spatial=torch.randn(Mb, P_out, P, dtype=torch.float64))
    q = torch.randn(BN, G * C, dtype=torch.float64)
    sampled = torch.randn(Mb, P, C, dtype=torch.float64)
    return mod, q, gen, sampled, bank


@pytest.mark.parametrize("static_mixing", ["none", "channel", "spatial", "channel_spatial"])
@pytest.mark.parametrize("filter_usage", ["none", "previous", "current", "adapter"])
@pytest.mark.parametrize("grad", [False, True])
def test_mixing_uses_the_bank_as_each_switch_claims(filter_usage, static_mixing, grad):
    """Each filter_usage / static_mixing variant against a by-hand cascade that reads the bank's
    filters (Tab. 11: none / previous M_j / current M_cur / Eq. 3 adapter) and uses static layer
    m at reuse step m (Tab. 16); also with grad enabled (the training path of the adapter)."""
    mod, q, gen, sampled, bank = _mixing_case(filter_usage, static_mixing)
    with torch.set_grad_enabled(grad):
        got = mod(q, gen, sampled, bank)[0]
    with torch.no_grad():
        want = _mixing_by_hand(mod, q, gen, sampled, bank)
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-9)


def test_mixing_without_spatial_reuse_ignores_the_bank_spatial_filter():
    mod, q, gen, sampled, bank = _mixing_case("adapter", "channel_spatial", num_reused_spatial=0)
    with torch.no_grad():
        got = mod(q, gen, sampled, bank)[0]
        other = mod(q, gen, sampled, FilterBank(filters=bank.filters, spatial=bank.spatial * 3))[0]
        want = _mixing_by_hand(mod, q, gen, sampled, bank)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(got, other)


def _record_banks(d):
    """Forward hooks: the bank each stage receives and the filters each stage leaves."""
    seen = {"bank": [], "m_cur": [], "s_full": []}

    def pre(mod, args):
        seen["bank"].append(args[5])

    def post(mod, args, out):
        seen["m_cur"].append(out["m_cur"])
        seen["s_full"].append(out["s_full"])

    handles = [h for st in d.stages for h in (st.register_forward_pre_hook(pre), st.register_forward_hook(post))]
    return seen, handles


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # released: reuse_start=2, max 4 channel filters, 1 spatial
        dict(reuse_start=3),
        dict(reuse_start=4, max_reused_channel_filters=1),
        dict(max_reused_channel_filters=2),
        dict(num_reused_spatial_filters=0, max_reused_channel_filters=3),
    ],
)
def test_each_stage_mixes_with_the_filters_of_the_stages_the_switches_name(kw):
    """reuse_start / max reused filters at the place they act: stage s receives the channel
    filters generated by stages max(reuse_start-1, s-max)..s-1 (oldest first) and, from
    reuse_start on, the previous stage's spatial filter; earlier stages receive nothing."""
    d = small(num_stages=6, **kw)
    rs = d.switches.reuse_start
    max_c = d.switches.max_reused_channel_filters
    n_s = d.switches.num_reused_spatial_filters
    seen, handles = _record_banks(d)
    try:
        with torch.no_grad():
            d(_feats(), torch.tensor([[60, 50]]))
    finally:
        for h in handles:
            h.remove()
    for s, bank in enumerate(seen["bank"]):
        want = list(range(max(rs - 1, s - max_c), s)) if s >= rs else []
        assert len(bank.filters) == len(want) == d.stages[s].mixing.num_reused_channel, (s, want)
        for f, t in zip(bank.filters, want):
            assert torch.equal(f, seen["m_cur"][t]), (s, t)
        if s >= rs and n_s:
            rows = d.stages[s].mixing.reused_rows
            assert torch.equal(bank.spatial[:, :rows], seen["s_full"][s - 1][:, :rows]), s
        if s < rs:
            assert bank.spatial is None, s


def _perturbed_state(d, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
            for k, v in d.state_dict().items()}


def _with_gates(d_adapter, shared, gate_bias):
    """The adapter decoder's state dict built from ``shared`` (a gate-less decoder's): every
    generator block copied by name, the gate rows with weight 0 and bias ``gate_bias``."""
    sd = {k: v.clone() for k, v in shared.items() if not k.endswith(("generator.weight", "generator.bias"))}
    for s, st in enumerate(d_adapter.stages):
        G = st.num_groups
        w_src = shared[f"stages.{s}.generator.weight"].reshape(G, -1, st.generator.weight.shape[1])
        b_src = shared[f"stages.{s}.generator.bias"].view(G, -1)
        src_layout = [b for b in st.generator_layout if b[0] != "gates"]
        starts, o = {}, 0
        for name, rows in src_layout:
            starts[name] = o
            o += rows
        ws, bs = [], []
        for name, rows in st.generator_layout:
            if name == "gates":
                ws.append(torch.zeros(G, rows, w_src.shape[2]))
                bs.append(torch.full((G, rows), float(gate_bias)))
            else:
                ws.append(w_src[:, starts[name]:starts[name] + rows])
                bs.append(b_src[:, starts[name]:starts[name] + rows])
        sd[f"stages.{s}.generator.weight"] = torch.cat(ws, 1).reshape(-1, w_src.shape[2])
        sd[f"stages.{s}.generator.bias"] = torch.cat(bs, 1).reshape(-1)
    return sd


def _run(d, sd):
    d.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return d(_feats(), torch.tensor([[60, 50]]))


def test_filter_usage_variants_on_one_shared_state_dict():
    """none / previous / current have the same parameters: one shared state dict drives all
    three (so only the forward pass can make them differ), and the adapter with every gate
    saturated at 1 (Eq. 3: M_j) equals "previous", at 0 (M_cur) equals "current"."""
    decs = {u: small(num_stages=5, filter_usage=u) for u in ("none", "previous", "current", "adapter")}
    shared = _perturbed_state(decs["previous"])
    assert all(set(decs[u].state_dict()) == set(shared) for u in ("none", "current"))
    out = {u: _run(decs[u], shared) for u in ("none", "previous", "current")}
    out["adapter_1"] = _run(decs["adapter"], _with_gates(decs["adapter"], shared, 30.0))
    out["adapter_0"] = _run(decs["adapter"], _with_gates(decs["adapter"], shared, -30.0))
    for s in range(5):
        for a, b in (("adapter_1", "previous"), ("adapter_0", "current")):
            torch.testing.assert_close(out[a][s]["logits"], out[b][s]["logits"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[a][s]["boxes"], out[b][s]["boxes"], rtol=1e-5, atol=1e-4)
    for s in range(2):  # before reuse_start nothing is reused: identical
        for u in ("none", "current"):
            assert torch.equal(out[u][s]["logits"], out["previous"][s]["logits"]), (u, s)
    for a, b in (("none", "previous"), ("previous", "current"), ("none", "current")):
        assert not torch.allclose(out[a][2]["logits"], out[b][2]["logits"], atol=1e-4), (a, b)


def test_static_mixing_and_reuse_start_variants_on_one_shared_state_dict():
    """static_mixing="none" vs "channel_spatial" with the static layers at 0: the same
    parameters otherwise, loaded from one state dict; the cascade step Z = X (none) and
    Z = R + 0 (static) differ from the first reusing stage on and agree before it. The same for
    reuse_start 2 vs 3 on the shared stages 0-1."""
    none, cs = small(num_stages=4, static_mixing="none"), small(num_stages=4)
    shared = _perturbed_state(none)
    full = dict(cs.state_dict())
    full.update(shared)
    assert set(full) - set(shared) and all(".static." in k for k in set(full) - set(shared))
    a, b = _run(none, shared), _run(cs, full)
    for s in range(2):
        assert torch.equal(a[s]["logits"], b[s]["logits"]), s
    assert not torch.allclose(a[2]["logits"], b[2]["logits"], atol=1e-4)

    rs2, rs3 = small(num_stages=4), small(num_stages=4, reuse_start=3)
    sd2 = _perturbed_state(rs2)
    sd3 = dict(rs3.state_dict())
    common = [k for k in sd3 if k in sd2 and sd2[k].shape == sd3[k].shape]
    sd3.update({k: sd2[k] for k in common})
    assert all(k in common for k in sd3 if k.startswith(("stages.0.", "stages.1.", "query_generator.")))
    a, b = _run(rs2, sd2), _run(rs3, sd3)
    for s in range(2):
        assert torch.equal(a[s]["logits"], b[s]["logits"]), s
    assert not torch.allclose(a[2]["logits"], b[2]["logits"], atol=1e-4)
