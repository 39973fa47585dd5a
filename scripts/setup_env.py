#!/usr/bin/env python3
"""The one idempotent set-up step behind ``make setup``, ``make test`` and ``make demo``.

Run it with the Python it should set up (``make`` uses ``$(PYTHON)``, default ``python3``).
What it does, in order (each step is skipped when its result is already in place, so a
run with nothing to do only probes the environment):

1. PyPI packages: every requirement of ``pyproject.toml`` -- the dependencies and all the
   extras (``test``, ``demo``, ``onnx``, ``detectron2``, ``detrex``) -- that is not already
   satisfied is installed; ``pyproject.toml`` is the one list. Then this checkout itself
   (``pip install -e . --no-deps``) when ``stageinteractor`` is not importable.
2. detectron2 and detrex (no wheels on PyPI): when one is not installed, its wheel is taken
   from the wheel cache (``~/.cache/stageinteractor/wheels``, keyed by the source commit, the
   torch version, the Python version and cpu/CUDA ops) or built into it from source
   (``$DETECTRON2_SRC`` / ``$DETREX_SRC``: a checkout or a git directory; else a clone of the
   upstream repository, kept in ``~/.cache/stageinteractor/src``), then installed. A package
   that is installed but does not import is never rebuilt: the step names the module that is
   missing. When torch sees CUDA (or FORCE_CUDA=1) the C++ ops are built with their CUDA
   kernels (FORCE_CUDA=1, CUDA_HOME: a CUDA toolkit with nvcc is required, else the step fails
   saying so); then one CUDA tensor goes through detrex's MultiScaleDeformableAttention, and a
   detrex installed without its CUDA kernel ("Not compiled with GPU support") is rebuilt.
3. detrex's ``projects`` namespace (``from projects.dino.modeling import DINO``) is made
   importable through a folder in site-packages holding only a ``projects`` symlink to the
   detrex source, listed in a ``.pth`` file (the detrex source root itself would shadow the
   installed ``detrex`` package).
4. ``scripts/import_sweep.py`` imports every module of ``stageinteractor/`` and ``tools/`` (and
   resolves the imports inside their functions) in a fresh process: a module that needs a
   package that is not installed fails the step, naming the package.

It ends with one line per layer (core, detectron2, detrex) and per extra (demo pictures, ONNX
export) saying what is available. A layer that cannot be provided (no source reachable) is
reported with what is skipped because of it; it is an error only where
``STAGEINTERACTOR_REQUIRE_LAYERS`` asks for it. Exit status: 0 when set up, 1 when a
requirement could not be installed, the import sweep failed or a required layer is missing.

Environment variables:
  DETECTRON2_SRC, DETREX_SRC      local checkout (folder with setup.py), git directory or git URL
  DETECTRON2_GIT_URL, DETREX_GIT_URL   upstream repositories (defaults: GitHub)
  STAGEINTERACTOR_DEPS_DIR        where sources are cloned (default ~/.cache/stageinteractor/src)
  STAGEINTERACTOR_WHEEL_CACHE     built wheels (default ~/.cache/stageinteractor/wheels)
  STAGEINTERACTOR_OFFLINE=1       never contact a git server (local sources and caches only)
  STAGEINTERACTOR_REQUIRE_LAYERS  comma list of layers that must be available
                                  (core,detectron2,detrex) or "all"
  SKIP_DETECTRON2=1, SKIP_DETREX=1   do not try to install that dependency
  FORCE_CUDA=0|1                  build the C++ ops without / with CUDA (default: with, when
                                  torch sees a CUDA device); CUDA_HOME: the toolkit to use
  GIT_TIMEOUT (s, default 60)     limit for reaching a git server; clones get 15x that
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_URLS = {
    "detectron2": "https://github.com/facebookresearch/detectron2",
    "detrex": "https://github.com/IDEA-Research/detrex",
}
ENV_SRC = {"detectron2": "DETECTRON2_SRC", "detrex": "DETREX_SRC"}
ENV_URL = {"detectron2": "DETECTRON2_GIT_URL", "detrex": "DETREX_GIT_URL"}
ENV_SKIP = {"detectron2": "SKIP_DETECTRON2", "detrex": "SKIP_DETREX"}
LAYERS = ("core", "detectron2", "detrex")
# pyproject.toml extras, in install order; a layer's extra is skipped with the layer
EXTRAS = ("test", "demo", "onnx", "detectron2", "detrex")
# installed first, with build isolation: the rest is installed with --no-build-isolation
# (sdists such as fairscale's import torch in their setup.py)
BUILD_FIRST = ("torch", "torchvision", "setuptools", "wheel")
PTH_NAME = "stageinteractor_detrex_projects"

PROBE = r"""
import importlib, json, sys, sysconfig, site, warnings
warnings.filterwarnings("ignore")
out = {"python": sys.executable, "purelib": sysconfig.get_paths()["purelib"],
       "py": "%d.%d" % sys.version_info[:2]}
try:
    out["usersite"] = site.getusersitepackages() if site.ENABLE_USER_SITE else None
except Exception:
    out["usersite"] = None

def probe(name):
    try:
        m = importlib.import_module(name)
        return {"ok": True, "file": getattr(m, "__file__", None),
                "version": str(getattr(m, "__version__", ""))}
    except BaseException as e:
        return {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""),
                "missing": getattr(e, "name", None) if isinstance(e, ImportError) else None}

from importlib import metadata
def dist(name):
    try:
        d = metadata.distribution(name)
        try:
            du = d.read_text("direct_url.json")
        except Exception:
            du = None
        return {"version": d.version, "direct_url": du}
    except Exception:
        return None

mods = {}
mods["torch"] = probe("torch")
if mods["torch"]["ok"]:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
    out["torch_cuda"] = torch.version.cuda
for n in NAMES:
    mods[n] = probe(n)
out["dists"] = {n: dist(n) for n in ("detectron2", "detrex", "stageinteractor")}
if mods["detrex"]["ok"]:
    try:
        import projects
        out["projects_path"] = [str(p) for p in projects.__path__]
    except BaseException:
        out["projects_path"] = []
out["mods"] = mods
print("@@PROBE@@" + json.dumps(out))
"""
PROBE_NAMES = ["torchvision", "stageinteractor", "cv2", "onnx", "onnxruntime", "detectron2",
               "detectron2.config", "detrex", "projects.dino.modeling"]


def say(msg=""):
    print("[setup] " + msg, flush=True)


def truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------
# pyproject.toml: the one list of requirements


def _parse_toml_lists(text):
    """Minimal reader for the two tables this script needs, for Pythons without tomllib:
    ``[project] dependencies`` and ``[project.optional-dependencies]`` (lists of strings)."""
    deps, extras, table = [], {}, None
    i, lines = 0, text.splitlines()
    while i < len(lines):
        line = lines[i].split("#", 1)[0].strip() if not lines[i].strip().startswith('"') else (
            lines[i].strip())
        if line.startswith("["):
            table = line.strip("[]").strip()
        elif "=" in line and table in ("project", "project.optional-dependencies"):
            key, rest = [x.strip() for x in line.split("=", 1)]
            if rest.startswith("["):
                body = rest
                while "]" not in body.split("#", 1)[0] and i + 1 < len(lines):
                    i += 1
                    body += " " + lines[i].split("#", 1)[0]
                items = re.findall(r'"([^"]*)"', body)
                if table == "project" and key == "dependencies":
                    deps = items
                elif table == "project.optional-dependencies":
                    extras[key] = items
        i += 1
    return deps, extras


def read_requirements(pyproject=None):
    """(dependencies, {extra: [requirements]}) of ``pyproject.toml``."""
    path = Path(pyproject) if pyproject else REPO / "pyproject.toml"
    text = path.read_text()
    try:
        import tomllib
    except ImportError:
        return _parse_toml_lists(text)
    data = tomllib.loads(text)
    project = data.get("project", {})
    return list(project.get("dependencies", [])), dict(project.get("optional-dependencies", {}))


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip vendors it; every environment that can run pip has it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


def unsatisfied(requirements):
    """The requirement strings whose distribution is not installed in this interpreter, or
    installed at a version outside the specifier. Environment markers are honoured."""
    from importlib import metadata

    Requirement, _ = _packaging()
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(text)
    return out


def requirement_name(text):
    Requirement, canonicalize_name = _packaging()
    return canonicalize_name(Requirement(text).name)


# --------------------------------------------------------------------------------------------
# probing and installing


def clean_env():
    """os.environ without this checkout on PYTHONPATH: "importable" must mean "installed"."""
    env = dict(os.environ)
    pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    pp = [p for p in pp if Path(p).resolve() != REPO]
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    else:
        env.pop("PYTHONPATH", None)
    return env


def probe_env():
    """Import-probe this interpreter in a fresh process, from a neutral directory."""
    code = "NAMES = %r\n" % (PROBE_NAMES,) + PROBE
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=clean_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("@@PROBE@@"):
            return json.loads(line[len("@@PROBE@@"):])
    say("could not probe the Python environment:")
    print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
    sys.exit(1)


def ok(state, name):
    return state["mods"].get(name, {}).get("ok", False)


def err(state, name):
    return state["mods"].get(name, {}).get("error", "not probed")


def pip_install(args, extra_env=None, quiet=True):
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    cmd += list(args)
    env = dict(os.environ)
    env.setdefault("PIP_DEFAULT_TIMEOUT", "60")
    if extra_env:
        env.update(extra_env)
    say("$ pip install " + " ".join(cmd[5:]))
    return subprocess.run(cmd, env=env).returncode == 0


def wanted_requirements(skip_layers=()):
    """pyproject's dependencies plus the extras of the layers not skipped, deduplicated."""
    deps, extras = read_requirements()
    want = list(deps)
    for name in EXTRAS:
        if name in skip_layers:
            continue
        if name not in extras:
            raise SystemExit("[setup] ERROR: pyproject.toml has no extra %r (expected %s)" % (
                name, ", ".join(EXTRAS)))
        want += extras[name]
    seen, out = set(), []
    for r in want:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def install_requirements(skip_layers=()):
    """Install what pyproject.toml lists and this interpreter lacks. Returns True if pip ran."""
    missing = unsatisfied(wanted_requirements(skip_layers))
    if not missing:
        return False
    first = [r for r in missing if requirement_name(r) in BUILD_FIRST]
    rest = [r for r in missing if r not in first]
    # every call carries the pins of the build requirements, so that no resolve moves them
    # (torch depends on setuptools, which must stay < 81 for pkg_resources)
    pins = [r for r in wanted_requirements(skip_layers) if requirement_name(r) in BUILD_FIRST]
    if first:
        say("installing build requirements: " + " ".join(first))
        if not pip_install(first + [p for p in pins if p not in first]):
            raise SystemExit("[setup] ERROR: could not install %s (see pip's message above)"
                             % " ".join(first))
    if rest:
        say("installing missing requirements of pyproject.toml: " + " ".join(rest))
        if not pip_install(["--no-build-isolation"] + rest + pins):
            raise SystemExit("[setup] ERROR: could not install %s (see pip's message above)"
                             % " ".join(rest))
    return True


def install_self(state):
    if ok(state, "stageinteractor"):
        return False
    say("stageinteractor is not installed; installing this checkout in editable mode")
    if not pip_install(["--no-build-isolation", "--no-deps", "-e", str(REPO)]):
        say("WARNING: `pip install -e .` failed; the make targets still work because they put "
            "this checkout on PYTHONPATH")
    return True


# --------------------------------------------------------------------------------------------
# sources and the wheel cache


def git(args, timeout):
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    try:
        r = subprocess.run(["git"] + list(args), env=env, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return False, "timed out after %ds" % timeout
    except FileNotFoundError:
        return False, "git is not installed"
    out = (r.stdout if r.returncode == 0 else (r.stderr or r.stdout)).strip().splitlines()
    return r.returncode == 0, (out[-1] if out else "")


def is_checkout(path):
    return bool(path) and (Path(path) / "setup.py").is_file()


def is_git_dir(path):
    p = Path(path)
    return p.is_dir() and ((p / "HEAD").is_file() and (p / "objects").is_dir()
                           or (p / ".git").exists())


def source_commit(path):
    """HEAD commit of a checkout or a git directory, or None."""
    p = Path(path)
    args = ["--git-dir", str(p)] if (p / "HEAD").is_file() and (p / "objects").is_dir() else [
        "-C", str(p)]
    good, out = git(args + ["rev-parse", "HEAD"], 30)
    return out.strip() if good and re.fullmatch(r"[0-9a-f]{40}", out.strip()) else None


def deps_dir():
    d = os.environ.get("STAGEINTERACTOR_DEPS_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "stageinteractor" / "src"


def wheel_cache_dir():
    d = os.environ.get("STAGEINTERACTOR_WHEEL_CACHE")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "stageinteractor" / "wheels"


def wheel_cache_key(name, commit, torch_version, python_version, cuda):
    """Folder name of a built wheel: the wheel depends on the source, on the torch it was
    compiled against (C++ ABI), on the Python and on whether the CUDA ops were built."""
    device = "cu" + str(cuda).replace(".", "") if cuda else "cpu"
    safe_torch = re.sub(r"[^0-9A-Za-z.]+", "_", str(torch_version))
    return "%s-%s-torch%s-py%s-%s" % (name, commit[:12], safe_torch,
                                      str(python_version).replace(".", ""), device)


def cached_wheel(key):
    d = wheel_cache_dir() / key
    wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
    return wheels[-1] if wheels else None


def clone(source, dest, timeout, shallow):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = ["clone", "--quiet"] + (["--depth", "1"] if shallow else []) + [str(source), str(tmp)]
    good, msg = git(args, timeout)
    if not good:
        shutil.rmtree(tmp, ignore_errors=True)
        return False, msg
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return True, ""


def find_source(name):
    """Return (checkout_dir or None, reason-if-None). A git directory (or a git URL) is cloned
    into the source cache once per commit; a checkout is used in place."""
    git_timeout = int(os.environ.get("GIT_TIMEOUT", "60"))
    src = os.environ.get(ENV_SRC[name], "").strip()
    cached = deps_dir() / name
    marker = cached / ".stageinteractor_source"
    if src:
        if is_checkout(src):
            return Path(src).resolve(), ""
        looks_remote = "://" in src or src.startswith("git@")
        if not looks_remote and not is_git_dir(src):
            return None, "%s=%s is neither a checkout (no setup.py) nor a git directory" % (
                ENV_SRC[name], src)
        if is_checkout(cached) and marker.is_file() and marker.read_text().strip() == src and (
                looks_remote or source_commit(src) == source_commit(cached)):
            return cached, ""
        if looks_remote and truthy("STAGEINTERACTOR_OFFLINE"):
            return None, "%s=%s is remote and STAGEINTERACTOR_OFFLINE is set" % (ENV_SRC[name], src)
        say("cloning %s from %s into %s" % (name, src, cached))
        good, msg = clone(src, cached, git_timeout * 15, shallow=looks_remote)
        if not good:
            return None, "could not clone %s=%s (%s)" % (ENV_SRC[name], src, msg)
        marker.write_text(src + "\n")
        return cached, ""
    if is_checkout(cached):
        return cached, ""
    url = os.environ.get(ENV_URL[name], DEFAULT_URLS[name])
    if truthy("STAGEINTERACTOR_OFFLINE"):
        return None, "STAGEINTERACTOR_OFFLINE is set, %s is not set and %s holds no copy" % (
            ENV_SRC[name], cached)
    say("reaching %s (timeout %ds) ..." % (url, git_timeout))
    good, msg = git(["ls-remote", "--heads", url], git_timeout)
    if not good:
        return None, "could not reach %s (%s)" % (url, msg)
    say("cloning %s into %s" % (url, cached))
    good, msg = clone(url, cached, git_timeout * 15, shallow=True)
    if not good:
        return None, "could not clone %s (%s)" % (url, msg)
    marker.write_text(url + "\n")
    return cached, ""


class SetupError(RuntimeError):
    """A step cannot go on; the message says what to provide."""


# where a CUDA toolkit is looked for when neither CUDA_HOME/CUDA_PATH nor nvcc on PATH says
DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)
# detrex's C++ op raises this when it was built without CUDA and is given a CUDA tensor
NO_GPU_SUPPORT = "Not compiled with GPU support"


def cuda_ops_wanted(state):
    """Whether detectron2's / detrex's C++ ops are built with their CUDA kernels: FORCE_CUDA
    when set ("1" yes, "0" no), else whether this torch sees a CUDA device."""
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force:
        return force not in ("0", "false", "False", "no")
    return bool(state.get("cuda", False))


def find_cuda_home():
    """The CUDA toolkit to compile with: $CUDA_HOME / $CUDA_PATH, else the folder above the
    ``nvcc`` on PATH, else one of :data:`DEFAULT_CUDA_HOMES`; None when there is no nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var, "").strip()
        if home:
            return home if (Path(home) / "bin" / "nvcc").is_file() else None
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    for home in DEFAULT_CUDA_HOMES:
        if (Path(home) / "bin" / "nvcc").is_file():
            return home
    return None


def build_env(state):
    """Environment for building the C++ ops: ``FORCE_CUDA=1`` and ``CUDA_HOME`` when the CUDA
    kernels are wanted (:func:`cuda_ops_wanted`; raises :class:`SetupError` when there is no
    CUDA toolkit), ``FORCE_CUDA=0`` otherwise."""
    env = {"MAX_JOBS": str(os.environ.get("MAX_JOBS", os.cpu_count() or 1))}
    if not cuda_ops_wanted(state):
        env["FORCE_CUDA"] = "0"  # CPU-only build of the C++ ops
        return env
    home = find_cuda_home()
    if home is None:
        raise SetupError(
            "torch sees CUDA (built with CUDA %s), so detectron2/detrex must be built with "
            "their CUDA ops (without them DINO fails on the GPU with \"%s\"), but no CUDA "
            "toolkit was found: no nvcc under $CUDA_HOME / $CUDA_PATH, on PATH or in %s. "
            "Install the CUDA %s toolkit and set CUDA_HOME to it (or set FORCE_CUDA=0 for a "
            "CPU-only build of the ops)" % (state.get("torch_cuda"), NO_GPU_SUPPORT,
                                            ", ".join(DEFAULT_CUDA_HOMES), state.get("torch_cuda")))
    env["FORCE_CUDA"] = "1"
    env["CUDA_HOME"] = home
    return env


DETREX_CUDA_CHECK = r"""
import json, torch
from detrex.layers import MultiScaleDeformableAttention
attn = MultiScaleDeformableAttention(embed_dim=32, num_heads=2, num_levels=1, num_points=2,
                                     batch_first=True).cuda()
value = torch.randn(1, 16, 32, device="cuda")
query = torch.randn(1, 3, 32, device="cuda")
ref = torch.rand(1, 3, 1, 2, device="cuda")
shapes = torch.tensor([[4, 4]], device="cuda")
start = torch.tensor([0], device="cuda")
out = attn(query, value=value, reference_points=ref, spatial_shapes=shapes, level_start_index=start)
torch.cuda.synchronize()
print("@@CUDA_OK@@", json.dumps(list(out.shape)))
"""


def check_detrex_cuda_ops():
    """One CUDA tensor through detrex's ``MultiScaleDeformableAttention`` (its CUDA kernel) in a
    fresh process. Returns None when it ran, else the error text."""
    r = subprocess.run([sys.executable, "-c", DETREX_CUDA_CHECK], cwd=tempfile.gettempdir(),
                       env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600)
    if r.returncode == 0 and "@@CUDA_OK@@" in r.stdout:
        return None
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "exit status %d" % r.returncode


def ensure_detrex_cuda_ops(state, failures):
    """With a CUDA device: check detrex's CUDA kernel; a detrex built without it (CPU-only
    wheel) is rebuilt with the CUDA ops and reinstalled. Returns True when it reinstalled."""
    if not (state.get("cuda") and ok(state, "detrex")) or not cuda_ops_wanted(state):
        return False
    error = check_detrex_cuda_ops()
    if error is None:
        say("detrex CUDA ops: MultiScaleDeformableAttention ran on a CUDA tensor")
        return False
    if NO_GPU_SUPPORT not in error:
        failures["detrex cuda"] = "detrex's MultiScaleDeformableAttention fails on CUDA: " + error
        return False
    say("detrex is installed without its CUDA kernel (%s): rebuilding it with FORCE_CUDA=1"
        % error)
    if install_dep("detrex", state, failures, reinstall=True) is None:
        return False
    error = check_detrex_cuda_ops()
    if error is not None:
        failures["detrex cuda"] = "rebuilt detrex still fails on CUDA: " + error
    return True


def build_wheel(name, src, key, state):
    """Build ``src`` into the wheel cache under ``key``; returns the wheel or None."""
    dest = wheel_cache_dir() / key
    tmp = Path(tempfile.mkdtemp(prefix="wheel-%s-" % name))
    say("building the %s wheel from %s (C++ ops: minutes on CPU) -> %s" % (name, src, dest))
    t0 = time.time()
    cmd = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check",
           "--no-build-isolation", "--no-deps", "-w", str(tmp), str(src)]
    try:
        env = dict(os.environ, PIP_DEFAULT_TIMEOUT="60", **build_env(state))
    except SetupError as e:
        say("ERROR: " + str(e))
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    rc = subprocess.run(cmd, env=env).returncode
    wheels = sorted(tmp.glob("*.whl"))
    if rc != 0 or not wheels:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / wheels[0].name
    shutil.move(str(wheels[0]), str(final))
    shutil.rmtree(tmp, ignore_errors=True)
    (dest / "source.json").write_text(json.dumps({"source": str(src), "key": key}) + "\n")
    say("built %s in %.0f s" % (final.name, time.time() - t0))
    return final


def obtain_wheel(name, src, state):
    """(wheel, built): the cached wheel of ``src`` for this torch / Python / device, built into
    the cache first when there is none (built=True). A source that is not a git checkout has no
    commit to key on: it is built every time, into a folder of its own."""
    commit = source_commit(src)
    if commit is None:
        say("%s: %s is not a git checkout, so its wheel is not cached" % (name, src))
        key = "%s-uncached-%d-%d" % (name, os.getpid(), int(time.time()))
    else:
        key = wheel_cache_key(name, commit, state["mods"]["torch"].get("version", "?"),
                              state.get("py", "%d.%d" % sys.version_info[:2]),
                              state.get("torch_cuda") if cuda_ops_wanted(state) else None)
        wheel = cached_wheel(key)
        if wheel is not None:
            say("%s: using the cached wheel %s" % (name, wheel))
            return wheel, False
    return build_wheel(name, src, key, state), True


def import_failure_message(name, state):
    """For a package that is installed but does not import: which module is missing."""
    mod = state["mods"].get(name, {})
    missing = mod.get("missing")
    d = state.get("dists", {}).get(name) or {}
    head = "%s %s is installed but `import %s` fails (%s)" % (
        name, d.get("version", "?"), name, mod.get("error", "?"))
    if missing:
        top = missing.split(".")[0]
        return (head + ": module `%s` is missing from this environment; install the package "
                "that provides it (e.g. `pip install %s`) and add it to the `%s` extra of "
                "pyproject.toml so that `make setup` installs it" % (missing, top, name))
    return head


def install_dep(name, state, failures, reinstall=False):
    """Install detectron2 or detrex from the wheel cache, building the wheel when needed
    (``reinstall``: over an installed copy). Returns the source checkout used, or None (reason
    in ``failures``)."""
    if truthy(ENV_SKIP[name]):
        failures[name] = "%s=1 is set" % ENV_SKIP[name]
        return None
    src, why = find_source(name)
    if src is None:
        failures[name] = why
        return None
    wheel, _ = obtain_wheel(name, src, state)
    if wheel is None:
        failures[name] = "building the %s wheel from %s failed (see the log above)" % (name, src)
        return None
    # detectron2's own install_requires come from PyPI; detrex's runtime packages are the
    # `detrex` extra (its requirements.txt also lists linters and opencv-python)
    args = ["--no-build-isolation"] + (["--no-deps"] if name == "detrex" else [])
    if reinstall:
        args += ["--force-reinstall", "--no-deps"] if name != "detrex" else ["--force-reinstall"]
    pins = [r for r in wanted_requirements() if requirement_name(r) in BUILD_FIRST]
    if not pip_install(args + [str(wheel)] + pins):
        failures[name] = "`pip install %s` failed (see pip's message above)" % wheel
        return None
    return src


def detrex_checkout_guess(state, installed_from):
    """Where detrex's source tree (holding projects/) is."""
    cands = []
    if installed_from is not None:
        cands.append(Path(installed_from))
    src = os.environ.get("DETREX_SRC", "").strip()
    if src and is_checkout(src):
        cands.append(Path(src))
    du = (state.get("dists", {}).get("detrex") or {}).get("direct_url")
    if du:
        try:
            url = json.loads(du).get("url", "")
            if url.startswith("file://"):
                cands.append(Path(url[len("file://"):]))
        except ValueError:
            pass
    cands.append(deps_dir() / "detrex")
    for c in cands:
        if (c / "projects").is_dir() and (c / "detrex").is_dir():
            return c.resolve()
    return None


def ensure_projects_link(state, installed_from, failures):
    """Make `projects` (detrex's namespace package) importable without putting the detrex root
    on sys.path: a folder holding only a `projects` symlink, listed in a .pth file."""
    checkout = detrex_checkout_guess(state, installed_from)
    if checkout is None:
        failures["detrex projects"] = (
            "detrex is installed but its source tree (with projects/) was not found; set "
            "DETREX_SRC to it")
        return False
    target = checkout / "projects"
    for base in (state.get("purelib"), state.get("usersite")):
        if not base:
            continue
        base = Path(base)
        link_dir = base / PTH_NAME
        link = link_dir / "projects"
        pth = base / (PTH_NAME + ".pth")
        try:
            if link.is_symlink() and Path(os.readlink(link)) == target and pth.is_file() and (
                    pth.read_text().strip() == str(link_dir)):
                return False  # already in place
            base.mkdir(parents=True, exist_ok=True)
            link_dir.mkdir(exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
            pth.write_text(str(link_dir) + "\n")
            say("detrex projects: %s -> %s (via %s)" % (link, target, pth))
            return True
        except OSError as e:
            say("could not write the projects link under %s (%s)" % (base, e))
    failures["detrex projects"] = "could not write the projects link into site-packages"
    return False


# --------------------------------------------------------------------------------------------
# report


def layer_status(state, failures):
    """{layer: None if available else reason}."""
    out = {"core": None if ok(state, "torch") else err(state, "torch")}
    if ok(state, "detectron2") and ok(state, "detectron2.config"):
        out["detectron2"] = None
    else:
        out["detectron2"] = failures.get("detectron2") or (
            import_failure_message("detectron2", state)
            if (state.get("dists") or {}).get("detectron2") else err(state, "detectron2"))
    if ok(state, "detrex") and ok(state, "projects.dino.modeling"):
        out["detrex"] = None
    elif ok(state, "detrex"):
        out["detrex"] = failures.get("detrex projects") or (
            "`import projects.dino.modeling` fails: " + err(state, "projects.dino.modeling"))
    else:
        out["detrex"] = failures.get("detrex") or (
            import_failure_message("detrex", state)
            if (state.get("dists") or {}).get("detrex") else err(state, "detrex"))
    if out["detrex"] is None and failures.get("detrex cuda"):
        out["detrex"] = failures["detrex cuda"]  # imports, but its CUDA kernel does not run
    return out


def required_layers():
    """Layers named by STAGEINTERACTOR_REQUIRE_LAYERS ("all" = every layer)."""
    raw = os.environ.get("STAGEINTERACTOR_REQUIRE_LAYERS", "").strip()
    if not raw:
        return []
    names = [x.strip() for x in raw.replace(" ", ",").split(",") if x.strip()]
    if names in (["all"], ["1"]):
        return list(LAYERS)
    bad = [n for n in names if n not in LAYERS]
    if bad:
        raise SystemExit("[setup] ERROR: STAGEINTERACTOR_REQUIRE_LAYERS names unknown layer(s) "
                         "%s; use a comma list of %s, or all" % (", ".join(bad), ", ".join(LAYERS)))
    return names


def report(state, failures, status):
    m = state["mods"]
    say("-" * 72)
    where = "not installed; the make targets use this checkout via PYTHONPATH"
    if ok(state, "stageinteractor"):
        installed = Path(m["stageinteractor"]["file"]).resolve().parent.parent
        where = "installed from %s" % installed
        if installed != REPO:
            where += "; the make targets use this checkout (%s) via PYTHONPATH" % REPO
    say("layer core       : ready (torch %s, stageinteractor %s)" % (
        m["torch"].get("version"), where))
    if (REPO / "projects" / "__init__.py").exists():
        say("WARNING: projects/__init__.py makes this repository's projects/ a regular package, "
            "which hides detrex's `projects` namespace (projects.dino, ...) when run from here")
    if status["detectron2"] is None:
        say("layer detectron2 : ready (detectron2 %s at %s)" % (
            m["detectron2"].get("version"), Path(m["detectron2"]["file"]).parent))
    else:
        say("layer detectron2 : NOT AVAILABLE - " + status["detectron2"])
        say("    skipped because of it: the detectron2 test layer (tests/d2), the detrex "
            "layer (tests/detrex) and `make demo`")
        if "is installed but" not in status["detectron2"]:
            say("    to provide it: DETECTRON2_SRC=/path/to/detectron2 make setup   "
                "(a checkout or a git directory of %s)" % DEFAULT_URLS["detectron2"])
    if status["detrex"] is None:
        say("layer detrex     : ready (detrex %s, projects from %s)" % (
            m["detrex"].get("version") or (state["dists"].get("detrex") or {}).get("version"),
            ", ".join(state.get("projects_path", []))))
    else:
        say("layer detrex     : NOT AVAILABLE - " + status["detrex"])
        say("    skipped because of it: the detrex test layer (tests/detrex)")
        if "is installed but" not in status["detrex"] and "projects" not in status["detrex"]:
            say("    to provide it: DETREX_SRC=/path/to/detrex make setup   "
                "(a checkout or a git directory of %s)" % DEFAULT_URLS["detrex"])
    say("demo pictures    : %s" % ("ready (cv2 %s)" % m["cv2"].get("version") if ok(state, "cv2")
                                   else "NOT AVAILABLE - " + err(state, "cv2")))
    onnx_ok = ok(state, "onnx") and ok(state, "onnxruntime")
    say("ONNX export      : %s" % (
        "ready (onnx %s, onnxruntime %s)" % (m["onnx"].get("version"),
                                              m["onnxruntime"].get("version"))
        if onnx_ok else "NOT AVAILABLE - " + (err(state, "onnx") if not ok(state, "onnx")
                                              else err(state, "onnxruntime"))))
    say("-" * 72)


def run_import_sweep():
    """scripts/import_sweep.py in a fresh process of this interpreter; True when it passed."""
    cmd = [sys.executable, str(REPO / "scripts" / "import_sweep.py"), "--root", str(REPO)]
    say("$ " + " ".join(cmd[1:]))
    r = subprocess.run(cmd, cwd=str(REPO), env=clean_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    for line in r.stdout.rstrip().splitlines():
        print("  " + line, flush=True)
    return r.returncode == 0


def main():
    t0 = time.time()
    need = required_layers()
    skip = [n for n in ("detectron2", "detrex") if truthy(ENV_SKIP[n])]
    if "detectron2" in skip and "detrex" not in skip:
        skip.append("detrex")
    state = probe_env()
    failures = {}
    changed = install_requirements(skip_layers=skip)
    changed = install_self(state) or changed
    if changed:
        state = probe_env()

    for name in ("detectron2", "detrex"):
        importable = ok(state, name) and (name != "detectron2" or ok(state, "detectron2.config"))
        installed = bool((state.get("dists") or {}).get(name))
        if importable:
            continue
        if name == "detrex" and layer_status(state, failures)["detectron2"] is not None:
            failures["detrex"] = "needs detectron2, which is not available"
            continue
        if installed:
            # installed but broken: rebuilding would not help; the report names the module
            continue
        say("%s is not installed" % name)
        src = install_dep(name, state, failures)
        if src is not None:
            state = probe_env()
            if name == "detrex" and ok(state, "detrex") and not ok(state, "projects.dino.modeling"):
                if ensure_projects_link(state, src, failures):
                    state = probe_env()
    if ok(state, "detrex") and not ok(state, "projects.dino.modeling"):
        if ensure_projects_link(state, None, failures):
            state = probe_env()
    if ensure_detrex_cuda_ops(state, failures):
        state = probe_env()

    status = layer_status(state, failures)
    report(state, failures, status)
    rc = 0
    if not run_import_sweep():
        say("ERROR: the import sweep failed: a module of stageinteractor/ or tools/ imports a "
            "package that is not installed (above). Add it to pyproject.toml (dependencies or "
            "the right extra) so that the set-up step installs it.")
        rc = 1
    missing = [n for n in need if status.get(n) is not None]
    if missing:
        say("ERROR: STAGEINTERACTOR_REQUIRE_LAYERS=%s, but layer(s) %s are not available" % (
            os.environ.get("STAGEINTERACTOR_REQUIRE_LAYERS"), ", ".join(missing)))
        rc = 1
    say("set-up %s in %.0f s" % ("done" if rc == 0 else "FAILED", time.time() - t0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
