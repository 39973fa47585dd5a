"""Keep freed CPU memory in the process for reuse instead of returning it to the OS (glibc).

Why: glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (128 KiB to 32 MiB,
adjusted dynamically) with a fresh ``mmap`` and gives it back with ``munmap`` on ``free``. One
batch-1 R50 decoder call at 800x1216 allocates and frees about 145 MB of such blocks (the
generator's (100, 27-50 k) outputs, the (400, 128, 64) mixing tensors), so every call touches
those pages anew: about 37,000 minor page faults, 8 % of the decoder's single-thread time on a
2-core EPYC (1.048 s -> 0.964 s in a loop of decoder calls, ``docs/BENCHMARKS.md``). Raising the mmap threshold and the trim
threshold lets the next call reuse the same heap pages: no faults, identical results.

Process-global, so the library never does it on import; entry points opt in
(``tools/benchmark.py --malloc retain`` does, on both sides of a comparison). A user can get the same behaviour for any
process without code through glibc's environment variables (read at process start), which
:data:`GLIBC_ENV` holds::

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648 python tools/train_net.py ...

Cost: memory freed by the model stays in the process (resident size stays at its high-water mark
instead of dropping between calls); peak memory is unchanged. No effect with another allocator
(jemalloc/tcmalloc via ``LD_PRELOAD``, which cache freed memory themselves) or off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Dict

__all__ = ["GLIBC_ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap (reused after free)
# older glibc refuses thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): still above the
# decoder's largest block (a (100, 50016) float32 generator output, 20 MB)
_FALLBACK_MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 31  # never give the top of the heap back below 2 GiB of free space
_M_TRIM_THRESHOLD = -1  # <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3

GLIBC_ENV: Dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


def _glibc():
    """The C library when it is glibc (it has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only (not musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    del gnu_get_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Returns True when both settings were accepted, False where they do not apply (not Linux,
    not glibc) or glibc refused them. Safe to call more than once; takes effect for blocks
    allocated afterwards.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not ok_mmap:
        ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _FALLBACK_MMAP_THRESHOLD) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return ok_mmap and ok_trim
