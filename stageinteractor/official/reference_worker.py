"""The authors' StageInteractor (R50, 100 queries) as a timing reference: a persistent worker.

Runs in the **authors' Python environment** (``python scripts/build_official_env.py VENV``
builds one: their mmdet 2.12 fork, mmcv 1.x without compiled ops; docs/OFFICIAL.md), never in
ours, and imports
nothing else of this project (``stageinteractor`` and ``stageinteractor.official`` import
nothing): ``tools/benchmark.py --official-python PY --official-repo DIR`` starts it through
``tools/official_reference.py`` as a separate process and times it interleaved with our model,
call by call.

    PY tools/official_reference.py --repo DIR [--threads T] [--size H W] [--seed S]

Model: ``configs/stageinteractor/stageinteractor_r50_1x_coco.py`` of the authors' repository,
random weights (their initialisation, then ``+ 0.02 * N(0, 1)`` on every parameter of
``rpn_head`` and ``roi_head`` so that queries, sampling points and boxes differ between queries;
``tools/benchmark.py`` perturbs our decoder the same way), eval mode, ``no_grad``, one random
image of H x W, batch 1. Neck outputs are computed once at start-up.

Line protocol (stdin -> stdout, one JSON object per line; everything else goes to stderr):

* at start-up: ``{"ready": true, "torch": ..., "threads": T, "size": [H, W]}``
* ``decoder``  -> ``{"wall_s", "cpu_s"}``: ``rpn_head.simple_test_rpn`` + ``roi_head.simple_test``
  (query generator, 6 stages, post-processing) on the precomputed neck outputs;
* ``backbone`` -> ``{"wall_s", "cpu_s"}``: ``extract_feat`` (backbone + neck);
* ``whole``    -> ``{"wall_s", "cpu_s"}``: ``simple_test`` of the image (backbone to boxes);
* ``count``    -> ``{"aten_calls", "by_op"}``: aten calls of one ``decoder`` call, counted with a
  ``TorchDispatchMode`` like ``stageinteractor.core.op_count`` (views and in-place ops count);
* ``quit``     -> ``{"bye": true}`` and exit.

Errors are answered with ``{"error": "..."}``. Times are measured inside the worker around the
call only (wall clock and this process's CPU time), so the pipe adds nothing to them. The
client side is :mod:`stageinteractor.official.reference_client`.
"""
import argparse
import collections
import json
import os
import sys
import time
import warnings

# the protocol: commands answered with times, the other commands, and how to get the environment
TIMED_COMMANDS = ("decoder", "backbone", "whole")
COMMANDS = TIMED_COMMANDS + ("count", "quit")
BUILD_HINT = "python scripts/build_official_env.py VENV builds it (docs/OFFICIAL.md)"


def _reply(out, obj) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _build(repo: str, size, seed: int):
    """(model, image, metas) of the authors' R50-100q detector with perturbed random weights."""
    sys.path.insert(0, repo)
    cwd = os.getcwd()
    os.chdir(repo)  # the config's _base_ paths are relative to the repository
    try:
        import numpy as np
        import torch

        try:  # the authors' environment only (not installed by this project's set-up step)
            from mmcv import Config
            from mmdet.models import build_detector
        except ImportError as e:
            raise SystemExit(
                f"official_reference.py: run it with the Python of the authors' environment "
                f"({BUILD_HINT}): {e}"
            )

        cfg = Config.fromfile("configs/stageinteractor/stageinteractor_r50_1x_coco.py")
    finally:
        os.chdir(cwd)
    cfg.model.pretrained = None
    model = build_detector(cfg.model)
    model.init_weights()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in ("rpn_head", "roi_head"):
            for p in getattr(model, name).parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    H, W = size
    img = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed + 123))
    metas = [
        dict(
            img_shape=(H, W, 3),
            ori_shape=(H, W, 3),
            pad_shape=(H, W, 3),
            batch_input_shape=(H, W),
            scale_factor=np.ones(4, dtype=np.float32),
            flip=False,
        )
    ]
    return model, img, metas


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=os.environ.get("OFFICIAL_REPO"), required="OFFICIAL_REPO" not in os.environ)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    # the protocol owns the real stdout; prints and logs of the authors' code go to stderr
    out = sys.stdout
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, img, metas = _build(args.repo, tuple(args.size), args.seed)
    with torch.no_grad():
        feats = model.extract_feat(img)

    def decoder():
        xyzr, content, whwh = model.rpn_head.simple_test_rpn(feats, metas)
        return model.roi_head.simple_test(feats, xyzr, content, metas, imgs_whwh=whwh, rescale=True)

    calls = {
        "decoder": decoder,
        "backbone": lambda: model.extract_feat(img),
        "whole": lambda: model.simple_test(img, metas, rescale=True),
    }
    _reply(
        out,
        {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(), "size": list(args.size)},
    )
    for line in sys.stdin:
        cmd = line.strip()
        if not cmd:
            continue
        try:
            if cmd == "quit":
                _reply(out, {"bye": True})
                return
            if cmd in calls:
                with torch.no_grad():
                    c0, t0 = time.process_time(), time.perf_counter()
                    calls[cmd]()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                _reply(out, {"wall_s": wall, "cpu_s": cpu})
            elif cmd == "count":
                _reply(out, _count(decoder))
            else:
                _reply(out, {"error": f"unknown command {cmd!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the benchmark, worker stays up
            _reply(out, {"error": f"{type(e).__name__}: {e}"})


def _count(fn):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        fn()  # warm-up, not counted (as stageinteractor.core.op_count)
        counter = _Counter()
        with counter:
            fn()
    return {"aten_calls": sum(counter.n.values()), "by_op": dict(counter.n.most_common())}


if __name__ == "__main__":
    main()
