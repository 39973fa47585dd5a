#!/usr/bin/env python3
"""Generate the synthetic demo dataset ahead of time (it is otherwise generated on first use).

    python tools/make_demo_dataset.py [--root DIR] [--seed 2023] [--num-train 600] [--num-val 100]

Writes ``<root>/stageinteractor_demo`` atomically; ``--root`` defaults to
``$DETECTRON2_DATASETS`` or ``<repo>/datasets``. The registered dataset names
(``stageinteractor_demo_train`` / ``_val``) use the default spec; a different spec is for
experiments with :func:`stageinteractor.d2.data.register_coco_json`. A folder that holds another
or an incomplete dataset is not overwritten: one line ``make_demo_dataset: error: ...`` and exit
status 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stageinteractor.requirements import require  # noqa: E402

require("tools/make_demo_dataset.py", "detectron2")

from stageinteractor.d2.data.demo_dataset import (  # noqa: E402
    DemoDatasetSpec,
    default_datasets_root,
    demo_dataset_dir,
    generate_demo_dataset,
)
from stageinteractor.errors import UserError, run_tool  # noqa: E402


def main(argv=None) -> int:
    """The command line; returns the exit status."""
    return run_tool(_main, argv, tool="make_demo_dataset")


def _main(argv=None) -> int:
    d = DemoDatasetSpec()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="datasets root (default: %s)" %
                   default_datasets_root())
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    args = p.parse_args(argv)
    if min(args.num_train, args.num_val) < 1:
        p.error(f"--num-train and --num-val must be >= 1, got {args.num_train}, {args.num_val}")
    spec = DemoDatasetSpec(seed=args.seed, num_train=args.num_train, num_val=args.num_val)
    try:
        out = generate_demo_dataset(demo_dataset_dir(args.root), spec)
    except FileExistsError as e:  # another spec's or a half-written dataset in the way
        raise UserError(str(e)) from None
    with open(os.path.join(out, "DONE")) as f:
        print(out, json.dumps(json.load(f)["stats"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
