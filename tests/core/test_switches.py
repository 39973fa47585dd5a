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
        dict(pe_residual="query"),
        dict(refine_mode="2z"),
        dict(filter_usage="none"),
        dict(filter_usage="previous"),
        dict(filter_usage="current"),
        dict(static_mixing="none"),
        dict(reuse_start=3),
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
