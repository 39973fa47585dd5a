#!/usr/bin/env python3
"""CSLA's extra cost on the CPU, for detrex's DINO.

Two measurements, CSLA on vs off on the *same* criterion object (``csla_enabled=False`` runs
detrex's parent criterion exactly), interleaved on/off, medians over ``--repeats``:

1. ``step``: one full training step (forward, backward, AdamW step) of a tiny DINO built from
   ``projects/csla/configs/dino_r50_4scale_12ep_csla.py`` with :func:`shrink_model_cfg`.
2. ``criterion``: the criterion alone at DINO-R50 scale (900 queries, 80 classes, 6 decoder
   stages + encoder + 100 dn queries per group, batch 2, 20 objects per image), forward + backward.
3. ``criterion_free_matcher``: as 2, but the Hungarian matcher is replaced by a stub returning
   precomputed matches, so the difference is CSLA's own work (packing, IoU, multi-hot targets).

Usage::

    python tools/bench_csla_detrex.py [--repeats 30] [--threads 1] [--json out.json]

or from Python: ``from tools.bench_csla_detrex import bench; bench(repeats=30)`` (returns a dict).
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from stageinteractor.requirements import require  # noqa: E402

require("tools/bench_csla_detrex.py", "detectron2", "detrex", "projects")


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _on_off(
    set_enabled: Callable[[bool], None], run: Callable[[], None], repeats: int, warmup: int = 2
):
    times: Dict[bool, List[float]] = {True: [], False: []}
    for i in range(warmup + repeats):
        for enabled in (False, True):
            set_enabled(enabled)
            dt = _time(run)
            if i >= warmup:
                times[enabled].append(dt)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {
        "off_ms": 1e3 * off,
        "on_ms": 1e3 * on,
        "extra_ms": 1e3 * (on - off),
        "extra_pct": 100.0 * (on - off) / off,
        "repeats": repeats,
    }


def bench_tiny_step(repeats: int = 30) -> Dict[str, float]:
    """Median training-step time of a tiny DINO (from our transfer config), CSLA on vs off."""
    from detectron2.config import LazyConfig, instantiate

    from stageinteractor.detrex_ext.tiny import shrink_model_cfg, tiny_batch

    cfg = LazyConfig.load(os.path.join(REPO, "projects/csla/configs/dino_r50_4scale_12ep_csla.py"))
    torch.manual_seed(0)
    model = instantiate(shrink_model_cfg(cfg.model))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = tiny_batch()

    def step():
        torch.manual_seed(1)
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def set_enabled(flag):
        model.criterion.csla_enabled = flag

    return _on_off(set_enabled, step, repeats)


def bench_criterion(
    repeats: int = 30,
    queries: int = 900,
    classes: int = 80,
    stages: int = 6,
    batch: int = 2,
    objects: int = 20,
    free_matcher: bool = False,
) -> Dict[str, float]:
    """Median DINO criterion forward+backward at R50 scale, CSLA on vs off (``free_matcher``:
    matches precomputed once, so only CSLA's own work differs)."""
    from detrex.modeling.matcher import HungarianMatcher

    from stageinteractor.detrex_ext.criteria import CSLADINOCriterion

    gen = torch.Generator().manual_seed(0)

    def rand_stage(q):
        logits = torch.randn(batch, q, classes, generator=gen)
        boxes = torch.cat(
            [
                0.2 + 0.6 * torch.rand(batch, q, 2, generator=gen),
                0.05 + 0.3 * torch.rand(batch, q, 2, generator=gen),
            ],
            -1,
        )
        return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}

    def rand_decoder(q):
        outs = [rand_stage(q) for _ in range(stages)]
        return dict(outs[-1], aux_outputs=outs[:-1])

    outputs = rand_decoder(queries)
    outputs["enc_outputs"] = rand_stage(queries)
    targets = [
        {
            "labels": torch.randint(0, classes, (objects,), generator=gen),
            "boxes": torch.cat(
                [
                    0.2 + 0.6 * torch.rand(objects, 2, generator=gen),
                    0.05 + 0.3 * torch.rand(objects, 2, generator=gen),
                ],
                1,
            ),
        }
        for _ in range(batch)
    ]
    dn_num = max(100 // objects, 1)
    dn_meta = {
        "output_known_lbs_bboxes": rand_decoder(2 * objects * dn_num),
        "dn_num": dn_num,
        "single_padding": 2 * objects,
    }
    crit = CSLADINOCriterion(
        num_classes=classes,
        matcher=HungarianMatcher(
            cost_class=2.0,
            cost_bbox=5.0,
            cost_giou=2.0,
            cost_class_type="focal_loss_cost",
            alpha=0.25,
            gamma=2.0,
        ),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )

    if free_matcher:
        hungarian = crit.matcher.inner
        stage_dicts = [*outputs["aux_outputs"], outputs, outputs["enc_outputs"]]
        table = [(st["pred_logits"], hungarian(st, targets)) for st in stage_dicts]

        class _Precomputed(torch.nn.Module):
            def forward(self, outs, tgts):
                return next(ind for logits, ind in table if logits is outs["pred_logits"])

        crit.matcher.inner = _Precomputed()

    def run():
        sum(crit(outputs, targets, dn_meta).values()).backward()

    def set_enabled(flag):
        crit.csla_enabled = flag

    return _on_off(set_enabled, run, repeats)


def bench(repeats: int = 30, threads: int = 1) -> Dict[str, Dict[str, float]]:
    """All three measurements; ``threads``: torch intra-op threads (1 = stable on shared CPUs)."""
    torch.set_num_threads(threads)
    return {
        "threads": threads,
        "tiny_dino_step": bench_tiny_step(repeats),
        "dino_r50_criterion": bench_criterion(repeats),
        "dino_r50_criterion_free_matcher": bench_criterion(repeats, free_matcher=True),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = bench(args.repeats, args.threads)
    for name in ("tiny_dino_step", "dino_r50_criterion", "dino_r50_criterion_free_matcher"):
        r = result[name]
        print(
            f"{name:32s} off {r['off_ms']:8.1f} ms  on {r['on_ms']:8.1f} ms  "
            f"extra {r['extra_ms']:+7.1f} ms ({r['extra_pct']:+.1f}%)  median of {r['repeats']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
