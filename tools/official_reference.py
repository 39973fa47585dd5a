#!/usr/bin/env python3
"""The authors' StageInteractor (R50, 100 queries) as a same-run timing reference: the worker.

Run with the **authors' Python** (their mmdet 2.12 fork), never ours; ``tools/benchmark.py
--official-python PY --official-repo DIR`` starts it and times it interleaved with our model::

    PY tools/official_reference.py --repo DIR [--threads T] [--size H W] [--seed S]

The worker and its line protocol: :mod:`stageinteractor.official.reference_worker` (it imports
nothing else of this project, so the authors' environment needs no install of it).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stageinteractor.official.reference_worker import main  # noqa: E402

if __name__ == "__main__":
    main()
