#!/usr/bin/env python3
"""Write the official-gradient parity fixture by running the authors' training step.

Runs with the **authors' Python** (the environment that runs their mmdet 2.12 fork; it needs
torch and numpy, not this project's other requirements) on the forward parity fixture's
weights, inputs and ground truths, and writes ``expected.pt`` (format and contents:
``stageinteractor/official/gradient_fixture.py`` and the fixture's README):

    $OFFICIAL_PY tools/make_official_gradient_fixture.py --repo $OFFICIAL_REPO \\
        [--forward-fixture tests/fixtures/official_decoder_parity] \\
        [--out tests/fixtures/official_gradient_parity] [--threads 1]

About 2 minutes and 4 GB of memory on one CPU thread.
"""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=os.environ.get("OFFICIAL_REPO"),
                    required="OFFICIAL_REPO" not in os.environ,
                    help="the authors' repository (a checkout of MCG-NJU/StageInteractor)")
    ap.add_argument("--forward-fixture",
                    default=str(ROOT / "tests/fixtures/official_decoder_parity"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/official_gradient_parity"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))  # this checkout, whatever the authors' environment has installed
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from stageinteractor.official.gradient_worker import make_fixture

    torch.set_num_threads(args.threads)
    out = make_fixture(os.path.abspath(args.repo), args.forward_fixture)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "expected.pt"
    torch.save(out, path)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(out)} entries)")


if __name__ == "__main__":
    main()
