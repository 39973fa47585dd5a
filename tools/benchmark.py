#!/usr/bin/env python3
"""Speed, memory, FLOPs, parameters and aten-call counts of one or two LazyConfig models.

    python tools/benchmark.py --config-file A [--compare-config B] [--compare-opts k=v ...]
        [--device cpu|cuda] [--image-size H W] [--batch-size N] [--iters N] [--warmup N]
        [--train] [--amp] [--compile] [--json PATH] [--count-ops] [--stress N] [--decoder-only]
        [--threads T] [--memory-repeats R] [--official-python PY --official-repo DIR]
        [--no-roofline] [--perturb-decoder S] [key=value ...]

A command line over ``stageinteractor.benchmark`` (module map in its ``__init__``).

* Trailing ``key=value`` overrides apply to A, ``--compare-opts`` to B. ``--compare-opts``
  without ``--compare-config`` compares A's config with itself plus those overrides (e.g. CSLA
  off: ``--compare-opts model.criterion.assigner.enabled=False``).
* Works for configs/ (StageInteractor, AdaMixer) and detrex configs (their own model; on CPU a
  detrex ``DINO`` is swapped for the device-agnostic DINO of ``stageinteractor.detrex_ext``).
  Weights are random (speed and memory do not depend on them). Inputs: synthetic uint8 images
  of ``--image-size`` with 8 random ground-truth boxes each (training).
* Timings: A and B are measured **interleaved in one process** (ABBA order per iteration), so
  machine noise hits both; every figure comes with its spread (median, quartiles, min, max) and
  the ratios are ratios of medians (``*_paired`` = median of per-iteration A/B ratios;
  ``*_cpu`` = the same from the process CPU time per call, robust to other processes' load
  with ``--threads 1``).
  Inference = ``model(batch)`` in eval mode under ``no_grad`` (images/s = batch / time);
  ``--train`` adds the training step (forward + backward + AdamW step); ``--decoder-only`` times
  only the decoder (+ top-k) on precomputed neck outputs and skips the whole-model figures.
* ``--amp`` is training's mixed precision (``stageinteractor.d2.engine.Trainer``): on CUDA
  float16 autocast and, in the training step, a ``GradScaler`` (scaled backward, scaler step and
  update); on CPU bfloat16 autocast. JSON ``amp``: ``{"dtype", "grad_scaler"}``.
* Peak training memory: CUDA = allocator peak (``max_memory_allocated``) over the training steps;
  CPU = in a **fresh subprocess per measurement**: the peak resident memory (kernel high-water
  mark VmHWM, reset after the imports via /proc/self/clear_refs; fallback ``ru_maxrss``) over
  model build + 2 training steps, minus the resident memory after the imports (i.e. weights,
  optimizer state and activations; interpreter and libraries excluded), repeated
  ``--memory-repeats`` times alternating A and B.
* FLOPs: fvcore with handles for every matrix product incl. ``bmm``/``baddbmm``/``matmul``/SDPA
  (``stageinteractor.d2.flops``), batch 1 at ``--image-size``; 1 FLOP = 1 multiply-add.
* ``--count-ops``: aten calls (``stageinteractor.core.op_count``) of one batch-1 ``no_grad``
  decoder inference (query generator, stages, top-k; no backbone/neck) and of the forward of one
  training step (decoder + criterion as configured), per stage and per op; counted at
  min(H, 256) x min(W, 384) (the count depends on the code path, not on the image size).
  Also the host syncs (``stageinteractor.d2.sync_count``: scalar reads, device->host and
  blocking host->device copies, data-dependent shapes) of one whole training step and one
  inference at ``--batch-size``, same size (JSON ``host_syncs``).
* Load: 1-minute load average and the CPU share used by *other* processes during the run
  (``/proc/stat`` busy time minus this process's and its children's CPU time, over wall time x
  cores); a warning is printed when the machine is busy. ``--stress N`` starts N CPU-bound
  worker processes (self-terminating after a time limit, stopped by this tool, also on Ctrl-C)
  and reports each model's slowdown (stressed / idle median) for the decoder and the backbone.
* The authors' model in the same run (``--official-python PY --official-repo DIR``, default
  ``$OFFICIAL_PY``/``$OFFICIAL_REPO``; ``python scripts/build_official_env.py VENV`` builds such
  an environment): ``tools/official_reference.py`` runs in that Python as a persistent worker
  (``stageinteractor.official.reference_client``: separate process, same threads, same image
  size, batch 1, float32, eager) and each of its calls is timed inside the worker, interleaved
  with ours: its decoder (``--decoder-only``) or its whole model (backbone to boxes; otherwise),
  also under ``--stress`` (decoder and backbone). Reported: its spread, ``ratios_vs_official`` =
  authors' / ours (ratio of medians, median of per-iteration ratios, ratio of CPU-time medians;
  > 1 = ours faster) and, with ``--count-ops``, its decoder's aten calls. Skipped with a one-line
  reason when not given; a python or repository that does not exist, or (given on the command
  line) a run that is not float32 eager CPU batch 1, ends the tool with a one-line error.
* Configs and overrides go through the tools' front (``stageinteractor.d2.cli``): a missing
  file, an unknown key ("did you mean") or a bad switch value ends the tool with one line
  ``benchmark: error: ...`` and exit status 2.
  Both decoders' weights are random, perturbed by ``--perturb-decoder`` (0.02 * N(0, 1), as the
  reference does) so that queries sample different points.
  With ``--train`` their **training step** too (``stageinteractor/official/train_worker.py``,
  a second worker in their Python, any ``--batch-size``: ``forward_train``, backward, their
  gradient clipping at 1.0 and AdamW step), timed interleaved with ours (then clipped at 1.0 as
  well, ``--clip-grad``), and its peak training memory in fresh processes like ours: JSON
  ``official.train_s``, ``official.train_peak_memory_bytes``, ``ratios_vs_official.train`` and
  ``.train_peak_memory_bytes`` (authors' / ours). The inference reference runs batch 1 only.
* CPU allocator (``--malloc``, default ``system`` = glibc's defaults, as a user's process runs):
  ``--malloc retain`` keeps freed memory for reuse (``stageinteractor.cpu_allocator``; glibc
  ``mallopt``, for the authors' worker through glibc's environment variables, both sides alike)
  so that large per-call tensors do not page-fault anew on every call. Peak-memory subprocesses
  always run with the defaults. Recorded in the JSON (``malloc``).
* Roofline: a 2048^3 float32 ``mm`` (``--no-roofline`` skips it); ``roofline`` gives its
  multiply-add rate and the decoder's / whole model's achieved rate (fvcore multiply-adds /
  median time) as a fraction of it, also for the authors' model (same function, our count).
  On CPU it is timed interleaved with the models (same load); on CUDA it is measured once on
  the GPU before the timed sections (``sgemm_device``, ``sgemm_measured``), never a CPU sgemm
  inside the GPU iterations.

JSON (``--json``): ``{"settings", "load", "a", "b", "ratios", "stress", "official",
"ratios_vs_official", "roofline"}`` (``stress.vs_official``: authors' / ours idle and stressed,
``stress.roofline``: sgemm rate idle and stressed); ``a``/``b`` hold
``params``, ``flops``, ``inference_images_per_s``, ``train_step_s``, ``train_peak_memory_bytes``
(medians; ``*_spread`` dicts alongside), ``decoder_only_s``, ``decoder_aten_calls``,
``decoder_aten_calls_train``, ``decoder_aten_calls_by_op`` (+ ``_by_stage``), ``host_syncs``
(``{"train_step": {...}, "inference": {...}}``) and ``load_info``.
"""

import argparse
import os
import signal
import sys
from typing import Any, Dict

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from stageinteractor.benchmark.load import LoadMonitor  # noqa: E402
from stageinteractor.benchmark.models import build_model, make_batch, perturb_decoder  # noqa: E402
from stageinteractor.benchmark.runner import TRAIN_WORKER, run, start_reference  # noqa: E402
from stageinteractor.benchmark.stats import spread  # noqa: E402
from stageinteractor.benchmark.stress import Stressor  # noqa: E402
from stageinteractor.errors import UserError, run_tool  # noqa: E402
from stageinteractor.official.reference_client import (  # noqa: E402
    DEFAULT_WORKER as OFFICIAL_WORKER,
    OfficialReference,
)

# the library's names that scripts and tests used from this file
__all__ = ["parse_args", "main", "build_model", "make_batch", "perturb_decoder", "spread",
           "LoadMonitor", "Stressor", "OfficialReference", "OFFICIAL_WORKER"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """keeps the description's line breaks and shows every option's default"""


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", required=True, help="LazyConfig of model A")
    p.add_argument("--compare-config", default=None,
                   help="LazyConfig of model B, measured interleaved with A (none: A only)")
    p.add_argument("--compare-opts", nargs="*", default=None, metavar="KEY=VALUE",
                   help="overrides for B only (B = A's config when --compare-config is absent)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument("--image-size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"),
                   help="synthetic input image size")
    p.add_argument("--batch-size", type=int, default=1, help="images per call")
    p.add_argument("--perturb-decoder", type=float, default=0.02, metavar="S",
                   help="add S * N(0, 1) to every decoder parameter (default 0.02, as the authors' "
                   "reference): random-init generators are zero, so all queries would sample the "
                   "same points; 0 = off")
    p.add_argument("opts", nargs="*", default=[],
                   help="overrides of A, key=value (after the options, or before --compare-opts, "
                   "whose values run up to the next option)")


def _measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=10, help="timed calls per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    p.add_argument("--train", action="store_true", help="also time training steps and peak memory")
    p.add_argument("--amp", action="store_true",
                   help="training's mixed precision: CUDA float16 + GradScaler, CPU bfloat16")
    p.add_argument("--clip-grad", type=float, default=None, metavar="MAX_NORM",
                   help="clip the training step's global L2 gradient norm (default: none; 1.0, "
                   "as training and the authors, when their training step is compared)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder (whole model for others)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--count-ops", action="store_true",
                   help="count aten calls of one decoder inference and one training forward")
    p.add_argument("--stress", type=int, default=0, metavar="N",
                   help="also measure with N CPU-bound worker processes running (0 = no)")
    p.add_argument("--decoder-only", action="store_true",
                   help="time only the decoder (+ top-k) on precomputed neck outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--memory-repeats", type=int, default=2,
                   help="peak-memory measurements per model (fresh processes on CPU); 0 = skip")
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore FLOP count")
    p.add_argument("--no-roofline", action="store_true",
                   help="skip the in-run 2048^3 sgemm (the multiply-add rate that timings are "
                   "compared to)")
    p.add_argument("--malloc", choices=("retain", "system"), default="system",
                   help="system (default): glibc's defaults, as a user's process runs; retain: "
                   "keep freed CPU memory for reuse (glibc mallopt, "
                   "stageinteractor.cpu_allocator), "
                   "in this process and the authors' worker alike, so that large tensors do not "
                   "page-fault on every call")


def _official_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--official-python", default=None, metavar="PY",
                   help="python of an environment of the authors' code (default $OFFICIAL_PY): "
                   "their model is timed in the same run, interleaved with A "
                   "(tools/official_reference.py)")
    p.add_argument("--official-repo", default=None, metavar="DIR",
                   help="checkout of the authors' repository (default $OFFICIAL_REPO)")
    p.add_argument("--official-worker", default=OFFICIAL_WORKER, help=argparse.SUPPRESS)
    p.add_argument("--official-train-worker", default=TRAIN_WORKER, help=argparse.SUPPRESS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=_Formatter,
        epilog="examples:\n"
        "  python tools/benchmark.py --config-file configs/stageinteractor/"
        "stageinteractor_r50_100q_1x.py \\\n"
        "      --compare-config configs/adamixer/adamixer_r50_100q_1x.py --train --threads 2\n"
        "  python tools/benchmark.py --config-file configs/stageinteractor/"
        "stageinteractor_r50_100q_1x.py \\\n"
        "      --decoder-only --count-ops --iters 20 --json decoder.json\n"
        "See the module docstring (top of tools/benchmark.py) for what each figure measures.",
    )
    _model_options(p)
    _measure_options(p)
    _official_options(p)
    args = p.parse_args(argv)
    args.opts = [o for o in args.opts if o != "--"]
    if args.compare_opts is not None:
        args.compare_opts = [o for o in args.compare_opts if o != "--"]
    for name in ("batch_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.stress < 0 or min(args.image_size) < 32 or args.perturb_decoder < 0:
        p.error("--warmup/--stress/--perturb-decoder must be >= 0 and --image-size >= 32")
    return args


def main(argv=None) -> Dict[str, Any]:
    """The benchmark in-process: the JSON document (a user mistake raises ``UserError``)."""
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available")
    # same threads and allocator settings as ours; unusable settings: ReferenceSettingsError
    refs = start_reference(args, torch.get_num_threads())
    try:
        return run(args, refs)
    finally:
        refs.close()


def _cli(argv=None) -> int:
    """The command line: a user mistake ends in one line and exit status 2 (``run_tool``)."""
    main(argv)
    return 0


def _handle_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that `with Stressor(...)` stops its workers


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _handle_sigterm)
    sys.exit(run_tool(_cli, tool="benchmark"))
