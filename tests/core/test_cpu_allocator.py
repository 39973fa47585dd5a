"""retain_freed_memory(): large freed blocks are reused (no new page faults), values unchanged.

Each case runs in a fresh interpreter (the setting is process-global): allocate and free a
32 MiB tensor a few times and count the minor page faults of the later rounds. With glibc's
defaults each round maps fresh pages (about 8,000 faults of 4 KiB for 32 MiB); with the setting
the heap pages are reused once the heap has settled (near zero).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stageinteractor.cpu_allocator import GLIBC_ENV, _glibc

REPO = Path(__file__).resolve().parents[2]

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
for _ in range(10):
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
    code = _PROBE.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_glibc
def test_retained_blocks_do_not_fault_again():
    plain = _probe("plain")
    kept = _probe("retain")
    assert kept["applied"] is True
    assert plain["sum"] == kept["sum"] == 8 * 1024 * 1024
    pages = 32 * 1024 * 1024 // 4096
    # default glibc: every round maps the block afresh
    assert min(plain["faults"][1:]) > pages // 2, plain
    # retained: the heap settles within a few rounds (glibc may still move the block once or
    # twice), then the same pages are reused
    assert max(kept["faults"][-3:]) < pages // 20, kept


@needs_glibc
def test_environment_variables_have_the_same_effect():
    import os

    env = dict(os.environ, **GLIBC_ENV)
    via_env = _probe("plain", env=env)
    pages = 32 * 1024 * 1024 // 4096
    assert max(via_env["faults"][-3:]) < pages // 20, via_env
