"""Progress lines of the measuring tools: ``[benchmark HH:MM:SS] message`` on stderr (stdout
keeps the results)."""

import sys
import time

__all__ = ["log"]


def log(msg: str, tag: str = "benchmark") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
