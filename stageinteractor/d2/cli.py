"""The command-line front shared by every tool: configs, overrides, checks and one-line errors.

A tool is a thin script over these functions::

    from stageinteractor.d2.cli import load_config, run_tool
    from stageinteractor.d2.checkpoint_files import load_weights

    def _main(argv):
        args = parse_args(argv)
        cfg = load_config(args.config_file, args.opts)       # strict overrides + switch check
        model = instantiate(cfg.model)
        load_weights(model, cfg.train.init_checkpoint, config_file=args.config_file)
        ...

    if __name__ == "__main__":
        sys.exit(run_tool(_main, tool="tools/my_tool.py"))

* :func:`run_tool` (from :mod:`stageinteractor.errors`) runs a tool's main: a
  :class:`~stageinteractor.errors.UserError` becomes ONE line ``<tool>: error: <message>`` on
  stderr and exit status 2; any other exception is a bug and keeps its traceback.
* :func:`load_config` loads a LazyConfig (a missing file is a one-line error; a config under
  ``<root>/projects/`` gets ``<root>`` on ``sys.path``), applies the ``key=value`` overrides
  strictly (:func:`apply_overrides_strict`: an unknown key names the key and the closest known
  ones) and checks the decoder switches (:func:`check_switches`: a bad value names the config key
  and the allowed values) -- all before the tool writes anything.
* :func:`check_num_classes` compares the model's ``num_classes`` keys with the categories of the
  datasets it will train on.
* :func:`split_overrides` lets flags follow the overrides on a command line,
  :func:`reclaim_overrides` takes back the overrides a ``nargs`` list option swallowed;
  :func:`cfg_get` reads a dotted key with a default.

Checkpoint checks live in :mod:`stageinteractor.d2.checkpoint_files`, dataset checks in
:mod:`stageinteractor.d2.data.validate`.
"""
from __future__ import annotations

import difflib
import inspect
import os
import sys
from typing import Any, Iterable, List, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from stageinteractor.errors import ConfigError, UserError, run_tool

__all__ = ["run_tool", "split_overrides", "reclaim_overrides", "load_config", "apply_overrides_strict",
           "check_switches", "check_num_classes", "num_classes_keys", "cfg_get", "ConfigError", "UserError"]


# ----------------------------------------------------------------------------------------------
# command lines
# ----------------------------------------------------------------------------------------------
def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(flags, overrides)``: the ``key=value`` tokens that are not ``--flag=value`` go to
    ``overrides``, so flags may follow the overrides on the command line."""
    overrides = [t for t in argv if "=" in t and not t.startswith("-")]
    flags = [t for t in argv if not ("=" in t and not t.startswith("-"))]
    return flags, overrides


def reclaim_overrides(args, dest: str) -> None:
    """Give back to ``args.opts`` the ``key=value`` overrides that the ``nargs`` list option
    ``dest`` swallowed (``--input a.png key=value``: :func:`split_overrides` puts overrides
    after the flags, so they follow the list's values). A value holding ``=`` that is an
    existing path stays in the list. Nothing happens when the option was not given (None)."""
    values = getattr(args, dest)
    if values is None:
        return
    extra = [v for v in values if "=" in v and not os.path.exists(v)]
    setattr(args, dest, [v for v in values if v not in extra])
    args.opts = list(args.opts) + extra


def cfg_get(node: Any, dotted: str, default: Any = None) -> Any:
    """``node.a.b.c`` for ``dotted="a.b.c"``, or ``default`` when a part is missing."""
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return default
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------
# configs and overrides
# ----------------------------------------------------------------------------------------------
def _add_projects_root(config_file: str) -> None:
    """A config under ``<root>/projects/...`` (detrex layout) imports ``projects.<name>``:
    put ``<root>`` on sys.path."""
    path = os.path.abspath(config_file)
    marker = os.sep + "projects" + os.sep
    if marker in path:
        root = path[: path.index(marker)]
        if root not in sys.path:
            sys.path.append(root)


def load_config(config_file: str, overrides: Iterable[str] = (), *,
                check: bool = True) -> DictConfig:
    """Load a LazyConfig, apply ``overrides`` strictly and (``check``) check the switches.

    Raises :class:`ConfigError` (one line) for a missing config file, an override that is not
    ``key=value``, an unknown key (with "did you mean") and a bad decoder switch value (naming
    the key and the allowed values). Nothing is written.
    """
    from detectron2.config import LazyConfig

    if not config_file or not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file!r} does not exist")
    _add_projects_root(config_file)
    cfg = apply_overrides_strict(LazyConfig.load(config_file), list(overrides))
    if check:
        check_switches(cfg)
    return cfg


def _all_keys(node, prefix: str = "") -> List[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            key = f"{prefix}{k}"
            out.append(key)
            try:
                child = node._get_node(k)
                child = node[k] if isinstance(child, (DictConfig, ListConfig)) else None
            except Exception:  # noqa: BLE001 - unresolved interpolation etc.
                child = None
            if child is not None:
                out.extend(_all_keys(child, key + "."))
    return out


_MISSING = object()


def _key_exists(cfg, key: str) -> bool:
    """Whether the dotted ``key`` (list indices allowed) exists; interpolations are followed."""
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) \
            is not _MISSING
    except Exception:  # noqa: BLE001 - e.g. indexing into a non-container value
        return False


def apply_overrides_strict(cfg, overrides: Sequence[str]):
    """Apply ``key=value`` overrides; an unknown key raises :class:`ConfigError` naming it and
    the closest known keys. ``+key=value`` creates a new key deliberately (its parent must
    exist)."""
    from detectron2.config import LazyConfig

    plain = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key = ov.split("=", 1)[0].strip()
        if key.startswith("+"):
            parent = key[1:].rsplit(".", 1)[0] if "." in key else ""
            if parent and not _key_exists(cfg, parent):
                raise ConfigError(f"unknown config key '{parent}' (parent of override "
                                  f"'{key[1:]}')")
            plain.append(ov[1:] if ov.startswith("+") else ov.replace("+", "", 1))
            continue
        if not _key_exists(cfg, key):
            close = difflib.get_close_matches(key, _all_keys(cfg), n=2, cutoff=0.8)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{key}' in override '{ov}'{hint} "
                              f"(prefix the override with '+' to add a new key)")
        plain.append(ov)
    try:
        return LazyConfig.apply_overrides(cfg, plain)
    except Exception as e:  # noqa: BLE001 - parser errors
        raise ConfigError(f"cannot apply overrides {list(overrides)}: {e}") from None


# ----------------------------------------------------------------------------------------------
# values checked before anything is built
# ----------------------------------------------------------------------------------------------
def _walk(node, path: str):
    """Yield ``(dotted path, DictConfig)`` for ``node`` and every dict below it."""
    if isinstance(node, DictConfig):
        yield path, node
        items = ((k, node._get_node(k)) for k in node.keys())
    elif isinstance(node, ListConfig):
        items = ((str(i), node._get_node(i)) for i in range(len(node)))
    else:
        return
    for k, child in items:
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _walk(child, f"{path}.{k}" if path else str(k))


def _target(node: DictConfig):
    """The callable named by a LazyCall node's ``_target_`` (an object or a dotted string)."""
    target = node.get("_target_", None) if "_target_" in node else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            return locate(target)
        except Exception:  # noqa: BLE001 - instantiate reports unknown targets itself
            return None
    return target


def check_switches(cfg) -> None:
    """Check the ablation switches of every StageInteractor decoder node in ``cfg.model``.

    Uses :func:`stageinteractor.core.switches.resolve_switches` (the one list of allowed values)
    on the node's arguments (the decoder's defaults for those not given); a bad value raises
    :class:`ConfigError` naming the config key, e.g. ``model.decoder.sampler='grouepd' is not
    allowed: sampler must be one of ('grouped', '3d', '3d_group_init'), got 'grouepd'``.
    """
    from stageinteractor.core.decoder import StageInteractorDecoder
    from stageinteractor.core.switches import resolve_switches

    names = list(inspect.signature(resolve_switches).parameters)
    defaults = {k: p.default for k, p in
                inspect.signature(StageInteractorDecoder).parameters.items()
                if k in names and p.default is not inspect.Parameter.empty}
    for path, node in _walk(cfg.get("model"), "model"):
        target = _target(node)
        if not (inspect.isclass(target) and issubclass(target, StageInteractorDecoder)):
            continue
        kwargs = dict(defaults, **{k: node[k] for k in names if k in node})
        try:
            resolve_switches(**kwargs)
        except ValueError as e:
            first = str(e).split(" ", 1)[0].split("=", 1)[0]
            if first in kwargs:
                raise ConfigError(f"{path}.{first}={kwargs[first]!r} is not allowed: {e}") \
                    from None
            raise ConfigError(f"{path}: {e}") from None


def num_classes_keys(cfg) -> List[Tuple[str, int]]:
    """``(dotted key, value)`` of every integer ``num_classes`` set in ``cfg.model`` (keys that
    are interpolations of another one are left out: the source key is named instead)."""
    found = []
    for path, node in _walk(cfg.get("model"), "model"):
        if "num_classes" in node and not OmegaConf.is_interpolation(node, "num_classes"):
            value = node["num_classes"]
            if isinstance(value, int) and not isinstance(value, bool):
                found.append((f"{path}.num_classes", value))
    return found


def check_num_classes(cfg, dataset_names: Iterable[str]) -> None:
    """Raise :class:`ConfigError` when a ``num_classes`` of ``cfg.model`` is smaller than the
    number of categories of one of ``dataset_names`` (detectron2 maps category ids to
    ``0..K-1``, so a smaller head cannot represent every ground truth). Datasets whose
    categories are unknown (no json file, no ``thing_classes``) are skipped."""
    from stageinteractor.d2.data.validate import dataset_categories

    keys = num_classes_keys(cfg)
    for name in dataset_names:
        cats = dataset_categories(name)
        if not cats:
            continue
        for key, value in keys:
            if value < len(cats):
                shown = ", ".join(cats[:8]) + (", ..." if len(cats) > 8 else "")
                raise ConfigError(
                    f"{key}={value} but dataset '{name}' has {len(cats)} categories ({shown}): "
                    f"set {key}={len(cats)}")
