"""Run one training step of the authors' decoder and record the gradient parity fixture.

Runs in the **authors' Python environment** (their mmdet 2.12 fork, mmcv 1.x; see
``stageinteractor.official.gradient_fixture`` for what is recorded and how): mmcv and mmdet are
imported inside the functions (:mod:`.authors_model`, shared with the timing workers), so this
module imports in either environment.

What is run, on the forward parity fixture's decoder (formula weights loaded into the
``rpn_head`` / ``roi_head`` of ``configs/stageinteractor/stageinteractor_r50_1x_coco.py``, built
with its ``train_cfg``):

1. float32, ``model.train()``: ``rpn_head.forward_train`` + ``roi_head.forward_train`` on the
   fixture's 4 input maps (``requires_grad``) and ground truths; total = sum of the loss dict
   entries whose name contains ``loss`` (mmdet's ``_parse_losses``); ``backward``.
2. Their optimizer step on those gradients: ``mmcv.runner.build_optimizer(model, cfg.optimizer)``,
   the learning rate of iteration 0 of their ``lr_config`` warm-up (mmcv's own
   ``LrUpdaterHook.get_warmup_lr``), their ``OptimizerHook.clip_grads`` (global L2 norm), then
   ``optimizer.step()``.
3. float64: the same weights (float32 values cast up) and inputs, steps 1 again.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch

from stageinteractor.official.authors_model import (
    CONFIG,
    DECODER_HEADS,
    build_authors_detector,
    image_meta,
    import_training_parts,
)
from stageinteractor.official.fixture import OfficialFixture, load_fixture
from stageinteractor.official.gradient_fixture import (
    FORMAT_VERSION,
    feature_name,
    positions,
    record_summaries,
)

__all__ = ["CONFIG", "build_official_model", "image_metas", "training_grads", "optimizer_step",
           "make_fixture"]

DECODER_PREFIXES = tuple(h + "." for h in DECODER_HEADS)


def _log(msg: str) -> None:
    print(f"[gradient_worker] {msg}", file=sys.stderr, flush=True)


def build_official_model(repo: str, sd: Dict[str, torch.Tensor]):
    """(detector, mmcv Config) of the authors' R50-100q config with decoder weights ``sd``
    (``rpn_head.*`` / ``roi_head.*`` official keys).

    Raises:
        SystemExit: when mmcv/mmdet are not importable (not the authors' environment).
        KeyError: when the fixture's decoder keys are not exactly the model's.
    """
    model, cfg = build_authors_detector(repo)
    own = [k for k in model.state_dict() if k.startswith(DECODER_PREFIXES)]
    if set(own) != set(sd):
        raise KeyError(f"decoder keys differ from the fixture's: {sorted(set(own) ^ set(sd))[:5]}")
    model.load_state_dict(sd, strict=False)
    return model, cfg


def image_metas(fx: OfficialFixture) -> List[dict]:
    """mmdet ``img_metas`` of the fixture (README §1 of the forward fixture)."""
    pad = tuple(fx.batch_input_shape)
    return [image_meta(h, w, pad) for h, w in fx.image_sizes.tolist()]


def training_grads(model, fx: OfficialFixture, dtype: torch.dtype):
    """One forward_train + backward in ``dtype``.

    Returns:
        (losses {name: float}, total float, {official key: grad} of the decoder parameters whose
        grad is not None, [grad of input map l], [decoder keys whose grad is None]).
    """
    model.to(dtype)
    model.train()
    model.zero_grad(set_to_none=True)
    feats = [f.to(dtype).requires_grad_() for f in fx.features()]
    B = len(feats[0])
    gt_boxes = [fx.expected[f"inputs/gt_bboxes/{b}"].to(dtype) for b in range(B)]
    gt_labels = [fx.expected[f"inputs/gt_labels/{b}"].long() for b in range(B)]
    metas = image_metas(fx)
    xyzr, content, whwh = model.rpn_head.forward_train(feats, metas)
    losses = model.roi_head.forward_train(feats, xyzr, content, metas, gt_boxes, gt_labels,
                                          gt_bboxes_ignore=None, gt_masks=None, imgs_whwh=whwh)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    grads, none = {}, []
    for k, p in model.named_parameters():
        if k.startswith(DECODER_PREFIXES):
            if p.grad is None:
                none.append(k)
            else:
                grads[k] = p.grad.detach().clone()
    loss_floats = {k: float(v) for k, v in losses.items()}
    return loss_floats, float(total), grads, [f.grad.detach().clone() for f in feats], none


def optimizer_step(model, cfg) -> Tuple[float, Dict[str, object]]:
    """Their clipped AdamW step at the first warm-up iteration, on the gradients in ``.grad``.

    Returns ``(clip norm, optimizer settings)``."""
    build_optimizer, OptimizerHook, StepLrUpdaterHook = import_training_parts()
    optimizer = build_optimizer(model, cfg.optimizer)
    lr_cfg = {k: v for k, v in cfg.lr_config.items() if k != "policy"}
    if cfg.lr_config.get("policy") != "step":
        raise ValueError(f"expected the step lr policy, got {cfg.lr_config.get('policy')!r}")
    lr_hook = StepLrUpdaterHook(by_epoch=True, **lr_cfg)
    lr_hook.regular_lr = [g["lr"] for g in optimizer.param_groups]
    warm = lr_hook.get_warmup_lr(0)
    for g, lr in zip(optimizer.param_groups, warm):
        g["lr"] = lr
    opt_hook = OptimizerHook(grad_clip=dict(cfg.optimizer_config.grad_clip))
    norm = opt_hook.clip_grads(model.parameters())
    optimizer.step()
    groups = optimizer.param_groups
    if len(groups) != 1:
        raise ValueError(f"expected one param group (no paramwise_cfg), got {len(groups)}")
    g, clip = groups[0], cfg.optimizer_config.grad_clip
    settings = dict(type=type(optimizer).__name__, lr=g["lr"], base_lr=lr_hook.regular_lr[0],
                    betas=list(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
                    amsgrad=g["amsgrad"], max_norm=float(clip["max_norm"]),
                    norm_type=float(clip["norm_type"]),
                    warmup=lr_cfg.get("warmup"), warmup_iters=lr_cfg.get("warmup_iters"),
                    warmup_ratio=lr_cfg.get("warmup_ratio"), iteration=0)
    return float(norm), settings


def _commit(repo: str) -> str:
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_fixture(repo: str, forward_fixture_dir: str) -> Dict[str, object]:
    """The fixture dict (``expected.pt``): float32 step + optimizer step + float64 step."""
    fx = load_fixture(forward_fixture_dir)
    A = fx.rules.A
    sd = fx.official_state_dict()
    model, cfg = build_official_model(repo, sd)
    out: Dict[str, object] = {}
    t0 = time.perf_counter()
    loss32, total32, g32, f32, none32 = training_grads(model, fx, torch.float32)
    _log(f"float32 step: total {total32:.6f} ({time.perf_counter() - t0:.1f} s)")
    names = list(g32) + [feature_name(l) for l in range(len(f32))]
    g32.update({feature_name(l): g for l, g in enumerate(f32)})
    record_summaries(out, "32", g32, A)

    norm, settings = optimizer_step(model, cfg)
    for k, p in model.named_parameters():
        if k in g32:
            pos = torch.from_numpy(positions(k, p.numel()))
            out[f"step/{k}/after"] = p.detach().reshape(-1)[pos].clone()
    out["step/clip_norm"] = norm
    _log(f"optimizer step: clip norm {norm:.6f}, lr {settings['lr']:.6g}")

    model.load_state_dict(sd, strict=False)  # undo the step
    t0 = time.perf_counter()
    loss64, total64, g64, f64, none64 = training_grads(model, fx, torch.float64)
    _log(f"float64 step: total {total64:.12f} ({time.perf_counter() - t0:.1f} s)")
    g64.update({feature_name(l): g for l, g in enumerate(f64)})
    if set(g64) != set(g32) or none32 != none64:
        raise RuntimeError("float32 and float64 runs give gradients to different parameters")
    record_summaries(out, "64", g64, A)
    for name in names:
        out[f"floor/{name}"] = float(torch.linalg.vector_norm(g32[name].double() - g64[name]))

    zero = [k for k in names if not g32[k].any()]
    out.update({
        "meta/format_version": FORMAT_VERSION,
        "meta/A": A,
        "meta/names_json": json.dumps(names),
        "meta/zero_grad_json": json.dumps(zero),
        "meta/none_grad_json": json.dumps(none32),
        "meta/optimizer_json": json.dumps(settings),
        "meta/config": CONFIG,
        "meta/official_commit": _commit(repo),
        "meta/generated_with_torch": str(torch.__version__),
        "meta/forward_fixture_loss_total": float(fx.expected["train/loss_total"]),
        "loss32/total": total32,
        "loss64/total": total64,
        "loss32/json": json.dumps(loss32),
        "loss64/json": json.dumps(loss64),
    })
    return out
