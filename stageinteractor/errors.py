"""User mistakes (a path, a key, a value, a file) and how a tool ends on one.

Every tool runs its ``main`` through :func:`run_tool`: a :class:`UserError` ends the tool with its
message as ONE line ``<tool>: error: <message>`` on stderr and exit status 2; any other exception
is a bug and keeps its traceback. So code that detects a user mistake raises one of these with a
message that is the whole story (what is wrong, where, and what to do), and code that meets an
unexpected state raises anything else.

This module imports only the standard library, so tools without detectron2
(``tools/plot_instability.py``) use it too; :mod:`stageinteractor.d2.cli` re-exports it.
"""
import sys
from typing import Callable, List, Optional, Sequence

__all__ = ["UserError", "ConfigError", "CheckpointFileError", "run_tool"]


class UserError(Exception):
    """A user mistake; ``str(e)`` is the one line the tool prints."""


class ConfigError(UserError, ValueError):
    """A config file, command-line override or config value is invalid."""


class CheckpointFileError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, in another layout or cannot be downloaded."""


def run_tool(main: Callable[[Optional[List[str]]], Optional[int]],
             argv: Optional[Sequence[str]] = None, *, tool: str) -> int:
    """Run ``main(argv)`` and return its exit status (None counts as 0).

    A :class:`UserError` prints ``"<tool>: error: <message>"`` (one line: the message's line
    breaks become spaces) on stderr and returns 2; every other exception propagates with its
    traceback (a bug, not a user mistake).
    """
    try:
        rc = main(None if argv is None else list(argv))
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"{tool}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    return int(rc or 0)
