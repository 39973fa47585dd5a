"""CSLA's extra cost on the CPU, for detrex's DINO (``tools/bench_csla_detrex.py``).

CSLA on vs off on the *same* criterion object (``csla_enabled=False`` runs detrex's parent
criterion exactly), interleaved off/on, medians (:func:`~.timing.on_off`):

* :func:`bench_tiny_step`: one full training step (forward, backward, AdamW step) of a tiny DINO
  built from ``projects/csla/configs/dino_r50_4scale_12ep_csla.py`` with ``shrink_model_cfg``;
* :func:`bench_criterion`: the criterion alone at DINO-R50 scale (900 queries, 80 classes, 6
  decoder stages + encoder + 100 dn queries per group, batch 2, 20 objects per image), forward +
  backward; with ``free_matcher`` the Hungarian matcher is replaced by a table of matches
  computed once, so the difference is CSLA's own work (packing, IoU, multi-hot targets).

Needs detrex (imported inside the functions).
"""

import os
from typing import Any, Dict, List

from .timing import on_off

__all__ = ["CSLA_DINO_CONFIG", "bench_tiny_step", "dino_like_outputs", "bench_criterion", "bench"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSLA_DINO_CONFIG = os.path.join(_REPO, "projects/csla/configs/dino_r50_4scale_12ep_csla.py")


def bench_tiny_step(repeats: int = 30) -> Dict[str, float]:
    """Median training-step time of a tiny DINO (from our transfer config), CSLA on vs off."""
    import torch
    from detectron2.config import LazyConfig, instantiate

    from stageinteractor.detrex_ext.tiny import shrink_model_cfg, tiny_batch

    cfg = LazyConfig.load(CSLA_DINO_CONFIG)
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

    return on_off(set_enabled, step, repeats)


def dino_like_outputs(queries: int, classes: int, stages: int, batch: int, objects: int,
                      seed: int = 0):
    """(outputs, targets, dn_meta) shaped like DINO's: ``stages`` decoder outputs (last + aux)
    and the encoder's, logits (batch, queries, classes) and cxcywh boxes requiring grad; targets
    of ``objects`` boxes each; denoising groups of 2 * objects queries (100 dn queries)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def boxes(*shape):
        return torch.cat([0.2 + 0.6 * torch.rand(*shape, 2, generator=gen),
                          0.05 + 0.3 * torch.rand(*shape, 2, generator=gen)], -1)

    def rand_stage(q):
        logits = torch.randn(batch, q, classes, generator=gen)
        return {"pred_logits": logits.requires_grad_(),
                "pred_boxes": boxes(batch, q).requires_grad_()}

    def rand_decoder(q):
        outs = [rand_stage(q) for _ in range(stages)]
        return dict(outs[-1], aux_outputs=outs[:-1])

    outputs = rand_decoder(queries)
    outputs["enc_outputs"] = rand_stage(queries)
    targets = [{"labels": torch.randint(0, classes, (objects,), generator=gen),
                "boxes": boxes(objects)} for _ in range(batch)]
    dn_num = max(100 // objects, 1)
    dn_meta = {"output_known_lbs_bboxes": rand_decoder(2 * objects * dn_num), "dn_num": dn_num,
               "single_padding": 2 * objects}
    return outputs, targets, dn_meta


def _precomputed_matcher(crit, outputs, targets) -> None:
    """Replace the criterion's Hungarian matcher by a table of its matches, computed once."""
    import torch

    hungarian = crit.matcher.inner
    stage_dicts = [*outputs["aux_outputs"], outputs, outputs["enc_outputs"]]
    table: List[Any] = [(st["pred_logits"], hungarian(st, targets)) for st in stage_dicts]

    class _Precomputed(torch.nn.Module):
        def forward(self, outs, tgts):
            return next(ind for logits, ind in table if logits is outs["pred_logits"])

    crit.matcher.inner = _Precomputed()


def bench_criterion(repeats: int = 30, queries: int = 900, classes: int = 80, stages: int = 6,
                    batch: int = 2, objects: int = 20,
                    free_matcher: bool = False) -> Dict[str, float]:
    """Median DINO criterion forward+backward at R50 scale, CSLA on vs off (``free_matcher``:
    matches precomputed once, so only CSLA's own work differs)."""
    from detrex.modeling.matcher import HungarianMatcher

    from stageinteractor.detrex_ext.criteria import CSLADINOCriterion

    outputs, targets, dn_meta = dino_like_outputs(queries, classes, stages, batch, objects)
    crit = CSLADINOCriterion(
        num_classes=classes,
        matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                 cost_class_type="focal_loss_cost", alpha=0.25, gamma=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )
    if free_matcher:
        _precomputed_matcher(crit, outputs, targets)

    def run():
        sum(crit(outputs, targets, dn_meta).values()).backward()

    def set_enabled(flag):
        crit.csla_enabled = flag

    return on_off(set_enabled, run, repeats)


def bench(repeats: int = 30, threads: int = 1) -> Dict[str, Any]:
    """All three measurements; ``threads``: torch intra-op threads (1 = stable on shared CPUs)."""
    import torch

    torch.set_num_threads(threads)
    return {
        "threads": threads,
        "tiny_dino_step": bench_tiny_step(repeats),
        "dino_r50_criterion": bench_criterion(repeats),
        "dino_r50_criterion_free_matcher": bench_criterion(repeats, free_matcher=True),
    }
