#!/usr/bin/env python3
"""Import every module of the project in this (fresh) Python process; fail naming what is missing.

Run by the set-up step (``scripts/setup_env.py``) after it installed what ``pyproject.toml``
lists, so that a package the code imports but the set-up step does not install is caught at
set-up time instead of by a user::

    python scripts/import_sweep.py [--root REPO] [--package stageinteractor] [--scripts tools]

Two checks, over every ``.py`` file of the package (``--package``, imported as modules) and of
the scripts folder (``--scripts``, loaded from their files; their ``__main__`` blocks do not run):

1. the module is imported;
2. every ``import`` statement in the file is parsed (``ast``), including the ones inside
   functions that run only on some code paths (e.g. ``import onnx`` inside an export function),
   and the module it names is resolved with ``importlib.util.find_spec``. Imports inside a
   ``try:`` whose handler catches ``ImportError`` (or a parent of it) are optional and skipped.

A failure whose missing module belongs to a layer that is not installed here (``detectron2``;
``detrex`` / ``projects``) is reported as skipped, not as an error: the set-up step reports that
layer as unavailable on its own. Everything else that cannot be found is an error, printed as
``ERROR <file>:<line> <statement>: <reason>``. Exit status 1 when there is an error.
"""
import argparse
import ast
import importlib
import importlib.util
import os
import sys
import traceback
import warnings
from pathlib import Path

LAYER_OF_TOP = {"detectron2": "detectron2", "detrex": "detrex", "projects": "detrex"}
LAYER_PROBES = {"detectron2": ("detectron2", "detectron2.config"),
                "detrex": ("detrex", "projects.dino.modeling")}
OPTIONAL_HANDLERS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _handler_names(handler):
    t = handler.type
    if t is None:
        return {"BaseException"}
    elts = t.elts if isinstance(t, ast.Tuple) else [t]
    names = set()
    for e in elts:
        if isinstance(e, ast.Name):
            names.add(e.id)
        elif isinstance(e, ast.Attribute):
            names.add(e.attr)
    return names


class ImportCollector(ast.NodeVisitor):
    """Every absolute import of a file: (line, module, statement text, lazy, optional)."""

    def __init__(self, package=None):
        self.package = package  # for relative imports
        self.found = []
        self._depth = 0  # inside a function
        self._optional = 0  # inside try/except ImportError

    def visit_FunctionDef(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Try(self, node):
        optional = any(_handler_names(h) & OPTIONAL_HANDLERS for h in node.handlers)
        self._optional += optional
        for stmt in node.body:
            self.visit(stmt)
        self._optional -= optional
        for part in node.handlers + node.orelse + node.finalbody:
            self.visit(part)

    visit_TryStar = visit_Try

    def _add(self, node, module):
        self.found.append((node.lineno, module, ast.unparse(node) if hasattr(ast, "unparse")
                           else module, self._depth > 0, self._optional > 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level:
            if not self.package or node.module is None:
                return
            base = self.package.split(".")
            if node.level > 1:
                base = base[: -(node.level - 1)]
            self._add(node, ".".join(base + [node.module]))
        elif node.module != "__future__":
            self._add(node, node.module)


def collect_imports(path, package=None):
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    c = ImportCollector(package)
    c.visit(tree)
    return c.found


def module_files(root, package, scripts):
    """[(kind, name, path)] with kind "module" (importable name) or "script"."""
    out = []
    pkg_dir = root / package
    if pkg_dir.is_dir():
        for f in sorted(pkg_dir.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p == "__pycache__" for p in parts):
                continue
            out.append(("module", ".".join(parts), f))
    scripts_dir = root / scripts if scripts else None
    if scripts_dir is not None and scripts_dir.is_dir():
        for f in sorted(scripts_dir.glob("*.py")):
            out.append(("script", f.stem, f))
    return out


def _missing_name(exc):
    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        return exc.name
    missing = getattr(exc, "missing", None)  # stageinteractor.requirements.MissingDependency
    if missing:
        return missing[0]
    return None


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")


def layer_availability():
    out = {}
    for layer, names in LAYER_PROBES.items():
        out[layer] = True
        for n in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(n)
            except BaseException:  # noqa: BLE001 - a broken install may raise anything
                out[layer] = False
                break
    return out


def sweep(root, package, scripts):
    """Returns (errors, skipped, counts); errors and skipped are lists of text lines."""
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    layers = layer_availability()
    errors, skipped = [], []
    counts = {"modules": 0, "imports": 0}

    def classify(where, what, missing, reason):
        top = (missing or "").split(".")[0]
        layer = LAYER_OF_TOP.get(top)
        if layer is not None and not layers.get(layer, True):
            skipped.append("skipped %s %s (layer %s not installed)" % (where, what, layer))
        else:
            errors.append("ERROR %s %s: %s" % (where, what, reason))

    files = module_files(root, package, scripts)
    for kind, name, path in files:
        rel = path.relative_to(root)
        counts["modules"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "module":
                    importlib.import_module(name)
                else:
                    spec = importlib.util.spec_from_file_location("_import_sweep_" + name, path)
                    mod = importlib.util.module_from_spec(spec)
                    # registered as a real import would be (dataclasses, pickle and typing
                    # look a module up in sys.modules while it executes)
                    sys.modules[spec.name] = mod
                    try:
                        spec.loader.exec_module(mod)
                    finally:
                        sys.modules.pop(spec.name, None)
        except BaseException as e:  # noqa: BLE001 - SystemExit of a tool's requirement check too
            if isinstance(e, KeyboardInterrupt):
                raise
            missing = _missing_name(e)
            if getattr(e, "missing", None):  # a tool's start-up check: its whole message
                reason = " ".join(x.strip() for x in str(e).splitlines())
            else:
                reason = _first_line(e) if missing else "".join(
                    traceback.format_exception_only(type(e), e)).strip()
            classify(str(rel), "(import)", missing, reason)
        pkg = name if (kind == "module" and path.name == "__init__.py") else (
            name.rpartition(".")[0] if kind == "module" else None)
        for line, module, text, lazy, optional in collect_imports(path, pkg):
            if optional:
                continue
            counts["imports"] += 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    found = importlib.util.find_spec(module) is not None
                reason = "No module named %r" % module
                missing = module
            except BaseException as e:  # noqa: BLE001 - a parent package failing to import
                if isinstance(e, KeyboardInterrupt):
                    raise
                found, reason, missing = False, _first_line(e), _missing_name(e) or module
            if not found:
                classify("%s:%d" % (rel, line), "`%s`%s" % (text, " (inside a function)"
                                                             if lazy else ""), missing, reason)
    return errors, skipped, counts, layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                   help="project root holding the package and the scripts folder")
    p.add_argument("--package", default="stageinteractor", help="package to import, recursively")
    p.add_argument("--scripts", default="tools", help="folder of scripts to load ('' = none)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also list each import skipped because its layer is not installed")
    args = p.parse_args(argv)
    errors, skipped, counts, layers = sweep(args.root, args.package, args.scripts)
    if args.verbose:
        for line in skipped:
            print(line)
    for line in errors:
        print(line)
    print("import sweep: %d files, %d import statements checked, %d skipped (layers not "
          "installed: %s), %d error(s)" % (
              counts["modules"], counts["imports"], len(skipped),
              ", ".join(k for k, v in layers.items() if not v) or "none", len(errors)))
    return 1 if errors else 0


if __name__ == "__main__":
    # a tool's top level may change the process (e.g. torch threads); nothing here depends on it
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
