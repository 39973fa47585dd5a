"""Test layers and their summary.

The tests live in one folder per layer:

* ``tests/core``   -- pure PyTorch; always runs.
* ``tests/d2``     -- needs detectron2; skipped (with the reason) when it is not importable.
* ``tests/detrex`` -- needs detrex and detrex's ``projects`` namespace; skipped likewise.

A test module of an unavailable layer is never imported (it would fail on its top-level
``import detectron2``): it is reported as skipped with a one-line reason. At the end of the
session one line per layer says what ran, e.g. ``layer core: 123 passed``, and the same lines
are written to ``.pytest_cache/stageinteractor_layers.txt`` (or ``$STAGEINTERACTOR_LAYER_SUMMARY``).
"""

import importlib
import os
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GPU_SKIP_REASON = "no CUDA device"  # the one skip reason .ci/clean_env.sh allows
# folder under tests/ -> layer name, in report order
LAYERS = OrderedDict([("core", "core"), ("d2", "detectron2"), ("detrex", "detrex")])
HOW_TO = {
    "detectron2": "run `make setup` with DETECTRON2_SRC=/path/to/detectron2 "
    "(checkout or git dir) or with access to github.com",
    "detrex": "run `make setup` with DETREX_SRC=/path/to/detrex "
    "(checkout or git dir) or with access to github.com",
}

_availability = {}  # layer -> None (available) or reason string
_outcomes = {}  # layer -> Counter
_skipped_modules = {}  # layer -> number of modules skipped at collection


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0]) if text else type(exc).__name__


def _try_import(*names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
                if getattr(mod, "__file__", None) is None and "." not in name:
                    # a bare folder of that name on sys.path (e.g. tests/detrex) imports as an
                    # empty namespace package; that is not the library
                    return "`import %s` finds only a namespace folder %s" % (
                        name, list(getattr(mod, "__path__", [])))
            except BaseException as e:  # noqa: BLE001 - a broken install may raise anything
                return "`import %s` fails (%s)" % (name, _first_line(e))
    return None


def layer_unavailable(layer):
    """None if the layer's dependencies import, else a one-line reason (cached)."""
    if layer not in _availability:
        reason = None
        if layer == "detectron2":
            err = _try_import("detectron2", "detectron2.config")
            if err:
                reason = "detectron2 not installed: %s; %s" % (err, HOW_TO["detectron2"])
        elif layer == "detrex":
            err = _try_import("detectron2")
            if err:
                reason = "detrex layer needs detectron2: %s; %s" % (err, HOW_TO["detectron2"])
            else:
                err = _try_import("detrex")
                if err:
                    reason = "detrex not installed: %s; %s" % (err, HOW_TO["detrex"])
                else:
                    err = _try_import("projects.dino.modeling")
                    if err:
                        reason = (
                            "detrex `projects` not importable: %s; run `make setup` "
                            "(it links detrex's projects/ into site-packages)" % err
                        )
        _availability[layer] = reason
    return _availability[layer]


def layer_of(path):
    p = Path(str(path))
    if not p.is_absolute():  # report paths are relative to the rootdir
        p = _ROOT[0] / p
    try:
        rel = p.resolve().relative_to(TESTS)
    except ValueError:
        return "other"
    if len(rel.parts) > 1 and rel.parts[0] in LAYERS:
        return LAYERS[rel.parts[0]]
    return "other"


_ROOT = [TESTS.parent]


def pytest_configure(config):
    _ROOT[0] = Path(str(config.rootpath))
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA device; skipped when none is available (STAGEINTERACTOR_GPU_DRY_RUN=1 "
        "runs them on the CPU instead)",
    )


class _SkippedLayerModule(pytest.Module):
    """Stands in for a test module of an unavailable layer; never imports it."""

    def collect(self):
        raise pytest.skip.Exception(self.skip_reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    layer = layer_of(module_path)
    if layer in ("detectron2", "detrex"):
        reason = layer_unavailable(layer)
        if reason:
            mod = _SkippedLayerModule.from_parent(parent, path=module_path)
            mod.skip_reason = reason
            return mod
    return None


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        layer = layer_of(item.path)
        if layer in ("detectron2", "detrex"):
            reason = layer_unavailable(layer)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("gpu") is not None:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda and not gpu_dry_run():
                item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


def pytest_collectreport(report):
    if report.skipped and report.nodeid:
        layer = layer_of(report.fspath)
        _skipped_modules[layer] = _skipped_modules.get(layer, 0) + 1
    elif report.failed:
        layer = layer_of(report.fspath) if report.nodeid else "other"
        _outcomes.setdefault(layer, Counter())["collection errors"] += 1


def pytest_deselected(items):
    for item in items:
        _outcomes.setdefault(layer_of(item.path), Counter())["deselected"] += 1


def pytest_runtest_logreport(report):
    c = _outcomes.setdefault(layer_of(report.fspath), Counter())
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            c["xfailed" if report.skipped else "xpassed"] += 1
        else:
            c[report.outcome] += 1
    elif report.when == "setup" and not report.passed:
        c["skipped" if report.skipped else "errors"] += 1
    elif report.when == "teardown" and report.failed:
        c["errors"] += 1


ORDER = ["passed", "failed", "errors", "collection errors", "skipped", "xfailed", "xpassed",
         "deselected"]


def layer_lines():
    lines = []
    names = list(LAYERS.values())
    if "other" in _outcomes or "other" in _skipped_modules:
        names.append("other")
    for layer in names:
        c = _outcomes.get(layer, Counter())
        counts = ", ".join("%d %s" % (c[k], k) for k in ORDER if c.get(k))
        reason = layer_unavailable(layer) if layer in ("detectron2", "detrex") else None
        if reason:
            n = _skipped_modules.get(layer, 0)
            files = " (%d test file%s)" % (n, "" if n == 1 else "s") if n else ""
            lines.append("layer %s: skipped%s - %s" % (layer, files, reason))
        elif counts:
            lines.append("layer %s: %s" % (layer, counts))
        elif _skipped_modules.get(layer):
            lines.append("layer %s: %d test file(s) skipped at collection" % (
                layer, _skipped_modules[layer]))
        else:
            lines.append("layer %s: no tests collected" % layer)
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = layer_lines()
    terminalreporter.section("test layers")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get("STAGEINTERACTOR_LAYER_SUMMARY")
    path = Path(target) if target else Path(str(config.rootpath)) / ".pytest_cache" / (
        "stageinteractor_layers.txt")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        pass


def gpu_dry_run():
    """STAGEINTERACTOR_GPU_DRY_RUN=1: run the ``gpu`` tests without a GPU, on the CPU (the
    "accelerator" is then the CPU itself: every comparison runs, trivially exact)."""
    return os.environ.get("STAGEINTERACTOR_GPU_DRY_RUN", "") == "1"


@pytest.fixture
def real_cuda():
    """True when the ``gpu`` tests run on a real CUDA device."""
    return importlib.import_module("torch").cuda.is_available()


@pytest.fixture
def accel_device(real_cuda):
    """The device of the ``gpu`` tests: ``cuda`` when there is one, else (dry run) ``cpu``.
    On CUDA, TF32 is off while the test runs (float32 comparisons with the CPU)."""
    torch = importlib.import_module("torch")
    if not real_cuda:
        yield torch.device("cpu")
        return
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _global_torch_state_is_restored():
    """A test (or a tool's ``main()`` called in-process) that leaves autograd switched off makes
    unrelated later tests fail far from the cause; fail the culprit instead."""
    torch = importlib.import_module("torch")
    grad_enabled = torch.is_grad_enabled()
    yield
    if torch.is_grad_enabled() != grad_enabled:
        torch.set_grad_enabled(grad_enabled)
        pytest.fail("this test changed torch's global grad mode and did not restore it")
