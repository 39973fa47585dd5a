"""Locate and load detrex's own project configs (so a baseline row IS detrex's config).

detrex's ``get_config`` only resolves ``configs/common/...`` (installed under
``detrex/config/configs``); project configs such as
``projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py`` live in the detrex checkout and are
loaded here by absolute path with detectron2's ``LazyConfig.load``. Hyphenated folders
(``dino-resnet``) are fine this way.
"""

import os
from typing import Optional

__all__ = ["detrex_root", "detrex_project_config_path", "load_detrex_project_config"]

_ENV = "DETREX_ROOT"


def detrex_root() -> str:
    """The detrex checkout: ``$DETREX_ROOT`` if set, else the parent of the ``detrex`` package
    (editable install), else the folder holding the ``projects`` namespace package."""
    env = os.environ.get(_ENV)
    candidates = [env] if env else []
    try:
        import detrex

        candidates.append(os.path.dirname(os.path.dirname(os.path.abspath(detrex.__file__))))
    except ImportError:
        pass
    try:
        import projects

        candidates.extend(os.path.dirname(p) for p in getattr(projects, "__path__", []))
    except ImportError:
        pass
    for root in candidates:
        if root and os.path.isdir(os.path.join(root, "projects", "dino", "configs")):
            return root
    raise FileNotFoundError(
        "detrex checkout not found: set $DETREX_ROOT to the detrex repository root (the folder "
        f"holding projects/dino/configs); tried {candidates}"
    )


def detrex_project_config_path(rel_path: str, root: Optional[str] = None) -> str:
    """Absolute path of a detrex config given relative to the detrex root."""
    path = os.path.join(root or detrex_root(), rel_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detrex config {rel_path!r} not found at {path}")
    return path


def load_detrex_project_config(rel_path: str):
    """``LazyConfig.load`` of a detrex project config, e.g.
    ``"projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py"``; returns its DictConfig."""
    from detectron2.config import LazyConfig

    return LazyConfig.load(detrex_project_config_path(rel_path))
