"""Client of the authors' reference worker: their model in a separate process of *their* Python,
timed in the same run as ours, call by call.

The worker (``tools/official_reference.py``, run by the authors' environment's ``python``;
``python scripts/build_official_env.py VENV`` builds one) is started as

    PY WORKER --repo DIR --size H W [--threads T]

with an optional environment (e.g. glibc's allocator variables), and speaks a line protocol:
one JSON object per line on its stdout, one command per line on its stdin; its stderr goes to a
temporary file whose tail is shown when it fails.

* start-up (no command): ``{"ready": true, "torch": str, "threads": int, "size": [H, W]}``
* ``decoder`` / ``backbone`` / ``whole`` -> ``{"wall_s": float, "cpu_s": float}`` (timed inside
  the worker around the call only, so the pipe adds nothing);
* ``count`` -> ``{"aten_calls": int, "by_op": {op: calls}}`` (one decoder call);
* ``quit`` -> ``{"bye": true}``, then the worker exits;
* any failure -> ``{"error": str}`` (raised here as ``RuntimeError``).

Imports only the standard library and :mod:`stageinteractor.errors` (this side runs in our
environment, the worker in theirs).
"""

import json
import os
import subprocess
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from stageinteractor.errors import UserError

__all__ = ["DEFAULT_WORKER", "ReferenceSettingsError", "resolve_reference", "OfficialReference"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the worker script of this checkout
DEFAULT_WORKER = os.path.join(_REPO, "tools", "official_reference.py")

_NOT_GIVEN = (
    "authors' reference not given (--official-python/--official-repo or "
    "$OFFICIAL_PY/$OFFICIAL_REPO; python scripts/build_official_env.py VENV builds them)"
)


class ReferenceSettingsError(UserError, ValueError):
    """The authors' environment was asked for but cannot be used (a user mistake: a tool ends on
    it with one line, :func:`stageinteractor.errors.run_tool`)."""


def resolve_reference(
    python: Optional[str], repo: Optional[str], *, device: str, amp: bool, compile: bool,
    batch_size: int, train: bool = False, environ: Mapping[str, str] = os.environ,
) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(python, repo, None) of the authors' environment, or (None, None, one-line reason why
    the comparison is skipped).

    ``python``/``repo`` default to ``$OFFICIAL_PY``/``$OFFICIAL_REPO``. Not given: skipped. A
    python or repository that does not exist raises :class:`ReferenceSettingsError` (never a
    silent skip). The reference runs float32 eager CPU only, and batch 1 unless ``train`` (the
    training reference takes any batch): other settings raise when the paths were given
    explicitly, and are skipped with a reason when they came from the environment variables (a
    machine-wide default must not fail every other run).
    """
    explicit = python is not None or repo is not None
    py = python or environ.get("OFFICIAL_PY")
    rp = repo or environ.get("OFFICIAL_REPO")
    if not py or not rp:
        if explicit:
            missing = "--official-repo" if py else "--official-python"
            raise ReferenceSettingsError(
                f"authors' reference: {missing} (or its variable) is missing")
        return None, None, _NOT_GIVEN
    if not os.path.isfile(py):
        raise ReferenceSettingsError(f"authors' reference: python {py!r} does not exist")
    if not os.path.isdir(rp):
        raise ReferenceSettingsError(f"authors' reference: repository {rp!r} is not a directory")
    if device != "cpu" or amp or compile or (batch_size != 1 and not train):
        reason = "authors' reference: only for float32 eager CPU runs (of batch 1 but --train)"
        if explicit:
            raise ReferenceSettingsError(reason)
        return None, None, reason + " ($OFFICIAL_PY/$OFFICIAL_REPO not used)"
    return py, rp, None


class OfficialReference:
    """One running worker. ``call(cmd)`` sends a command and returns the worker's JSON reply;
    :meth:`fn` makes a timed callable of a command (for the interleaved timing, which records
    the worker-reported ``wall_s``/``cpu_s``); :meth:`close` ends it (``quit``, else kill).

    Args:
        python: the authors' environment's interpreter.
        repo: their repository checkout.
        threads: torch threads of the worker (0: its default).
        size: (H, W) of its random image.
        worker: the worker script.
        env: variables added to this process's environment for the worker.
        extra_args: further worker arguments.
    """

    def __init__(self, python: str, repo: str, threads: int, size: Sequence[int],
                 worker: str = DEFAULT_WORKER, env: Optional[Dict[str, str]] = None,
                 extra_args: Sequence[str] = ()):
        self.python, self.repo, self.worker = python, repo, worker
        self._err = tempfile.TemporaryFile(mode="w+")
        cmd = [python, worker, "--repo", repo, "--size", str(size[0]), str(size[1])]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += list(extra_args)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            bufsize=1, env=None if env is None else {**os.environ, **env},
        )
        self.info: Optional[Dict[str, Any]] = None

    def _read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            tail = self._err.read()[-3000:]
            raise RuntimeError(
                f"official reference worker exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def ready(self) -> Dict[str, Any]:
        """Wait for the start-up line (model built, neck outputs computed); returns it."""
        if self.info is None:
            self.info = self._read()
            if not self.info.get("ready"):
                raise RuntimeError(
                    f"official reference worker: unexpected start-up reply {self.info}")
        return self.info

    def call(self, cmd: str) -> Dict[str, Any]:
        """Send one command, return its reply (``RuntimeError`` on an ``error`` reply)."""
        self.ready()
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"official reference worker, {cmd!r}: {reply['error']}")
        return reply

    def fn(self, cmd: str) -> Callable[[], Dict[str, Any]]:
        return lambda: self.call(cmd)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
