"""Numerical parity with the authors' StageInteractor code (issue 8).

Fixture: ``tests/fixtures/official_decoder_parity`` (README there). Its weights and input
feature maps are a formula of the official key names; :mod:`stageinteractor.official.fixture`
regenerates them, :mod:`stageinteractor.official.layout` converts the
authors' decoder state dict to ours, and the outputs of our decoder and criterion are compared
with the numbers recorded from the official code.

Tolerances: the issue asks for 1e-4 max abs error. The fixture's §8 measures the float32
round-off floor of the official code itself (max |float32 - float64|), which grows 2-3x per
stage and exceeds 1e-4 for boxes from stage 0 and for logits/features at later stages; there the
§8 suggested tolerances apply. ``PARITY_MEASURED`` (printed with ``pytest -s``) holds the
measured maxima.

Runtime: one eval forward and one train forward of the full-size fixture decoder (R50 layout,
100 queries, 320x480, batch 2); the formula weights are built once per module.
"""
import json
import math

import pytest
import torch

from stageinteractor.core import (
    CrossStageLabelAssigner,
    HungarianMatcher,
    StageInteractorCriterion,
    StageInteractorDecoder,
    topk_detections,
)
from stageinteractor.official.layout import (
    DecoderHParams,
    FusedMap,
    decoder_key_maps,
    decoder_official_to_ours,
    decoder_ours_to_official,
    official_decoder_layout,
)
from stageinteractor.official.fixture import find_parity_fixture, load_fixture

FIXTURE_DIR = find_parity_fixture()
pytestmark = pytest.mark.skipif(FIXTURE_DIR is None, reason="official parity fixture not found")

# Per-stage tolerances (max abs error). 1e-4 (the issue) where the §8 float32 floor allows,
# the §8 suggested tolerances elsewhere.
def _tol(name: str, s: int) -> float:
    if name == "cls_score":
        return 1e-4 if s <= 3 else 1e-3
    if name in ("boxes", "xyzr"):
        return 1e-2 if s <= 4 else 5e-2
    if name in ("attn_out", "mix_out", "sampled_q0", "box_delta"):
        return 1e-4 if s == 0 else 1e-3
    if name == "object_feats":
        return 2e-3 if s <= 3 else 2e-2
    raise KeyError(name)


PARITY_MEASURED = {}


@pytest.fixture(scope="module")
def fx():
    return load_fixture(FIXTURE_DIR)


@pytest.fixture(scope="module")
def official_sd(fx):
    return fx.official_state_dict()


@pytest.fixture(scope="module")
def hp(fx):
    n = int(fx.expected["eval/init_xyzr"].shape[1])
    k = int(fx.expected["eval/stage0/cls_score"].shape[2])
    return DecoderHParams(num_queries=n, num_classes=k, num_stages=fx.num_stages)


@pytest.fixture(scope="module")
def decoder(fx, official_sd, hp):
    torch.manual_seed(0)
    dec = StageInteractorDecoder(num_classes=hp.num_classes, num_queries=hp.num_queries,
                                 num_stages=hp.num_stages, feature_strides=fx.strides)
    ours, _ = decoder_official_to_ours(official_sd, hp)
    result = dec.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return dec


def _hooks(dec, store):
    handles = []
    for s, st in enumerate(dec.stages):
        def mk(name, s=s, first=False):
            def h(_m, _i, o):
                store[(name, s)] = o[0] if first else o
            return h
        handles.append(st.attention_norm.register_forward_hook(mk("attn_out")))
        handles.append(st.mixing.register_forward_hook(mk("mix_out", first=True)))
        handles.append(st.sampler.register_forward_hook(mk("sampled", first=True)))
        handles.append(st.reg_delta.register_forward_hook(mk("box_delta")))
        handles.append(st.ffn_norm.register_forward_hook(mk("object_feats")))
    return handles


@pytest.fixture(scope="module")
def eval_run(fx, decoder):
    store = {}
    handles = _hooks(decoder, store)
    decoder.eval()
    try:
        with torch.no_grad():
            outs = decoder(fx.features(), fx.image_sizes)
    finally:
        for h in handles:
            h.remove()
    return outs, store


@pytest.fixture(scope="module")
def train_run(fx, decoder, hp):
    decoder.train()
    crit = StageInteractorCriterion(
        num_classes=hp.num_classes, matcher=HungarianMatcher(),
        assigner=CrossStageLabelAssigner(num_classes=hp.num_classes),
    )
    outs = decoder(fx.features(), fx.image_sizes)
    losses = crit(outs, fx.gt_boxes, fx.gt_classes, fx.gt_mask, fx.image_sizes)
    decoder.eval()
    return outs, losses, crit


# ------------------------------------------------------------------------------ layout / weights

def test_formula_reproduces_fixture_fingerprints(fx, official_sd):
    """The regenerated weights and feature maps are the fixture's (sums and first values)."""
    sums = json.loads(str(fx.expected["inputs/param_sums_json"]))
    first4 = json.loads(str(fx.expected["inputs/param_first4_json"]))
    assert set(sums) <= set(official_sd)
    for k, ref in sums.items():
        t = official_sd[k]
        assert t.flatten()[:4].tolist() == first4[k], k
        if t.numel() <= 70_000 or k.endswith("bbox_head.0.dynamic_conv.Wv.weight"):
            # exactly rounded sum (math.fsum) of every small tensor and of one big one
            assert math.fsum(t.double().numpy().ravel()) == ref, k
    buf = fx.expected["inputs/buffers/rpn_head.init_proposal_bboxes"]
    assert torch.equal(official_sd["rpn_head.init_proposal_bboxes"], buf)
    for l, f in enumerate(fx.features()):
        assert list(f.shape) == fx.expected[f"inputs/feat{l}/shape"].tolist()
        assert torch.equal(f.flatten()[:8], fx.expected[f"inputs/feat{l}/first8"])
        assert abs(f.double().sum().item() - fx.expected[f"inputs/feat{l}/sum"]) < 1e-6


def test_official_layout_matches_fixture_keys(fx, hp):
    assert list(official_decoder_layout(hp).items()) == fx.keys


def test_every_official_key_accounted_for(fx, official_sd, hp, decoder):
    ours, dropped = decoder_official_to_ours(official_sd, hp)
    assert set(ours) == set(decoder.state_dict())
    covered = set(dropped)
    for m in decoder_key_maps(hp):
        covered.update(m.officials if isinstance(m, FusedMap) else [m.official])
    assert covered == set(official_sd)
    assert all(
        "subbox_score_list" in k or "iou_snyc_statistics" in k or k == "rpn_head.init_proposal_bboxes"
        for k in dropped
    )
    assert sum(v.numel() for v in ours.values()) == sum(
        v.numel() for k, v in official_sd.items() if k not in dropped)


def test_fused_generator_order_follows_decoder_layout(hp, decoder):
    """Our fused per-stage generator: its block order / rows (DecoderStage.generator_layout and
    OFFICIAL_GENERATOR_SOURCES) must be what the converter assumes."""
    from stageinteractor.core.stage import OFFICIAL_GENERATOR_SOURCES

    fused = {m.ours: m for m in decoder_key_maps(hp) if isinstance(m, FusedMap)}
    for s, st in enumerate(decoder.stages):
        m = fused[f"stages.{s}.generator.weight"]
        sources, rows = [], []
        for name, r in st.generator_layout:
            src = OFFICIAL_GENERATOR_SOURCES[name]
            if sources and sources[-1] == src:
                rows[-1] += r
            else:
                sources.append(src)
                rows.append(r)
        assert [k.split(f"bbox_head.{s}.", 1)[1].rsplit(".", 1)[0] for k in m.officials] == sources
        assert [shape[0] // hp.groups for shape in m.shapes] == rows


def test_reverse_conversion_is_bit_exact(official_sd, hp, decoder):
    ours, _ = decoder_official_to_ours(official_sd, hp)
    back = decoder_ours_to_official(decoder.state_dict(), hp)
    assert list(back) == list(official_sd)
    for k, v in official_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert all(not back[k].any() for k in back if "subbox_score_list" in k)


# ------------------------------------------------------------------------------ eval parity

def _record(name, s, err):
    PARITY_MEASURED.setdefault(name, {})[s] = err


def test_initial_queries(fx, decoder):
    with torch.no_grad():
        content, xyzr = decoder.query_generator(fx.image_sizes.float())[:2]
    B, N = xyzr.shape[:2]
    assert (xyzr - fx.expected["eval/init_xyzr"]).abs().max() < 1e-5
    assert (content.view(B, N, -1)[..., :8] - fx.expected["eval/init_content_first8"]).abs().max() < 1e-5


def test_eval_stage_outputs(fx, eval_run):
    outs, store = eval_run
    e = fx.expected
    B, N = outs[0]["logits"].shape[:2]
    failures = []
    for s in range(fx.num_stages):
        ours = {
            "cls_score": outs[s]["logits"],
            "xyzr": outs[s]["xyzr"],
            "boxes": outs[s]["boxes"],
            "box_delta": store[("box_delta", s)].view(B, N, 4),
            "object_feats": store[("object_feats", s)].view(B, N, -1),
            "attn_out": store[("attn_out", s)].view(B, N, -1)[:, :50],
            "mix_out": store[("mix_out", s)].view(B, N, -1)[:, :50],
        }
        sampled = store[("sampled", s)]
        if f"eval/stage{s}/sampled_q0" in e:
            G = e[f"eval/stage{s}/sampled_q0"].shape[1]
            ours["sampled_q0"] = sampled.view(B, N, G, sampled.shape[1], -1)[:, 0]
        for name, t in ours.items():
            err = (t - e[f"eval/stage{s}/{name}"]).abs().max().item()
            _record(name, s, err)
            if not err <= _tol(name, s):
                failures.append(f"stage {s} {name}: max abs err {err:.3g} > {_tol(name, s):g}")
    print("\nPARITY eval max abs error per stage:")
    for name, per in PARITY_MEASURED.items():
        print(f"  {name:12s} " + "  ".join(f"s{s}={v:.2e}" for s, v in sorted(per.items())))
    assert not failures, "\n".join(failures)


def test_eval_detections_as_set(fx, eval_run):
    outs, _ = eval_run
    det = topk_detections(outs[-1]["logits"], outs[-1]["boxes"])
    gap = float(fx.expected["diag/det_top100_boundary_gap"])
    for b in range(det["scores"].shape[0]):
        e_q, e_l = fx.expected[f"eval/det/{b}/query"], fx.expected[f"eval/det/{b}/label"]
        e_s, e_box = fx.expected[f"eval/det/{b}/score"], fx.expected[f"eval/det/{b}/boxes"]
        ours = {(int(q), int(l)): i for i, (q, l) in enumerate(zip(det["query_index"][b], det["labels"][b]))}
        theirs = {(int(q), int(l)): i for i, (q, l) in enumerate(zip(e_q, e_l))}
        # pairs whose score is within the float32 error of the 100th score may swap in/out;
        # scores are ~0.04, where sigmoid' < 0.05: score error <= 0.05 * logit tolerance
        score_err = 0.05 * _tol("cls_score", fx.num_stages - 1)
        kth = float(e_s.min())
        sure = {k for k, i in theirs.items() if float(e_s[i]) > kth + score_err}
        assert sure <= set(ours), f"image {b}: missing {sorted(sure - set(ours))}"
        common = set(ours) & set(theirs)
        assert len(common) >= len(theirs) - sum(1 for v in e_s if float(v) <= kth + score_err)
        for key in common:
            i, j = ours[key], theirs[key]
            assert abs(float(det["scores"][b, i]) - float(e_s[j])) < score_err
            assert (det["boxes"][b, i] - e_box[j]).abs().max() < _tol("boxes", fx.num_stages - 1)
        _record("det_set_equal", b, float(set(ours) == set(theirs)))
        print(f"\nPARITY detections image {b}: (query, label) sets equal: {set(ours) == set(theirs)}, "
              f"{len(common)} common")
    assert gap > 0


# ------------------------------------------------------------------------------ training parity

def test_train_outputs_match_eval(eval_run, train_run):
    """Dropout is 0, so train mode computes the same function (the official code gives equal
    bits; ours may pick another attention kernel under autograd, hence round-off only)."""
    for s, (a, b) in enumerate(zip(eval_run[0], train_run[0])):
        assert (a["logits"] - b["logits"].detach()).abs().max() <= _tol("cls_score", s)
        assert (a["boxes"] - b["boxes"].detach()).abs().max() <= _tol("boxes", s)


def test_train_matches_and_csla_targets_exact(fx, train_run):
    _, _, crit = train_run
    e = fx.expected
    for s in range(fx.num_stages):
        assert torch.equal(crit.last_matches[s], e[f"train/stage{s}/match"]), f"stage {s} matches"
        assert torch.equal(crit.last_targets[s].to(torch.uint8), e[f"train/stage{s}/csla_multihot"]), \
            f"stage {s} CSLA multi-hot"
        n_cls, n_box = crit.last_normalizers[s].tolist()
        assert n_cls == e[f"train/stage{s}/csla_avg_factor_cls"]
        assert n_box == e[f"train/stage{s}/csla_avg_factor_reg"]


def test_train_match_costs_labels_and_box_targets(fx, train_run):
    """Cost matrices (within the round-off of the stage outputs), per-query labels (80 = bg)
    and the boxes entering the L1/GIoU losses (flat order b*N + q)."""
    outs, _, crit = train_run
    e = fx.expected
    K = outs[0]["logits"].shape[-1]
    for s in range(fx.num_stages):
        cost = crit.matcher.cost_matrix(outs[s]["logits"], outs[s]["boxes"], fx.gt_boxes, fx.gt_classes,
                                        fx.image_sizes)
        for b in range(cost.shape[0]):
            ref = e[f"train/stage{s}/match_cost/{b}"]
            err = (cost[b, :, : ref.shape[1]] - ref).abs().max().item()
            _record("match_cost", (s, b), err)
            assert err < 1e-2, (s, b, err)
        match = crit.last_matches[s]
        labels = torch.where(match >= 0, fx.gt_classes.gather(1, match.clamp(min=0)), torch.full_like(match, K))
        assert torch.equal(labels, e[f"train/stage{s}/labels"]), s
        b_idx, q_idx = (match >= 0).nonzero(as_tuple=True)  # row-major = flat order b*N + q
        tgt = fx.gt_boxes[b_idx, match[b_idx, q_idx]]
        assert torch.equal(tgt, e[f"train/stage{s}/reg_targets"]), s
        pred = outs[s]["boxes"].detach()[b_idx, q_idx]
        assert (pred - e[f"train/stage{s}/reg_pred"]).abs().max() <= _tol("boxes", s), s
    per_stage = {}
    for (s, _b), v in PARITY_MEASURED["match_cost"].items():
        per_stage[s] = max(per_stage.get(s, 0.0), v)
    print("\nPARITY train match-cost max abs error: " + "  ".join(f"s{s}={v:.1e}" for s, v in sorted(per_stage.items())))


def test_train_losses(fx, train_run):
    _, losses, _ = train_run
    names = {"cls": "loss_cls", "bbox": "loss_bbox", "giou": "loss_iou"}
    failures = []
    for s in range(fx.num_stages):
        for ours, theirs in names.items():
            ref = float(fx.expected[f"train/loss/stage{s}_{theirs}"])
            rel = abs(losses[f"loss_{ours}_s{s}"].item() - ref) / abs(ref)
            _record(f"rel_loss_{ours}", s, rel)
            if rel > 1e-4:
                failures.append(f"stage {s} loss_{ours}: rel err {rel:.3g}")
    total = sum(v.item() for v in losses.values())
    assert abs(total - float(fx.expected["train/loss_total"])) / float(fx.expected["train/loss_total"]) < 1e-4
    print("\nPARITY train relative loss error per stage:")
    for name in ("rel_loss_cls", "rel_loss_bbox", "rel_loss_giou"):
        print(f"  {name:14s} " + "  ".join(f"s{s}={v:.1e}" for s, v in sorted(PARITY_MEASURED[name].items())))
    assert not failures, "\n".join(failures)

