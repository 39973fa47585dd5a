"""Timing several callables in one process, interleaved, so that machine noise hits all alike.

:func:`interleaved` runs the callables in ABBA order per iteration (A B, then B A, ...), wall
seconds per call for each, and the process CPU seconds of each call alongside (less sensitive to
other processes' load than wall time, most of all with one thread). A callable that returns a
dict with ``wall_s`` and ``cpu_s`` was timed by another process (the authors' reference worker)
and is recorded with those times. On CUDA the device is synchronised around every call.

:func:`on_off` times one callable with a switch off and on, alternately.
"""

import statistics
import time
from typing import Any, Callable, Dict, List, Optional

from .log import log

__all__ = ["synchronize", "interleaved", "on_off"]


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA only; the CPU runs synchronously)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(
    fns: Dict[str, Callable[[], Any]],
    iters: int,
    warmup: int,
    device: str,
    what: str,
    cpu_times: Optional[Dict[str, List[float]]] = None,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> Dict[str, List[float]]:
    """Run ``fns`` ``warmup`` times each (untimed), then ``iters`` times each in ABBA order.

    Returns name -> wall seconds per call (in call order). ``cpu_times`` (name -> list), when
    given, receives each call's process CPU seconds. ``clock``/``cpu_clock``: the wall and CPU
    clocks (seconds).
    """
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n]()
        log(f"{what}: warm-up {i + 1}/{warmup}")
    times: Dict[str, List[float]] = {n: [] for n in names}
    cpu = cpu_times if cpu_times is not None else {}
    for i in range(iters):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            synchronize(device)
            c0, t0 = cpu_clock(), clock()
            r = fns[n]()
            synchronize(device)
            wall, used = clock() - t0, cpu_clock() - c0
            if isinstance(r, dict) and "wall_s" in r:  # timed by another process (the reference)
                wall, used = float(r["wall_s"]), float(r["cpu_s"])
            times[n].append(wall)
            cpu.setdefault(n, []).append(used)
        log(
            f"{what}: {i + 1}/{iters} "
            + "  ".join(f"{n}={times[n][-1]:.3f}s (cpu {cpu[n][-1]:.3f}s)" for n in names)
        )
    return times


def on_off(
    set_enabled: Callable[[bool], None],
    run: Callable[[], Any],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Median wall time of ``run`` with a switch off and on (``set_enabled(False/True)`` before
    each call), alternating off/on for ``warmup + repeats`` rounds, the first ``warmup`` untimed.

    Returns ``off_ms``, ``on_ms``, ``extra_ms`` = on - off, ``extra_pct`` = 100 (on - off) / off
    and ``repeats``.
    """
    times: Dict[bool, List[float]] = {True: [], False: []}
    for i in range(warmup + repeats):
        for enabled in (False, True):
            set_enabled(enabled)
            t0 = clock()
            run()
            dt = clock() - t0
            if i >= warmup:
                times[enabled].append(dt)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {
        "off_ms": 1e3 * off,
        "on_ms": 1e3 * on,
        "extra_ms": 1e3 * (on - off),
        "extra_pct": 100.0 * (on - off) / off,
        "repeats": repeats,
    }
