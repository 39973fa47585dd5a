"""This process's resident memory from ``/proc`` (Linux), standard library only: the readings
behind the CPU peak-memory figures of ``tools/benchmark.py``, used by our fresh memory process
(:mod:`stageinteractor.benchmark.memory`) and by the authors' training worker
(:mod:`stageinteractor.official.train_worker`, run in their environment), so that both sides
measure alike.
"""
import sys
from typing import Optional

__all__ = ["RESULT_PREFIX", "rss_bytes", "status_kib", "reset_peak_rss"]

#: the one line a memory process prints: ``MEMORY_RESULT {json}``
RESULT_PREFIX = "MEMORY_RESULT "


def rss_bytes(ru_maxrss: int) -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    return int(ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def status_kib(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """A ``kB`` field (e.g. ``VmHWM``, ``VmRSS``) of a /proc status file, None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM); False when impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmHWM") is not None
    except OSError:
        return False
