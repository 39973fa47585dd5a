"""Gradient parity with the authors' StageInteractor code: one training step (issue 23).

Fixture: ``tests/fixtures/official_gradient_parity`` (README there), written by
``tools/make_official_gradient_fixture.py`` running the authors' code on the forward parity
fixture's weights, inputs and ground truths: the gradient of their total training loss with
respect to every decoder parameter (official keys) and the four input maps, in float32 and
float64, as summaries (norm, probe dot product, 32 entries), and one clipped AdamW step.

Our decoder + criterion run the same step (float32; float64 in the slow tests, weights and
inputs the same float32 values cast up); our gradients are put into the official layout
(``decoder_ours_to_official`` splits the fused generator blocks) and summarised the same way.

Tolerances, per key, from a float32 floor F = ||g32 - g64||_2 (relative r = F / ||g||):

* the slow tests derive F from **our own** float32 vs float64 gradients, run here, plus the
  authors' (the difference of two float32 results carries both round-offs);
* the fast tests take F from the fixture (the authors' own float32 error), at least 1e-4 of
  the gradient norm: ``test_our_floor_is_not_larger_than_the_authors`` (slow) checks that ours
  is at most 4x theirs or below that 1e-4 (measured, ours / theirs per key: median 1.13,
  0.44 .. 69; the 69 is stage 3's classification branch, 1.9e-5 relative for us, 2.8e-7 for
  them).

With C = FLOOR_FACTOR = 4 (the authors' float32 error is another draw of the same size): norm
within C F; probe within 5 C F rms(probe) (5 sigma of a random probe against an error vector
of norm C F); entry i within E max(entry floor_i, r max|g|), the entry floor being our
|g32_i - g64_i| plus theirs (slow, E = C) or twice theirs (fast, E = ENTRY_FACTOR_FAST = 16:
entries of the sampling-offset generators are heavy-tailed, measured up to 9.3x). At stages
4-5 the floor of the sampling-offset generators (gen_one_d / gen_double_d) is ~1 % of the
gradient norm and single entries differ by up to ~5 % of the key's largest entry.

The AdamW step (fast): the clip norm within C sqrt(sum F^2); each recorded parameter after the
step within 2 ulp + lr x (the change of Adam's first-step direction g / (|g| + eps) over the
entry's gradient tolerance).

``GRAD_MEASURED`` (printed with ``pytest -s``) holds the per-stage maxima.
"""
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from stageinteractor.core import (
    CrossStageLabelAssigner,
    HungarianMatcher,
    StageInteractorCriterion,
    StageInteractorDecoder,
)
from stageinteractor.official.layout import (
    DecoderHParams,
    decoder_official_to_ours,
    decoder_ours_to_official,
)
from stageinteractor.official.fixture import find_parity_fixture, load_fixture
from stageinteractor.official.gradient_fixture import (
    feature_name,
    find_gradient_fixture,
    load_gradient_fixture,
    summarize,
)

FORWARD_DIR = find_parity_fixture()
GRAD_DIR = find_gradient_fixture()
pytestmark = pytest.mark.skipif(FORWARD_DIR is None or GRAD_DIR is None,
                                reason="official parity fixtures not found")

FLOOR_FACTOR = 4.0
# fast tests, entries: no per-entry floor of ours is known there, and the sampling-offset
# generators' entries are heavy-tailed (measured: an entry of ours can differ from theirs by 9.3x
# their key-wide relative floor, stage 1 gen_double_d); 16 leaves a margin
ENTRY_FACTOR_FAST = 16.0
REL_MIN = 1e-4  # fast tests: smallest relative floor (our float32 floor can be 70x theirs below it)
ABS_MIN = 1e-10  # and smallest absolute one (stage 0's iof_tau, below)
# stage 0's iof_tau: the IoF bias is constant at stage 0 (all boxes are the full image), and a
# constant logit shift has no softmax gradient, so its gradient is round-off (~1e-22)
ZERO_GRAD = 1e-12
GRAD_MEASURED = {}


@pytest.fixture(scope="module")
def fx():
    return load_fixture(FORWARD_DIR)


@pytest.fixture(scope="module")
def gfx():
    return load_gradient_fixture(GRAD_DIR)


@pytest.fixture(scope="module")
def hp(fx):
    n = int(fx.expected["eval/init_xyzr"].shape[1])
    k = int(fx.expected["eval/stage0/cls_score"].shape[2])
    return DecoderHParams(num_queries=n, num_classes=k, num_stages=fx.num_stages)


def _step(fx, hp, ours_sd, dtype):
    """Our decoder + criterion, one forward/backward in ``dtype``: (decoder, official-layout
    grads incl. ``feat{l}``, total loss, names of parameters left without a gradient)."""
    torch.manual_seed(0)
    dec = StageInteractorDecoder(num_classes=hp.num_classes, num_queries=hp.num_queries,
                                 num_stages=hp.num_stages, feature_strides=fx.strides)
    dec.load_state_dict(ours_sd, strict=True)
    dec.to(dtype).train()
    crit = StageInteractorCriterion(num_classes=hp.num_classes, matcher=HungarianMatcher(),
                                    assigner=CrossStageLabelAssigner(num_classes=hp.num_classes))
    feats = [f.to(dtype).requires_grad_() for f in fx.features()]
    outs = dec(feats, fx.image_sizes)
    losses = crit(outs, fx.gt_boxes.to(dtype), fx.gt_classes, fx.gt_mask, fx.image_sizes)
    total = sum(losses.values())
    total.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None]
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in dec.named_parameters()}
    official = dict(decoder_ours_to_official(grads, hp))  # may share storage with p.grad
    official.update({feature_name(l): f.grad for l, f in enumerate(feats)})
    return dec, official, float(total.detach()), missing


@pytest.fixture(scope="module")
def run32(fx, hp):
    official_sd = fx.official_state_dict()
    ours_sd, dropped = decoder_official_to_ours(official_sd, hp)
    dec, g32, total32, missing = _step(fx, hp, ours_sd, torch.float32)
    return dict(dec=dec, official_sd=official_sd, dropped=dropped, g32=g32, total32=total32,
                missing=missing)


@pytest.fixture(scope="module")
def run64(fx, hp, run32):
    ours_sd, _ = decoder_official_to_ours(run32["official_sd"], hp)
    _, g64, total64, missing = _step(fx, hp, ours_sd, torch.float64)
    del ours_sd
    assert missing == []
    return dict(g64=g64, total64=total64)


def _authors_floors(gfx):
    """name -> (F, r, entry floor, entry factor) from the authors' float32 error (fast tests):
    F = max(their ||g32 - g64||, REL_MIN ||g||, ABS_MIN), r = F / ||g||, entry floor = twice
    their |g32_i - g64_i| (ours is another draw of the same size), ENTRY_FACTOR_FAST."""
    out = {}
    for name in gfx.names:
        norm = float(gfx.summary("64", name)["norm"])
        F = max(gfx.floor(name), REL_MIN * norm, ABS_MIN)
        out[name] = (F, F / max(norm, 1e-300), 2 * gfx.floor_values(name), ENTRY_FACTOR_FAST)
    return out


def _our_floors(gfx, run32, run64):
    """name -> (F, r, entry floor, entry factor) from OUR float32 error (slow tests):
    F = ||g32 - g64||_2 (ours) + the authors' (both float32 results carry round-off, as in
    the entry floor: with ours alone, a key where our float32 happens to land on the float64
    value within 0.05 ulp, stage 0's fc_cls.bias with oneDNN products, gets a tolerance below
    the authors' own error), r = F / ||g64||, entry floor = |g32_i - g64_i| (ours) + the
    authors' at that entry, FLOOR_FACTOR."""
    out = {}
    for name in gfx.names:
        a, b = run32["g32"][name].double(), run64["g64"][name]
        pos = gfx.expected[f"pos/{name}"]
        F = max(float(torch.linalg.vector_norm(a - b)) + gfx.floor(name), ABS_MIN)
        F_pos = (a.reshape(-1)[pos] - b.reshape(-1)[pos]).abs() + gfx.floor_values(name)
        out[name] = (F, F / max(float(torch.linalg.vector_norm(b)), 1e-300), F_pos, FLOOR_FACTOR)
    return out


def _stage(name):
    if name.startswith("roi_head.bbox_head."):
        return int(name.split(".")[2])
    return "in" if name.startswith("feat") else "q"  # input maps / query generator


def _compare(gfx, grads, floors, precision):
    """Failures of our gradients ``grads`` against the authors' ``precision`` ones, and per
    stage the largest |ours - theirs| / max|theirs| over the stored entries (keys with a
    structurally zero gradient left out of that report). Per key, with (F, r, entry floor, E)
    of ``floors`` and C = FLOOR_FACTOR: norm within C F; probe within 5 C F rms(probe) (5 sigma
    of a random probe against an error of norm C F); entry i within E max(entry floor_i,
    r max|g|)."""
    C = FLOOR_FACTOR
    failures, worst = [], defaultdict(float)
    for name in gfx.names:
        ref = gfx.summary(precision, name)
        s = summarize(name, grads[name], gfx.A)
        F, r, F_pos, E = floors[name]
        if abs(s["norm"] - ref["norm"]) > C * F:
            failures.append(f"{name} norm {s['norm']:.6g} vs {ref['norm']:.6g} (tol {C * F:.3g})")
        if abs(s["probe"] - ref["probe"]) > 5 * C * F * s["probe_rms"]:
            failures.append(f"{name} probe {s['probe']:.6g} vs {ref['probe']:.6g} "
                            f"(tol {5 * C * F * s['probe_rms']:.3g})")
        scale = float(gfx.summary("64", name)["values"].abs().max())
        err = (s["values"].double() - ref["values"].double()).abs()
        tol = E * torch.clamp(F_pos, min=r * scale)
        if (err > tol).any():
            i = int((err - tol).argmax())
            failures.append(f"{name} entry {int(ref['pos'][i])}: {float(s['values'][i]):.6g} vs "
                            f"{float(ref['values'][i]):.6g} (tol {float(tol[i]):.3g})")
        if float(gfx.summary("64", name)["norm"]) > ZERO_GRAD:
            worst[_stage(name)] = max(worst[_stage(name)], float(err.max()) / scale)
    return failures, worst


def _print(title, per_stage):
    items = sorted(per_stage.items(), key=lambda kv: str(kv[0]))
    print(f"\nGRAD {title}: " + "  ".join(f"{k}={v:.2e}" for k, v in items))


def _fail(failures):
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} in all)"


# ------------------------------------------------------------------------------ which parameters

def test_every_parameter_with_a_gradient_has_one_in_ours_and_no_other(gfx, run32):
    """The authors' decoder parameters with a gradient (all of them; the dead
    ``subbox_score_list`` layers get an identically zero one) are exactly the official keys of
    our parameters plus those dead layers, which we do not have; every parameter of ours gets
    a non-zero gradient."""
    assert json.loads(str(gfx.expected["meta/none_grad_json"])) == []
    assert run32["missing"] == []
    theirs = {n for n in gfx.names if not n.startswith("feat")}
    params = {k for k in run32["official_sd"]
              if "iou_snyc_statistics" not in k and k != "rpn_head.init_proposal_bboxes"}
    assert theirs == params  # every decoder parameter of theirs has a gradient
    dropped = {k for k in run32["dropped"] if k in theirs}
    assert dropped == set(gfx.zero_grad), "dead layers = the authors' zero-gradient keys"
    assert all("subbox_score_list" in k for k in gfx.zero_grad)
    assert {k for k in theirs - dropped if run32["g32"][k].any()} == theirs - dropped
    for k in dropped:  # our converted gradient of a dead key is the exported zero fill
        assert not run32["g32"][k].any()
    for n, p in run32["dec"].named_parameters():
        assert p.grad is not None and p.grad.any(), n


# ------------------------------------------------------------------------------ float32 (fast)

def test_float32_loss_and_gradients_match(gfx, run32):
    """Fast check: tolerances from the authors' float32 floor (the slow test below derives
    them from ours and checks that ours is not larger)."""
    ref_total = float(gfx.expected["loss32/total"])
    assert abs(run32["total32"] - ref_total) <= 1e-5 * abs(ref_total)
    failures, worst = _compare(gfx, run32["g32"], _authors_floors(gfx), "32")
    GRAD_MEASURED["float32_diff"] = dict(worst)
    _print("float32 ours vs authors, max |diff| / max |g| per stage", worst)
    _fail(failures)


def test_clipped_adamw_step_matches(gfx, run32, hp):
    """Their optimizer step (fixture meta: AdamW, lr of warm-up iteration 0, weight decay,
    global-norm clipping) on our gradients: the clip norm and every recorded parameter."""
    floors = _authors_floors(gfx)
    dec = run32["dec"]
    params = [p for p in dec.parameters() if p.grad is not None]
    for p in params:  # the recorded gradients (which may share these tensors) stay unclipped
        p.grad = p.grad.clone()
    opt = torch.optim.AdamW(params, lr=gfx.lr, betas=gfx.betas, eps=gfx.eps,
                            weight_decay=gfx.weight_decay)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=gfx.max_norm, norm_type=2.0))
    ref_norm = float(gfx.expected["step/clip_norm"])
    tol_norm = FLOOR_FACTOR * math.sqrt(sum(f[0] ** 2 for n, f in floors.items()
                                            if not n.startswith("feat")))
    assert abs(norm - ref_norm) <= tol_norm, (norm, ref_norm, tol_norm)
    opt.step()
    after = decoder_ours_to_official({n: p.detach() for n, p in dec.named_parameters()}, hp)
    before = run32["official_sd"]
    clip = gfx.max_norm / max(ref_norm, gfx.max_norm)
    moved, failures = 0, []
    for name in gfx.names:
        if name.startswith("feat") or name in gfx.zero_grad:
            continue
        pos = gfx.expected[f"pos/{name}"]
        ref_after = gfx.expected[f"step/{name}/after"].double()
        got = after[name].reshape(-1)[pos].double()
        # Adam's first step moves p by -lr (g / (|g| + eps) + wd p), g the clipped gradient: the
        # direction's change over the gradient tolerance, times lr, plus 2 ulp of rounding
        F, r, F_pos, E = floors[name]
        g_ref = gfx.expected[f"grad32/{name}/values"].double() * clip
        scale = float(gfx.summary("64", name)["values"].abs().max())
        dg = E * torch.clamp(F_pos, min=r * scale) * clip
        f = lambda x: x / (x.abs() + gfx.eps)  # noqa: E731
        direction_tol = torch.maximum((f(g_ref + dg) - f(g_ref)).abs(),
                                      (f(g_ref) - f(g_ref - dg)).abs())
        ulp = torch.from_numpy(np.spacing(np.abs(ref_after.float().numpy())).astype(np.float64))
        tol = 2 * ulp + gfx.lr * direction_tol
        err = (got - ref_after).abs()
        moved += int((ref_after != before[name].reshape(-1)[pos].double()).sum())
        if (err > tol).any():
            i = int((err - tol).argmax())
            failures.append(f"{name} entry {int(pos[i])}: {float(got[i]):.9g} vs "
                            f"{float(ref_after[i]):.9g} "
                            f"(tol {float(tol[i]):.3g})")
    _fail(failures)
    assert moved > 1000  # the step is visible at float32 resolution for most entries


# ------------------------------------------------------------------------------ slow: our own floor

@pytest.mark.slow
def test_float32_gradients_match_at_our_own_float32_floor(gfx, run32, run64):
    """The tolerance derived from our own float32 vs float64 gradients (module doc)."""
    floors = _our_floors(gfx, run32, run64)
    failures, worst = _compare(gfx, run32["g32"], floors, "32")
    floor = defaultdict(float)
    for name in gfx.names:
        if float(gfx.summary("64", name)["norm"]) > ZERO_GRAD:
            a = run32["g32"][name].reshape(-1)[gfx.expected[f"pos/{name}"]].double()
            b = run64["g64"][name].reshape(-1)[gfx.expected[f"pos/{name}"]]
            scale = float(gfx.summary("64", name)["values"].abs().max())
            floor[_stage(name)] = max(floor[_stage(name)], float((a - b).abs().max()) / scale)
    GRAD_MEASURED["float32_diff"], GRAD_MEASURED["float32_floor"] = dict(worst), dict(floor)
    _print("float32 ours vs authors, max |diff| / max |g| per stage", worst)
    _print("float32 ours vs our float64 (our floor), same metric", floor)
    _fail(failures)


@pytest.mark.slow
def test_float64_loss_and_gradients_match(gfx, run32, run64):
    """Their float64 run keeps float32 islands (the position encoding's frequencies come from a
    float32 arange/pow, their focal loss computes its positive terms in float32), which the
    chaotic sampling amplifies like float32 round-off: same tolerances, less noise."""
    ref_total = float(gfx.expected["loss64/total"])
    assert abs(run64["total64"] - ref_total) <= 1e-5 * abs(ref_total)
    failures, worst = _compare(gfx, run64["g64"], _our_floors(gfx, run32, run64), "64")
    GRAD_MEASURED["float64_diff"] = dict(worst)
    _print("float64 ours vs authors, max |diff| / max |g| per stage", worst)
    _fail(failures)


@pytest.mark.slow
def test_our_floor_is_not_larger_than_the_authors(gfx, run32, run64):
    """Our float32 round-off is at most FLOOR_FACTOR x theirs, or below REL_MIN of the
    gradient: a float32-only bug in one of our kernels would inflate our floor (and the slow
    tolerances with it), and the fast tests' use of their floor rests on this."""
    ratios, bad = {}, {}
    for n in gfx.names:
        norm = float(torch.linalg.vector_norm(run64["g64"][n]))
        if norm <= ZERO_GRAD:
            continue
        F = float(torch.linalg.vector_norm(run32["g32"][n].double() - run64["g64"][n]))
        ratios[n] = F / max(gfx.floor(n), 1e-300)
        if F > FLOOR_FACTOR * max(gfx.floor(n), REL_MIN * norm):
            bad[n] = (F / norm, gfx.floor(n) / norm)
    v = sorted(ratios.values())
    GRAD_MEASURED["floor_ratio_ours_theirs"] = (v[0], v[len(v) // 2], v[-1])
    print(f"\nGRAD our floor / their floor per key: min {v[0]:.2f} median {v[len(v) // 2]:.2f} "
          f"max {v[-1]:.2f}")
    assert not bad, bad
