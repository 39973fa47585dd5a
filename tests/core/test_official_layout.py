"""Fast checks of the official layout, the fused-generator mapping and the fixture formula
against hand-computed values (no fixture file, no full-size decoder)."""
import math
import zlib

import torch

from stageinteractor.official.layout import (
    DecoderHParams,
    FusedMap,
    decoder_key_maps,
    decoder_official_to_ours,
    decoder_ours_to_official,
    official_decoder_layout,
)
from stageinteractor.official.fixture import (
    FixtureRules,
    formula_base,
    official_decoder_state_dict,
)


def test_layout_counts_match_the_spec():
    """official_checkpoint_layout.md §7.3: keys and parameters per stage (R50, 100 queries)."""
    lay = official_decoder_layout(DecoderHParams())
    per_stage_keys = [sum(1 for k in lay if k.startswith(f"roi_head.bbox_head.{s}.")) for s in range(6)]
    assert per_stage_keys == [40, 40, 54, 60, 66, 72]
    buffers = ("iou_snyc_statistics.running_mean", "iou_snyc_statistics.running_var",
               "iou_snyc_statistics.num_batches_tracked")
    per_stage_params = [
        sum(math.prod(sh) for k, sh in lay.items()
            if k.startswith(f"roi_head.bbox_head.{s}.") and not k.endswith(buffers))
        for s in range(6)
    ]
    assert per_stage_params == [22_718_932, 18_495_908, 17_047_972, 17_606_692, 18_165_412, 18_724_132]
    dead = sum(math.prod(sh) for k, sh in lay.items() if "subbox_score_list" in k)
    assert dead == 328_960
    assert lay["rpn_head.init_content_features.weight"] == (100, 256)
    assert official_decoder_layout(DecoderHParams(num_queries=300))["rpn_head.init_proposal_bboxes"] == (300, 4)


def test_fused_map_interleaves_groups():
    """Two parts with 2 and 1 rows per group, G = 2: ours = [a_g0 (2 rows), b_g0, a_g1, b_g1]."""
    a = torch.arange(4.0).view(4, 1)  # rows a0..a3: group 0 = a0, a1; group 1 = a2, a3
    b = torch.tensor([[10.0], [11.0]])  # group 0 = b0, group 1 = b1
    m = FusedMap("x", ("a", "b"), ((4, 1), (2, 1)), groups=2)
    fused = m.fuse([a, b])
    assert fused.view(-1).tolist() == [0.0, 1.0, 10.0, 2.0, 3.0, 11.0]
    back = m.split(fused)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)
    m1 = FusedMap("y", ("a", "b"), ((4,), (2,)), groups=2)  # biases
    assert m1.fuse([a.view(4), b.view(2)]).tolist() == [0.0, 1.0, 10.0, 2.0, 3.0, 11.0]


def test_small_decoder_round_trip_with_fusion():
    """A 3-stage, 4-query, 3-class decoder layout (stage 2 reuses filters): every key is
    converted, the fused generator has the per-group block order, and all comes back bit for bit."""
    hp = DecoderHParams(num_queries=4, num_classes=3, num_stages=3)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.zeros(s, dtype=torch.int64) if k.endswith("num_batches_tracked")
              else torch.zeros(s) if "subbox_score" in k else torch.randn(s, generator=gen))
          for k, s in official_decoder_layout(hp).items()}
    sd["rpn_head.init_proposal_bboxes"] = torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(4, 1)
    for s in range(3):
        sd[f"roi_head.bbox_head.{s}.iou_snyc_statistics.running_mean"] = torch.full((1,), 0.5)
        sd[f"roi_head.bbox_head.{s}.iou_snyc_statistics.running_var"] = torch.zeros(1)
    ours, dropped = decoder_official_to_ours(sd, hp)
    gen2 = ours["stages.2.generator.weight"]
    # group 0 starts with gen_one_d's first 12 rows (4 blocks x xyz), then parameter_generator's
    assert torch.equal(gen2[:12], sd["roi_head.bbox_head.2.feat_extractor.gen_one_d.0.weight"][:12])
    pg = sd["roi_head.bbox_head.2.dynamic_conv.parameter_generator.weight"]
    assert torch.equal(gen2[12:12 + pg.shape[0] // 4], pg[: pg.shape[0] // 4])
    back = decoder_ours_to_official(ours, hp)
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    assert all("subbox" in k or "snyc" in k or "init_proposal" in k for k in dropped)
    n_maps = sum(len(m.officials) if isinstance(m, FusedMap) else 1 for m in decoder_key_maps(hp))
    assert n_maps == len(sd)


def _hand_base(name, n, A):
    c = zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF
    phase = (c % 10007) / 1000.0
    out = []
    for i in range(n):
        k = i + 1 + (c % 1000003)
        out.append(math.sin(A * ((k * k) % 1000003) + phase))
    return out


def test_formula_base_matches_hand_computation():
    for name, shape, A in [("feat0", (2, 3), 0.37), ("roi_head.bbox_head.3.iof_tau", (8,), 1.1)]:
        got = formula_base(name, shape, A).ravel().tolist()
        assert got == _hand_base(name, math.prod(shape), A)


def test_fixture_rules_by_hand():
    A = 0.2
    keys = [
        ("roi_head.bbox_head.0.fc_reg.weight", (4, 256)),
        ("roi_head.bbox_head.0.fc_reg.bias", (4,)),
        ("roi_head.bbox_head.0.fc_cls.bias", (3,)),
        ("roi_head.bbox_head.0.feat_extractor.gen_one_d.0.bias", (6,)),
        ("roi_head.bbox_head.0.ffn_norm.weight", (2,)),
        ("roi_head.bbox_head.0.attention_norm.weight", (2,)),
        ("roi_head.bbox_head.0.attention.attn.in_proj_bias", (2,)),
        ("roi_head.bbox_head.0.dynamic_conv.Wv.weight", (2, 16)),
        ("roi_head.bbox_head.0.cls_fcs.0.weight", (2, 9)),
        ("roi_head.bbox_head.2.dynamic_conv.subbox_score_list.0.weight", (2, 2)),
        ("roi_head.bbox_head.0.iof_tau", (2,)),
    ]
    sd = official_decoder_state_dict(keys, FixtureRules(A=A))

    def f32(x):
        return torch.tensor(x, dtype=torch.float64).float().tolist()

    base = {k: _hand_base(k, math.prod(s), A) for k, s in keys}
    g, o = (0.2, 0.2, 0.3, 1.4), (0.0, 0.0, -0.4, 0.0)
    w = base["roi_head.bbox_head.0.fc_reg.weight"]
    assert sd["roi_head.bbox_head.0.fc_reg.weight"].view(-1).tolist() == f32(
        [(w[i] / 16.0) * g[i // 256] for i in range(1024)])
    b = base["roi_head.bbox_head.0.fc_reg.bias"]
    assert sd["roi_head.bbox_head.0.fc_reg.bias"].tolist() == f32([(0.1 * b[j]) * g[j] + o[j] for j in range(4)])
    b = base["roi_head.bbox_head.0.fc_cls.bias"]
    assert sd["roi_head.bbox_head.0.fc_cls.bias"].tolist() == f32([0.1 * v + -4.59511985013459 for v in b])
    b = base["roi_head.bbox_head.0.feat_extractor.gen_one_d.0.bias"]
    assert sd["roi_head.bbox_head.0.feat_extractor.gen_one_d.0.bias"].tolist() == f32(
        [0.1 * v + (-3.0 if i % 3 == 2 else 0.0) for i, v in enumerate(b)])
    b = base["roi_head.bbox_head.0.ffn_norm.weight"]
    assert sd["roi_head.bbox_head.0.ffn_norm.weight"].tolist() == f32([(1 + 0.1 * v) * 8.0 for v in b])
    b = base["roi_head.bbox_head.0.attention_norm.weight"]
    assert sd["roi_head.bbox_head.0.attention_norm.weight"].tolist() == f32([1 + 0.1 * v for v in b])
    b = base["roi_head.bbox_head.0.attention.attn.in_proj_bias"]
    assert sd["roi_head.bbox_head.0.attention.attn.in_proj_bias"].tolist() == f32([0.1 * v for v in b])
    b = base["roi_head.bbox_head.0.dynamic_conv.Wv.weight"]
    assert sd["roi_head.bbox_head.0.dynamic_conv.Wv.weight"].view(-1).tolist() == f32(
        [(v / 4.0) * 0.1 for v in b])
    b = base["roi_head.bbox_head.0.cls_fcs.0.weight"]
    assert sd["roi_head.bbox_head.0.cls_fcs.0.weight"].view(-1).tolist() == f32([v / 3.0 for v in b])
    assert not sd["roi_head.bbox_head.2.dynamic_conv.subbox_score_list.0.weight"].any()
    b = base["roi_head.bbox_head.0.iof_tau"]
    assert sd["roi_head.bbox_head.0.iof_tau"].tolist() == f32([1 + v for v in b])


def test_fixture_rules_read_from_expected_meta():
    meta = {
        "meta/A": 0.5,
        "meta/per_key_mult_json": '{"ffn_norm.weight": 2.0}',
        "meta/per_key_add_json": '{"fc_cls.bias": -1.0}',
        "meta/gen_one_d_z_offset": -2.0,
        "meta/fc_reg_rule_json": '{"row_gain": [1, 1, 1, 1], "bias_offset": [0, 0, 0, 0]}',
    }
    r = FixtureRules.from_expected(meta)
    assert r.A == 0.5 and dict(r.mult) == {"ffn_norm.weight": 2.0} and dict(r.add) == {"fc_cls.bias": -1.0}
    assert r.gen_one_d_z_offset == -2.0 and r.fc_reg_row_gain == (1.0, 1.0, 1.0, 1.0)
