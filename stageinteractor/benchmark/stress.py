"""CPU stress: N busy worker processes while a measurement runs, and the slowdown summary.

The workers are plain ``python -c`` busy loops that exit by themselves after a time limit (so
none outlives a killed benchmark for long); :class:`Stressor` stops them by their process ids
when its ``with`` block ends, also on Ctrl-C and exceptions.
"""

import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

from .stats import speedups, spread

__all__ = ["BUSY_LOOP", "Stressor", "stress_summary"]

#: the worker: spins until ``time.time() > start + argv[1]`` seconds
BUSY_LOOP = (
    "import sys, time\nend = time.time() + float(sys.argv[1])\nx = 0\n"
    "while time.time() < end:\n    x += 1\n"
)


class Stressor:
    """``num`` CPU-bound worker processes, each exiting by itself after ``limit_s`` seconds;
    started on entering the ``with`` block (then 0.5 s to get going), stopped on leaving it."""

    def __init__(self, num: int, limit_s: float):
        self.num, self.limit_s = num, limit_s
        self.procs: List[subprocess.Popen] = []

    def __enter__(self):
        for _ in range(self.num):
            cmd = [sys.executable, "-c", BUSY_LOOP, str(self.limit_s)]
            self.procs.append(subprocess.Popen(cmd))
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return False


def stress_summary(
    idle: Dict[str, Sequence[float]], busy: Dict[str, Sequence[float]], workers: int,
    roofline_n: int,
) -> Dict[str, Any]:
    """The ``stress`` JSON section from per-call seconds keyed ``"<model>.<part>"``.

    * ``models[model][part]`` = ``{"idle_s", "stressed_s"}`` (spreads) and ``slowdown`` =
      stressed median / idle median;
    * ``vs_official`` (when ``official.decoder`` and ``a.decoder`` were timed): authors' / ours
      speedups (:func:`~.stats.speedups`) of decoder and backbone, idle and stressed;
    * ``roofline`` (when ``roofline.sgemm`` was timed; removed from ``models``): the sgemm's
      multiply-adds per second (``roofline_n``^3 / median) idle and stressed.
    """
    out: Dict[str, Any] = {"workers": workers, "models": {}}
    for key in idle:
        n, part = key.split(".")
        i_med, s_med = statistics.median(idle[key]), statistics.median(busy[key])
        out["models"].setdefault(n, {})[part] = {
            "idle_s": spread(idle[key]),
            "stressed_s": spread(busy[key]),
            "slowdown": s_med / i_med,
        }
    if "official.decoder" in idle and "a.decoder" in idle:
        out["vs_official"] = {
            f"{part}_speedup_{cond}": speedups(runs[f"official.{part}"], runs[f"a.{part}"])
            for part in ("decoder", "backbone")
            for cond, runs in (("idle", idle), ("stressed", busy))
        }
    if "roofline.sgemm" in idle:
        roof = out["models"].pop("roofline")["sgemm"]
        out["roofline"] = {
            "sgemm_idle_macs_per_s": roofline_n**3 / roof["idle_s"]["median"],
            "sgemm_stressed_macs_per_s": roofline_n**3 / roof["stressed_s"]["median"],
        }
    return out
