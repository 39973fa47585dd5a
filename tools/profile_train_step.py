#!/usr/bin/env python3
"""Where the training step's time goes (CPU): a torch.profiler table per phase and per op.

    python tools/profile_train_step.py [--config-file CFG] [--threads T] [--batch-size B]
        [--image-size H W] [--rows R]

Builds the config's model (random weights, decoder perturbed by 0.02 * N(0, 1) as in
``tools/benchmark.py``), a synthetic batch (``stageinteractor.benchmark.models.make_batch``: B
uint8 images with 8 boxes each) and runs the training step of ``tools/benchmark.py --train``
(forward, sum of the losses, backward, global-norm clipping at 1.0, AdamW): one warm-up step,
one timed step without the profiler, one step under it
(``stageinteractor.benchmark.train_profile``). Prints (seconds per step):

* phases: forward (backbone, neck, decoder + criterion), backward, clipping, optimizer step;
* op groups: convolutions, linear layers, batched products, grid_sample, norms, zero fills;
* ops by self time.
"""
import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from stageinteractor.errors import run_tool  # noqa: E402

__all__ = ["parse_args", "main"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-file", default=os.path.join(
        _REPO_ROOT, "configs/stageinteractor/stageinteractor_r50_100q_1x.py"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, nargs=2, default=(512, 768), metavar=("H", "W"))
    ap.add_argument("--rows", type=int, default=25)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from stageinteractor.benchmark.models import build_model, make_batch, perturb_decoder
    from stageinteractor.benchmark.steps import TrainStep
    from stageinteractor.benchmark.train_profile import print_train_profile, profile_train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = build_model(args.config_file, [], "cpu")
    perturb_decoder(model, 0.02)
    batch = make_batch(model, args.batch_size, *args.image_size)
    res = profile_train_step(TrainStep(model, batch, "cpu", amp=False, clip=1.0), rows=args.rows)
    h, w = args.image_size
    print_train_profile(res, f"training step, {args.threads} thread(s), batch {args.batch_size}, "
                             f"{h}x{w}, torch {torch.__version__}")


if __name__ == "__main__":
    sys.exit(run_tool(main, tool="profile_train_step"))
