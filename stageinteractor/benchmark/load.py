"""Machine load during a measurement: the 1-minute load average and the CPU share that *other*
processes used (from ``/proc/stat`` and ``/proc/<pid>/stat``; Linux, None elsewhere).

other share = (machine busy CPU seconds - own CPU seconds) / (wall seconds x cores), where own =
this process, its waited-for children and the live helper processes given (e.g. the authors'
reference worker, whose CPU time enters ``os.times()`` only once it has exited).
"""

import os
import time
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

__all__ = [
    "parse_proc_stat",
    "parse_pid_stat",
    "proc_stat_busy",
    "pid_cpu",
    "own_cpu",
    "loadavg1",
    "others_share",
    "is_busy",
    "LoadMonitor",
]


def _clk_tck() -> int:
    return os.sysconf("SC_CLK_TCK")


def parse_proc_stat(first_line: str, clk_tck: int) -> float:
    """Busy seconds from the ``cpu`` line of /proc/stat: user + nice + system + irq + softirq
    (+ steal when present), i.e. every field but idle and iowait, in ticks / ``clk_tck``."""
    v = [int(x) for x in first_line.split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / clk_tck


def parse_pid_stat(text: str, clk_tck: int) -> float:
    """utime + stime seconds of a /proc/<pid>/stat text (the command name may hold spaces and
    parentheses: fields are counted after its last ')')."""
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / clk_tck


def proc_stat_busy() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (None when unreadable)."""
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.readline(), _clk_tck())
    except (OSError, ValueError, IndexError):
        return None


def pid_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_pid_stat(f.read(), _clk_tck())
    except (OSError, ValueError, IndexError):
        return 0.0


def own_cpu(live_pids: Iterable[int] = ()) -> float:
    """This process's CPU time, its waited-for children's and that of the live ``live_pids``."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(map(pid_cpu, live_pids))


def loadavg1() -> Optional[float]:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


def others_share(busy_s: Optional[float], own_s: float, wall_s: float,
                 ncpu: int) -> Optional[float]:
    """CPU share of other processes: max(0, busy - own) / (wall x cores); None without data."""
    if busy_s is None or wall_s <= 0:
        return None
    return max(0.0, (busy_s - own_s) / (wall_s * ncpu))


def is_busy(others: Optional[float], loads: Sequence[Optional[float]], ncpu: int) -> bool:
    """Busy: other processes used > 20 % of the CPUs, or a 1-min load average > 0.75 x cores."""
    known = [x for x in loads if x is not None]
    return bool((others is not None and others > 0.2) or (known and max(known) > 0.75 * ncpu))


class LoadMonitor:
    """Machine load during a section (from construction to :meth:`result`).

    Args:
        live_pids: helper processes of this run that stay alive across the section (their CPU
            time counts as own).
    """

    def __init__(self, live_pids: Tuple[int, ...] = ()):
        self.ncpu = os.cpu_count() or 1
        self.live_pids = tuple(live_pids)
        self.t0, self.busy0 = time.perf_counter(), proc_stat_busy()
        self.own0 = own_cpu(self.live_pids)
        self.load_start = loadavg1()

    def result(self) -> Dict[str, Any]:
        """``loadavg_1min_start/end``, ``cpus``, ``other_processes_cpu_share``, ``own_cpu_s``,
        ``wall_s`` and ``busy`` (:func:`is_busy`)."""
        wall = time.perf_counter() - self.t0
        busy1, own1 = proc_stat_busy(), own_cpu(self.live_pids)
        busy = None if self.busy0 is None or busy1 is None else busy1 - self.busy0
        others = others_share(busy, own1 - self.own0, wall, self.ncpu)
        res = {
            "loadavg_1min_start": self.load_start,
            "loadavg_1min_end": loadavg1(),
            "cpus": self.ncpu,
            "other_processes_cpu_share": others,
            "own_cpu_s": own1 - self.own0,
            "wall_s": wall,
        }
        loads = (res["loadavg_1min_start"], res["loadavg_1min_end"])
        res["busy"] = is_busy(others, loads, self.ncpu)
        return res
