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
The measurements live in ``stageinteractor.benchmark.csla_cost``.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from stageinteractor.errors import run_tool  # noqa: E402
from stageinteractor.requirements import require  # noqa: E402

require("tools/bench_csla_detrex.py", "detectron2", "detrex", "projects")

from stageinteractor.benchmark.csla_cost import (  # noqa: E402
    bench,
    bench_criterion,
    bench_tiny_step,
)

__all__ = ["bench", "bench_criterion", "bench_tiny_step", "main"]


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


def _cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(_cli, tool="bench_csla_detrex"))
