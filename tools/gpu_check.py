#!/usr/bin/env python3
"""One prepared check of the CUDA path (issue 14): gpu tests, host syncs, GPU figures.

    python3 tools/gpu_check.py --output-dir OUT [--device cuda|cpu] [--budget-s 420]
        [--compile-reserve-s S] [--skip-tests] [--skip-syncs] [--rows NAME ...]

Runs, in this order, within ``--budget-s`` seconds of wall time (default 420: the whole check
fits in 8 minutes on one GPU):

1. the environment: device name, GPU count and memory, torch / CUDA / cuDNN versions;
2. the ``gpu``-marked tests (``pytest -m gpu tests/*/test_cuda_*.py``: gpu tests live in
   ``test_cuda_*.py`` files), with their counts and log;
3. host syncs per training step and per inference (``stageinteractor.d2.sync_count``) of the
   demo and the R50-100q config, **checked against the budget** of
   ``tests/d2/test_host_sync_budget.py``; on CUDA also PyTorch's own sync-debug count, which
   must not exceed the counter's;
4. the benchmark rows of the README's GPU speed table (``tools/benchmark.py`` subprocesses, one
   JSON each): StageInteractor vs the AdaMixer baseline, R50-100q, 800x1216, batch 1
   (inference img/s and ratio, training step, peak memory), the same with AMP (float16 +
   GradScaler, as training), decoder-only latency, StageInteractor vs detrex DINO-R50 and
   inference with ``--compile`` (the decoder under ``torch.compile``).

Each step gets a timeout from the budget left; every step but the compile row leaves
``--compile-reserve-s`` (default 150 s on CUDA) for it, so the inductor build never starts with
whatever the others left. A row that cannot start with enough time left is recorded as skipped
("budget"); a row that runs out of its time is recorded as ``timeout`` (listed, not a failure
of the model). So the check always ends in time and says what it left out.

Nothing passes silently on a GPU machine: a gpu test skipped there is a failure (e.g. detrex
not importable), except a test that needs more GPUs than the machine has (the NCCL test with one
GPU), which is reported as not run; the DINO row without detrex's DINO config is a failure; the
host-sync counts must be within budget.

``--device cpu`` is the dry run that CI tests (``tests/d2/test_gpu_check.py``): the gpu tests
run on the CPU (``STAGEINTERACTOR_GPU_DRY_RUN=1``), the host syncs are the counter's CPU dry
run, and the rows use the demo configs at 128x160 with one iteration (same commands, same
JSON, small sizes); there skips are allowed and a missing DINO config skips its row.

Writes ``OUT/gpu_check.log`` (everything printed, including each subprocess's output) and
``OUT/gpu_check.json``: ``{"env", "budget_s", "compile_reserve_s", "wall_s", "tests",
"host_syncs", "rows", "ok", "failed_rows", "failed_host_syncs", "timeouts"}``; ``rows[name]`` =
``{"command", "status" (ok / failed / timeout / skipped), "reason", "wall_s", "figures",
"json"}``. Exit status 0 when every test passed, no row failed and the host syncs are within
budget (skipped and timed-out rows are listed, not failures).
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from stageinteractor.benchmark.gpu_check import (  # noqa: E402
    ADAMIXER_DEMO,
    ADAMIXER_R50,
    COMPILE_RESERVE,
    DEMO,
    MIN_START,
    R50,
    SETTINGS,
    Check,
    bench_rows,
    dino_config,
    environment,
    figures,
    gpu_tests,
    host_syncs,
    run_rows,
    verdict,
)
from stageinteractor.errors import UserError, run_tool  # noqa: E402

__all__ = ["R50", "ADAMIXER_R50", "DEMO", "ADAMIXER_DEMO", "SETTINGS", "MIN_START", "Check",
           "bench_rows", "dino_config", "figures", "parse_args", "main"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu (the dry run)")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--compile-reserve-s", type=float, default=None,
                   help="seconds kept for the compile row while the other steps run "
                   f"(default {COMPILE_RESERVE['cuda']:.0f} on cuda, "
                   f"{COMPILE_RESERVE['cpu']:.0f} on cpu)")
    p.add_argument("--skip-tests", action="store_true", help="no pytest step")
    p.add_argument("--skip-syncs", action="store_true", help="no host-sync step")
    p.add_argument("--rows", nargs="*", default=None, metavar="NAME",
                   help="only these benchmark rows (default all; none: --rows with no name)")
    return p.parse_args(argv)


def _steps(check: Check, args, env) -> None:
    """Tests, host syncs and rows, the JSON written after each."""
    if args.skip_tests:
        check.result["tests"] = {"status": "skipped", "reason": "--skip-tests", "ok": True}
    else:
        check.result["tests"] = gpu_tests(check, env.get("gpu_count", 0))
    check.write()
    no_d2 = None if env.get("detectron2") else "detectron2 not importable (run make setup)"
    if args.skip_syncs or no_d2:
        check.result["host_syncs"] = {"status": "skipped", "reason": no_d2 or "--skip-syncs"}
    else:
        check.result["host_syncs"] = host_syncs(check)
    check.write()
    if no_d2:
        check.log(f"benchmark rows skipped: {no_d2}")
    elif args.rows is None or args.rows:
        run_rows(check, args.rows, env)


def _summary(check: Check) -> None:
    tests = {k: v for k, v in check.result["tests"].items() if k != "skip_reasons"}
    check.log(f"tests: {json.dumps(tests)}")
    for note in check.result["tests"].get("not_run", []):
        check.log(f"gpu test not run: {note}")
    for n, r in check.result["rows"].items():
        figs = json.dumps(r.get("figures", {}))
        check.log(f"row {n}: {r['status']} {r.get('reason', '')} {figs}")
    late = check.result["timeouts"]
    check.log(f"{'OK' if check.result['ok'] else 'NOT OK'}: wall {check.result['wall_s']:.0f}s "
              f"of {check.budget_s:.0f}s" + (f"; timed out (not failures): {', '.join(late)}"
                                            if late else "") + f"; log {check.log_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available")
    compile_runs = args.rows is None or "compile" in args.rows
    reserve = COMPILE_RESERVE[device] if args.compile_reserve_s is None else args.compile_reserve_s
    check = Check(args.output_dir, args.budget_s, device,
                  reserve_s=reserve if compile_runs else 0.0)
    env = environment(device)
    check.result["env"] = env
    check.log("environment: " + json.dumps(env))
    check.write()
    _steps(check, args, env)
    check.write()
    check.result.update(verdict(check.result))
    check.write()
    _summary(check)
    check.log_file.close()
    return 0 if check.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_tool(main, tool="gpu_check"))
