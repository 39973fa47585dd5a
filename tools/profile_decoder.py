#!/usr/bin/env python3
"""Where the decoder's time goes: torch.profiler tables per stage, per section and per op.

    python tools/profile_decoder.py [--config-file CFG] [--threads T] [--iters N]
        [--image-size H W] [--layout channels_last|contiguous] [--rows R] [--markdown]

Builds the config's ``model.decoder`` (default: the R50-100q StageInteractor), perturbs its
weights like ``tools/benchmark.py`` (``--perturb-decoder``, 0.02 * N(0, 1)), feeds it random
neck-like maps (N(0, 1), 256 channels, strides 4-32) in ``--layout`` (channels-last = what the
neck emits in CPU inference) and profiles ``--iters`` batch-1 ``no_grad`` inferences (+ top-k)
after one warm-up. Tables (milliseconds per inference):

* sections: inclusive time of each stage and of the stage parts (attention, sampler, mixing,
  generator GEMM, static layers, out_proj, FFN), summed over the stages;
* ops: self time per aten op, and per (op, input shapes) for the largest entries;
* the share of time in matrix products (addmm/mm/bmm/baddbmm) and their multiply-add rate.

The work is done by ``stageinteractor.benchmark.decoder_profile``.
"""
import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from stageinteractor.benchmark.decoder_profile import (  # noqa: E402
    GEMM_OPS,
    build_inputs,
    print_report,
    profile_decoder,
)
from stageinteractor.errors import run_tool  # noqa: E402

__all__ = ["GEMM_OPS", "parse_args", "main"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-file", default=os.path.join(
        _REPO_ROOT, "configs/stageinteractor/stageinteractor_r50_100q_1x.py"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--image-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
    ap.add_argument("--perturb-decoder", type=float, default=0.02)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--malloc", choices=("retain", "system"), default="system",
                    help="system: glibc's defaults; retain: keep freed memory for reuse "
                    "(stageinteractor.cpu_allocator), as tools/benchmark.py --malloc retain")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.malloc == "retain":
        from stageinteractor.cpu_allocator import retain_freed_memory

        retain_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    dec, feats, sizes, k = build_inputs(args.config_file, args.image_size, args.layout,
                                        args.perturb_decoder)
    res = profile_decoder(dec, feats, sizes, k, args.iters, args.rows)
    h, w = args.image_size
    print_report(res, f"decoder inference: {args.threads} thread(s), {h}x{w}, layout "
                      f"{args.layout}, torch {torch.__version__}", args.markdown)


if __name__ == "__main__":
    sys.exit(run_tool(main, tool="profile_decoder"))
