"""Optional imports checked at a tool's start, with what to install when one is missing.

Each tool names the optional modules it needs in one line, before it imports them::

    from stageinteractor.requirements import require
    require("tools/export_onnx.py", "detectron2", "onnx", "onnxruntime")

When a module cannot be found the tool stops at once (``SystemExit`` with a message naming the
module, the pip package and the ``pyproject.toml`` extra that provides it), instead of failing
minutes later deep inside another library. The check uses ``importlib.util.find_spec``: it does
not import the module, so it costs microseconds.

Every pip package named in :data:`PROVIDERS` must be listed in the extra it names in
``pyproject.toml`` (``tests/core/test_import_sweep.py`` checks it), so this table cannot drift
from what ``make setup`` installs.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional, Tuple

__all__ = ["PROVIDERS", "MissingDependency", "missing_modules", "require", "install_hint"]

# importable module -> (pip package or None when it is built from source, pyproject extra)
PROVIDERS: Dict[str, Tuple[Optional[str], str]] = {
    "cv2": ("opencv-python-headless", "demo"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "matplotlib": ("matplotlib", "core"),
    "scipy": ("scipy", "core"),
    "fvcore": ("fvcore", "core"),
    "detectron2": (None, "detectron2"),
    "detrex": (None, "detrex"),
    "projects": (None, "detrex"),
    "timm": ("timm", "detrex"),
}

_SOURCE_HINT = {
    "detectron2": "detectron2 is built from source by `make setup` "
    "(offline: DETECTRON2_SRC=/path/to/detectron2 make setup)",
    "detrex": "detrex is built from source by `make setup` "
    "(offline: DETREX_SRC=/path/to/detrex make setup)",
}


class MissingDependency(SystemExit):
    """Raised by :func:`require`; ``missing`` lists the module names that were not found.

    A ``SystemExit`` so that a tool run from the shell prints only the message and exits with
    status 1 (no traceback); code that imports a tool can catch it and read ``missing``."""

    def __init__(self, message: str, missing: List[str]):
        super().__init__(message)
        self.message = message
        self.missing = list(missing)


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def missing_modules(*modules: str) -> List[str]:
    """The names among ``modules`` that cannot be imported (found) in this interpreter."""
    return [m for m in modules if not _found(m)]


def install_hint(module: str) -> str:
    """What to run to get ``module`` (one line)."""
    top = module.split(".")[0]
    if top == "projects":
        top = "detrex"
    pip_name, extra = PROVIDERS.get(top, (top, None))
    if pip_name is None:
        return _SOURCE_HINT.get(top, "run `make setup`")
    if extra == "core":
        return "`pip install %s` (a core dependency; `make setup` installs it)" % pip_name
    if extra:
        return "`pip install %s` (extra `%s` of pyproject.toml; `make setup` installs it)" % (
            pip_name, extra)
    return "`pip install %s`" % pip_name


def require(tool: str, *modules: str) -> None:
    """Stop ``tool`` with a clear message when any of ``modules`` is not installed."""
    missing = missing_modules(*modules)
    if not missing:
        return
    lines = ["%s: missing %s %s:" % (
        tool, "dependency" if len(missing) == 1 else "dependencies",
        ", ".join("`%s`" % m for m in missing))]
    for m in missing:
        lines.append("  %s: %s" % (m, install_hint(m)))
    raise MissingDependency("\n".join(lines), missing)
