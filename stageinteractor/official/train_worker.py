"""The authors' training step as a same-run timing reference (issue 23 item 5): a persistent
worker, and its memory measurement.

Runs in the **authors' Python environment** (their mmdet 2.12 fork;
``scripts/build_official_env.py`` builds one), never in ours; imports only the standard library
and :mod:`.authors_model` / :mod:`stageinteractor.process_memory` (standard library only) at
the top (torch, mmcv and mmdet inside the functions), so the file runs there by its path::

    PY stageinteractor/official/train_worker.py --repo DIR --size H W --batch B
        [--threads T] [--seed S] [--memory]

Model: ``configs/stageinteractor/stageinteractor_r50_1x_coco.py`` of their repository with its
``train_cfg``, random weights (their initialisation, then ``+ 0.02 * N(0, 1)`` on every
``rpn_head``/``roi_head`` parameter, as the inference reference), ``model.train()``. Batch: B
random N(0, 1) images of H x W (already normalised, as their pipeline's output), 8 ground-truth
boxes each drawn like ``stageinteractor.benchmark.models.make_batch`` (corner uniform in 70 % of
the image, sides 5-30 % of it), labels uniform in [0, 80).

One step (the ``train`` command, timed inside the worker): ``forward_train`` (backbone, neck,
their query generator and 6 stages with losses), total = sum of the loss entries whose name
holds ``loss`` (mmdet's ``_parse_losses``), ``zero_grad``, ``backward``, their
``OptimizerHook.clip_grads`` (global L2 norm, max 1.0 from their ``optimizer_config``) and their
AdamW step (``mmcv.runner.build_optimizer`` of their ``optimizer``: lr 2.5e-5, weight decay
1e-4).

Protocol (the inference worker's, :mod:`stageinteractor.official.reference_client`): start-up
``{"ready": true, "torch", "threads", "size", "batch"}``; ``train`` -> ``{"wall_s", "cpu_s"}``;
``quit`` -> ``{"bye": true}``; failures -> ``{"error"}`` (:func:`.authors_model.serve`).
``--memory``: no protocol; builds the model, runs two steps and prints one line
``MEMORY_RESULT {json}`` with
``train_peak_memory_bytes`` = the resident-memory high-water mark minus the resident memory
after the imports (as :mod:`stageinteractor.benchmark.memory` measures ours), then exits.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run by its path: this checkout's package, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stageinteractor.process_memory import RESULT_PREFIX, reset_peak_rss, status_kib  # noqa: E402
from stageinteractor.official.authors_model import (  # noqa: E402
    build_authors_detector,
    image_meta,
    import_authors,
    import_training_parts,
    perturb_heads,
    protocol_stdout,
    serve,
)

__all__ = ["build_training_detector", "training_batch", "training_step", "main"]

BOXES_PER_IMAGE = 8
NUM_CLASSES = 80


def build_training_detector(repo: str, seed: int):
    """(detector in train mode, mmcv Config) with perturbed random decoder weights."""
    model, cfg = build_authors_detector(repo)
    model.init_weights()
    perturb_heads(model, seed)
    model.train()
    return model, cfg


def training_batch(batch: int, h: int, w: int, seed: int):
    """(images (B, 3, h, w), img_metas, gt_bboxes [(8, 4) xyxy], gt_labels [(8,)])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, h, w, generator=g)
    metas, boxes, labels = [], [], []
    for _ in range(batch):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)) * torch.tensor([w, h])
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=g))
        metas.append(image_meta(h, w))
    return img, metas, boxes, labels


def training_step(model, cfg, batch):
    """A callable running one of their training steps on ``batch`` (see the module docstring)."""
    build_optimizer, OptimizerHook, _ = import_training_parts()
    optimizer = build_optimizer(model, cfg.optimizer)
    clipper = OptimizerHook(grad_clip=dict(cfg.optimizer_config.grad_clip))
    img, metas, boxes, labels = batch

    def step():
        losses = model.forward_train(img, metas, boxes, labels)
        total = sum(v if not isinstance(v, list) else sum(v)
                    for k, v in losses.items() if "loss" in k)
        optimizer.zero_grad()
        total.backward()
        clipper.clip_grads(model.parameters())
        optimizer.step()

    return step


def _memory(args) -> None:
    """Peak training memory of a fresh process (as stageinteractor.benchmark.memory)."""
    import torch

    import_authors(args.repo)  # mmcv and mmdet.models: imported before the baseline reading
    x = torch.ones(2, requires_grad=True)  # autograd engine start-up before the baseline
    (x * 2).sum().backward()
    if not reset_peak_rss():
        raise SystemExit("train_worker.py --memory: cannot reset VmHWM (/proc/self/clear_refs)")
    base = status_kib("VmRSS") * 1024
    model, cfg = build_training_detector(args.repo, args.seed)
    step = training_step(model, cfg, training_batch(args.batch, *args.size, args.seed + 123))
    for _ in range(2):
        step()
    peak = status_kib("VmHWM") * 1024
    print(RESULT_PREFIX + json.dumps({"peak_rss_bytes": peak, "baseline_rss_bytes": base,
                                      "method": "VmHWM-VmRSS(after imports)",
                                      "train_peak_memory_bytes": max(0, peak - base)}),
          flush=True)


def _serve(args, out) -> None:
    import torch

    model, cfg = build_training_detector(args.repo, args.seed)
    step = training_step(model, cfg, training_batch(args.batch, *args.size, args.seed + 123))
    serve(out, {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "size": list(args.size), "batch": args.batch}, {"train": step})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", action="store_true", help="print the peak memory and exit")
    args = ap.parse_args(argv)
    out = protocol_stdout()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        sys.stdout = out
        _memory(args)
    else:
        _serve(args, out)


if __name__ == "__main__":
    main()
