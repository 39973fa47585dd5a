"""The authors' StageInteractor (R50, 100 queries) as a timing reference: a persistent worker.

Runs in the **authors' Python environment** (``python scripts/build_official_env.py VENV``
builds one: their mmdet 2.12 fork, mmcv 1.x without compiled ops; docs/OFFICIAL.md), never in
ours, and imports nothing else of this project but :mod:`.authors_model` (standard library
at the top; ``stageinteractor`` and ``stageinteractor.official`` import nothing):
``tools/benchmark.py --official-python PY --official-repo DIR`` starts it through
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
call only (wall clock and this process's CPU time), so the pipe adds nothing to them; the loop,
the model build and the metas are :mod:`.authors_model`'s, shared with the other workers. The
client side is :mod:`stageinteractor.official.reference_client`.
"""
import argparse
import collections
import os

from .authors_model import BUILD_HINT, build_authors_detector, image_meta, perturb_heads
from .authors_model import protocol_stdout, serve

__all__ = ["TIMED_COMMANDS", "COMMANDS", "BUILD_HINT", "main"]

# the protocol: commands answered with times, the other commands (the client reads both)
TIMED_COMMANDS = ("decoder", "backbone", "whole")
COMMANDS = TIMED_COMMANDS + ("count", "quit")


def _build(repo: str, size, seed: int):
    """(model, image, metas) of the authors' R50-100q detector with perturbed random weights."""
    import torch

    model, _ = build_authors_detector(repo)
    model.init_weights()
    perturb_heads(model, seed)
    model.eval()
    H, W = size
    img = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed + 123))
    return model, img, [image_meta(H, W)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=os.environ.get("OFFICIAL_REPO"), required="OFFICIAL_REPO" not in os.environ)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    out = protocol_stdout()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, img, metas = _build(args.repo, tuple(args.size), args.seed)
    with torch.no_grad():
        feats = model.extract_feat(img)

    def decoder():
        xyzr, content, whwh = model.rpn_head.simple_test_rpn(feats, metas)
        return model.roi_head.simple_test(feats, xyzr, content, metas, imgs_whwh=whwh, rescale=True)

    timed = {
        "decoder": decoder,
        "backbone": lambda: model.extract_feat(img),
        "whole": lambda: model.simple_test(img, metas, rescale=True),
    }
    ready = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "size": list(args.size)}
    serve(out, ready, timed, other={"count": lambda: _count(decoder)}, context=torch.no_grad)


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
