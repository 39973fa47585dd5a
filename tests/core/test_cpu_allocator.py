"""retain_freed_memory(): large freed blocks are reused (no new page faults), values unchanged.

Each case runs in a fresh interpreter (the setting is process-global): allocate and free a
32 MiB tensor 20 times and count the minor page faults of each round. With glibc's defaults
every round maps fresh pages (about 8,000 faults of 4 KiB for 32 MiB); with the setting the heap
pages are reused once the heap has settled (near zero). The heap settles within the first few
rounds, and glibc may still move the block once later on (a CI run saw it in round 9 of 10,
when the interpreter's own allocations land above it), so the check counts rounds: most of the
later rounds must be fault-free, where the default never has one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stageinteractor.cpu_allocator import GLIBC_ENV, _glibc

REPO = Path(__file__).resolve().parents[2]

ROUNDS = 20
SETTLE = 5  # rounds the heap may take to settle
PAGES = 32 * 1024 * 1024 // 4096  # 4 KiB pages in the probe's block

_PROBE = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
import torch
applied = None
if sys.argv[1] == "retain":
    from stageinteractor.cpu_allocator import retain_freed_memory
    applied = retain_freed_memory()
n = 8 * 1024 * 1024  # 32 MiB of float32
faults = []
for _ in range({rounds}):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(n)
    t.fill_(1.0)
    s = float(t.sum())
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({{"applied": applied, "faults": faults, "sum": s}}))
"""

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="not glibc (mallopt unavailable)")


def _probe(mode: str, env=None) -> dict:
    code = _PROBE.format(repo=str(REPO), rounds=ROUNDS)
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _reused_rounds(faults) -> int:
    """How many rounds after the settling ones reused their pages (under 5 % of them faulted)."""
    return sum(f < PAGES // 20 for f in faults[SETTLE:])


@needs_glibc
def test_retained_blocks_do_not_fault_again():
    plain = _probe("plain")
    kept = _probe("retain")
    assert kept["applied"] is True
    assert plain["sum"] == kept["sum"] == 8 * 1024 * 1024
    assert len(plain["faults"]) == len(kept["faults"]) == ROUNDS
    # default glibc: every round maps the block afresh
    assert min(plain["faults"][1:]) > PAGES // 2, plain
    assert _reused_rounds(plain["faults"]) == 0, plain
    # retained: after settling, at most two rounds in fifteen map the block afresh
    assert _reused_rounds(kept["faults"]) >= ROUNDS - SETTLE - 2, kept


@needs_glibc
def test_environment_variables_have_the_same_effect():
    import os

    env = dict(os.environ, **GLIBC_ENV)
    via_env = _probe("plain", env=env)
    assert _reused_rounds(via_env["faults"]) >= ROUNDS - SETTLE - 2, via_env
