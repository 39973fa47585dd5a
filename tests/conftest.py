"""Test layers and their summary.

The tests live in one folder per layer:

* ``tests/core``   -- pure PyTorch; always runs.
* ``tests/d2``     -- needs detectron2; skipped (with the reason) when it is not importable.
* ``tests/detrex`` -- needs detrex and detrex's ``projects`` namespace; skipped likewise.

A test module of an unavailable layer is never imported (it would fail on its top-level
``import detectron2``): it is reported as skipped with a one-line reason. At the end of the
session one line per layer says what ran, e.g. ``layer core: 123 passed``, and the same lines
are written to ``.pytest_cache/stageinteractor_layers.txt`` (or ``$STAGEINTERACTOR_LAYER_SUMMARY``).

Tests marked ``gpu`` take the ``accel`` fixture (:class:`Accel`). With CUDA they run once on
``cuda``. Without CUDA they run on two **stand-in** devices instead of being skipped (issue 21),
so that placement, leaf/non-leaf, aliasing and device-branch mistakes fail on a CPU-only machine:

* ``meta``: forward **and** backward, no values; devices, shapes, dtypes and the autograd graph
  are real, a CPU tensor mixed in raises, a host read (``.item()``, ``.cpu()``) raises.
  (autocast has no ``meta`` type: inside :meth:`Accel.run` its queries answer as for the CPU.)
* ``fake_cuda``: ``FakeTensorMode`` with the tensors on ``cuda``: ``is_cuda`` is true, so the
  CUDA branches run; a CPU tensor mixed in raises ``FakeTensorDeviceMismatchError``, a host read
  raises ``DataDependentOutputException``. Forward only (backward needs a CUDA context).

Values are compared only on a real device: on a stand-in :meth:`Accel.require_values` skips
with :data:`VALUE_SKIP_REASON`. ``STAGEINTERACTOR_GPU_STANDINS=0`` skips the ``gpu`` tests
without CUDA instead (reason :data:`GPU_SKIP_REASON`). docs/DESIGN.md ("Stand-in devices")
says where each stand-in stops.
"""

import contextlib
import importlib
import os
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GPU_SKIP_REASON = "no CUDA device"  # the one skip reason .ci/clean_env.sh allows
# a value comparison on a stand-in device (ends with ": " + GPU_SKIP_REASON, which
# .ci/clean_env.sh lets through)
VALUE_SKIP_REASON = "values are compared on a real device only, this is a stand-in: " + GPU_SKIP_REASON
STANDINS = ("meta", "fake_cuda")
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
        "gpu: runs on CUDA, or without CUDA on the stand-in devices (meta, fake_cuda) of the "
        "`accel` fixture; STAGEINTERACTOR_GPU_STANDINS=0 skips them instead",
    )
    config.addinivalue_line(
        "markers", "standins(*kinds): the stand-in devices a gpu test supports (default: all)")


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
            if not cuda and not standins_enabled():
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


def standins_enabled():
    """Whether the ``gpu`` tests run on the stand-in devices without CUDA (the default;
    ``STAGEINTERACTOR_GPU_STANDINS=0`` skips them instead). The former
    ``STAGEINTERACTOR_GPU_DRY_RUN=1`` (CPU as the accelerator: self-comparisons) is gone; the
    variable is ignored."""
    return os.environ.get("STAGEINTERACTOR_GPU_STANDINS", "1") != "0"


def _cuda_available():
    return importlib.import_module("torch").cuda.is_available()


def pytest_generate_tests(metafunc):
    if "accel" not in metafunc.fixturenames:
        return
    if _cuda_available() or not standins_enabled():
        kinds = ["cuda"]
    else:
        marker = metafunc.definition.get_closest_marker("standins")
        kinds = [k for k in STANDINS if marker is None or k in marker.args]
    metafunc.parametrize("accel", kinds, indirect=True, ids=kinds)


class HostReadProbe:
    """Counts, independently of ``stageinteractor.core.op_count``, the host syncs a stand-in
    sees: scalar reads of device tensors (``aten._local_scalar_dense``; the stand-in then
    raises) and
    device->host copies (``_to_copy`` / ``copy_`` from the device to the CPU; they do not raise
    on ``fake_cuda``). Entered on top of the stand-in's mode (:meth:`Accel.run`)."""

    def __init__(self):
        self.scalar_reads = 0
        self.to_host = 0
        self.sites = []

    @property
    def total(self):
        return self.scalar_reads + self.to_host


def _probe_mode(probe):
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            ts = [a for a in args if hasattr(a, "device")]
            if name == "_local_scalar_dense" and ts and ts[0].device.type != "cpu":
                probe.scalar_reads += 1
                probe.sites.append(str(func))
            elif name == "_to_copy" and ts and ts[0].device.type != "cpu" and str(
                    kwargs.get("device", ts[0].device)) == "cpu":
                probe.to_host += 1
                probe.sites.append(str(func))
            elif name == "copy_" and len(ts) > 1 and ts[0].device.type == "cpu" and (
                    ts[1].device.type != "cpu"):
                probe.to_host += 1
                probe.sites.append(str(func))
            return func(*args, **kwargs)

    return _Mode()


@contextlib.contextmanager
def _autocast_knows_meta():
    """torch's autocast has no ``meta`` device type (``torch.autocast("meta", ...)`` and
    ``torch.is_autocast_enabled("meta")`` raise): while a model runs on ``meta`` they answer
    as for the CPU (autocast off), so that code which queries or disables autocast for its
    tensors' device runs there."""
    torch = importlib.import_module("torch")
    real_autocast, real_enabled = torch.autocast, torch.is_autocast_enabled

    def autocast(device_type, *args, **kwargs):
        return real_autocast("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    def is_autocast_enabled(*args):
        if args and str(args[0]) == "meta":
            args = ("cpu",) + args[1:]
        return real_enabled(*args)

    torch.autocast, torch.is_autocast_enabled = autocast, is_autocast_enabled
    try:
        yield
    finally:
        torch.autocast, torch.is_autocast_enabled = real_autocast, real_enabled


class Accel:
    """The device of a ``gpu`` test: ``cuda``, or a stand-in (``meta`` / ``fake_cuda``).

    Attributes: ``kind``; ``device`` (``cuda`` for ``cuda`` and ``fake_cuda``, else ``meta``);
    ``real`` (values exist); ``backward`` (autograd runs: not on ``fake_cuda``).
    """

    def __init__(self, kind):
        torch = importlib.import_module("torch")
        self.kind = kind
        self.real = kind == "cuda"
        self.backward = kind != "fake_cuda"
        self.device = torch.device("meta" if kind == "meta" else "cuda")
        self.mode = None
        if kind == "fake_cuda":
            from torch._subclasses.fake_tensor import FakeTensorMode

            # non-fake (CPU) inputs are converted, so a CPU tensor mixed in still raises the
            # device mismatch (and a 0-dim one is allowed, as on CUDA)
            self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def __repr__(self):
        return "Accel(%s)" % self.kind

    def build(self, factory, *args, **kwargs):
        """``factory(*args, **kwargs)`` with its modules and tensors created on the device
        (``meta``: under ``torch.device("meta")``; ``fake_cuda``: under the fake mode and
        ``torch.device("cuda")``; ``cuda``: built on the CPU), then a module is moved there
        (:meth:`to`) like a real run's ``model.to(device)``."""
        torch = importlib.import_module("torch")
        if self.kind == "cuda":
            return self.to(factory(*args, **kwargs))
        ctx = contextlib.ExitStack()
        with ctx:
            if self.mode is not None:
                ctx.enter_context(self.mode)
            ctx.enter_context(torch.device(self.device))
            out = factory(*args, **kwargs)
        # then moved, as a real run moves a built model: what the constructor made on the CPU
        # regardless of the default device (``torch.Tensor(n)``, explicit ``device="cpu"``)
        return self.to(out) if isinstance(out, torch.nn.Module) else out

    def to(self, obj):
        """A CPU tensor (detached copy), module (in place) or list/tuple/dict of them on the
        device. On ``fake_cuda`` parameters and buffers are replaced by fake CUDA tensors of the
        same shapes, strides and ``requires_grad``."""
        torch = importlib.import_module("torch")
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.to(v) for v in obj)
        if isinstance(obj, dict):
            return {k: self.to(v) for k, v in obj.items()}
        if isinstance(obj, torch.nn.Module):
            if self.mode is None:
                return obj.to(self.device)
            for mod in obj.modules():
                for n, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[n] = torch.nn.Parameter(
                            self._fake(p.detach()), requires_grad=p.requires_grad)
                for n, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[n] = self._fake(b)
            return obj
        if torch.is_tensor(obj):
            if self.mode is not None:
                return self._fake(obj.detach())
            return obj.detach().to(self.device, copy=True)
        return obj

    def _fake(self, t):
        if t.device.type == "cuda":
            return t
        with self.mode:
            return self.mode.from_tensor(t).to("cuda")

    @contextlib.contextmanager
    def run(self, probe=None):
        """Context for running the model on the device (``fake_cuda``: the fake mode, without
        a default device, so that a tensor created without ``device=`` stays on the CPU and
        a mix-up raises). ``probe``: a :class:`HostReadProbe` to count host reads."""
        with contextlib.ExitStack() as stack:
            if self.kind == "meta":
                stack.enter_context(_autocast_knows_meta())
            if self.mode is not None:
                stack.enter_context(self.mode)
            if probe is not None:
                stack.enter_context(_probe_mode(probe))
            yield

    def require_values(self):
        """Skip (:data:`VALUE_SKIP_REASON`) unless values can be compared (real CUDA)."""
        if not self.real:
            pytest.skip(VALUE_SKIP_REASON)


@pytest.fixture
def accel(request):
    """The device of a ``gpu`` test (see :class:`Accel`); parametrized by
    ``pytest_generate_tests``. On CUDA, TF32 is off while the test runs (float32 comparisons
    with the CPU)."""
    torch = importlib.import_module("torch")
    acc = Accel(request.param)
    if not acc.real:
        yield acc
        return
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield acc
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture
def host_probe():
    """A fresh :class:`HostReadProbe` (give it to ``accel.run(probe)``)."""
    return HostReadProbe()


@pytest.fixture
def real_cuda():
    """True when the ``gpu`` tests run on a real CUDA device."""
    return _cuda_available()


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
