#!/usr/bin/env python3
"""The one idempotent set-up step behind ``make setup``, ``make test`` and ``make demo``.

What it does, in order (each step is skipped when its result is already in place, so a
second run only probes the environment and takes a few seconds):

1. core: makes sure torch and the PyPI dependencies of ``stageinteractor`` are importable and
   that the project itself is installed (``pip install -e .`` when it is not importable).
2. detectron2: installs it when it is not importable, from ``$DETECTRON2_SRC`` (a checkout
   or a git directory) or else from its upstream git repository.
3. detrex: the same with ``$DETREX_SRC``, plus detrex's runtime dependencies, and makes detrex's
   ``projects`` namespace (``from projects.dino.modeling import DINO``) importable through a
   folder holding only a ``projects`` symlink, put on ``sys.path`` by a ``.pth`` file.

detectron2 and detrex publish no wheels. Where neither a local source nor the upstream
repository can be reached, this script does NOT fail: it says which one it could not reach,
which test layers (and the demo) are skipped because of it, and how to provide it.
It exits non-zero only when the core layer itself cannot be set up (torch or a PyPI
dependency cannot be installed).

Environment variables:
  DETECTRON2_SRC, DETREX_SRC      local checkout (folder with setup.py), git directory or git URL
  DETECTRON2_GIT_URL, DETREX_GIT_URL   upstream repositories (defaults: GitHub)
  STAGEINTERACTOR_DEPS_DIR        where sources are cloned (default ~/.cache/stageinteractor/src)
  STAGEINTERACTOR_OFFLINE=1       never contact a git server (local sources only)
  SKIP_DETECTRON2=1, SKIP_DETREX=1   do not try to install that dependency
  GIT_TIMEOUT (s, default 60)     limit for reaching a git server; clones get 15x that
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_URLS = {
    "detectron2": "https://github.com/facebookresearch/detectron2",
    "detrex": "https://github.com/IDEA-Research/detrex",
}
ENV_SRC = {"detectron2": "DETECTRON2_SRC", "detrex": "DETREX_SRC"}
ENV_URL = {"detectron2": "DETECTRON2_GIT_URL", "detrex": "DETREX_GIT_URL"}
ENV_SKIP = {"detectron2": "SKIP_DETECTRON2", "detrex": "SKIP_DETREX"}
# module name -> pip requirement, for the core layer (pyproject.toml dependencies + pytest)
CORE_DEPS = {
    "scipy": "scipy",
    "fvcore": "fvcore",
    "omegaconf": "omegaconf",
    "pycocotools": "pycocotools",
    "matplotlib": "matplotlib",
    "pytest": "pytest",
}
# detrex's runtime imports that its own requirements.txt lists. detrex is installed with
# --no-deps because that file also pulls in linters and opencv-python (which clashes with
# opencv-python-headless); these are the ones its modules and projects/ really import.
DETREX_RUNTIME_DEPS = {
    "timm": "timm",
    "einops": "einops",
    "fairscale": "fairscale",
    "psutil": "psutil",
    "cloudpickle": "cloudpickle",
    "hydra": "hydra-core",
    "scipy": "scipy",
}
PTH_NAME = "stageinteractor_detrex_projects"

PROBE = r"""
import importlib, json, sys, sysconfig, site, warnings
warnings.filterwarnings("ignore")
out = {"python": sys.executable, "purelib": sysconfig.get_paths()["purelib"]}
try:
    out["usersite"] = site.getusersitepackages()
except Exception:
    out["usersite"] = None

def probe(name, attr=None):
    try:
        m = importlib.import_module(name)
        r = {"ok": True, "file": getattr(m, "__file__", None)}
        if attr:
            v = getattr(m, attr, None)
            if v is None:
                try:
                    from importlib import metadata
                    v = metadata.version(name.split(".")[0])
                except BaseException:
                    v = "?"
            r["version"] = str(v)
        return r
    except BaseException as e:
        return {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")}

mods = {}
mods["torch"] = probe("torch", "__version__")
if mods["torch"]["ok"]:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
for n in NAMES:
    mods[n] = probe(n, "__version__")
mods["detectron2"] = probe("detectron2", "__version__")
if mods["detectron2"]["ok"]:
    mods["detectron2.config"] = probe("detectron2.config")
mods["detrex"] = probe("detrex", "__version__")
if mods["detrex"]["ok"]:
    mods["projects.dino.modeling"] = probe("projects.dino.modeling")
    try:
        import projects
        out["projects_path"] = [str(p) for p in projects.__path__]
    except BaseException:
        out["projects_path"] = []
    try:
        from importlib import metadata
        out["detrex_direct_url"] = metadata.distribution("detrex").read_text("direct_url.json")
    except BaseException:
        out["detrex_direct_url"] = None
out["mods"] = mods
print("@@PROBE@@" + json.dumps(out))
"""


def say(msg=""):
    print("[setup] " + msg, flush=True)


def truthy(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def probe_env():
    """Import-probe the target interpreter in a fresh process, from a neutral directory and
    without this checkout on PYTHONPATH (so "importable" means "installed")."""
    env = dict(os.environ)
    pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    pp = [p for p in pp if Path(p).resolve() != REPO]
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    else:
        env.pop("PYTHONPATH", None)
    names = sorted(set(CORE_DEPS) | set(DETREX_RUNTIME_DEPS) | {"torchvision", "stageinteractor"})
    code = "NAMES = %r\n" % (names,) + PROBE
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tempfile.gettempdir(),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    say("$ " + " ".join(cmd[2:]))
    return subprocess.run(cmd, env=env).returncode == 0


def git(args, timeout):
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    try:
        r = subprocess.run(
            ["git"] + list(args),
            env=env,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return False, "timed out after %ds" % timeout
    except FileNotFoundError:
        return False, "git is not installed"
    msg = (r.stderr or r.stdout).strip().splitlines()
    return r.returncode == 0, (msg[-1] if msg else "")


def is_checkout(path):
    return path is not None and (Path(path) / "setup.py").is_file()


def is_git_dir(path):
    p = Path(path)
    return p.is_dir() and (
        (p / "HEAD").is_file() and (p / "objects").is_dir() or (p / ".git").exists()
    )


def deps_dir():
    d = os.environ.get("STAGEINTERACTOR_DEPS_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "stageinteractor" / "src"


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
    """Return (checkout_dir or None, reason-if-None)."""
    git_timeout = int(os.environ.get("GIT_TIMEOUT", "60"))
    src = os.environ.get(ENV_SRC[name], "").strip()
    cached = deps_dir() / name
    if src:
        if is_checkout(src):
            return Path(src).resolve(), ""
        if is_checkout(cached) and (cached / ".stageinteractor_source").is_file() and (
            cached / ".stageinteractor_source"
        ).read_text().strip() == src:
            return cached, ""
        looks_remote = "://" in src or src.startswith("git@")
        if looks_remote and truthy("STAGEINTERACTOR_OFFLINE"):
            return None, "%s=%s is remote and STAGEINTERACTOR_OFFLINE is set" % (ENV_SRC[name], src)
        if not looks_remote and not is_git_dir(src):
            return None, "%s=%s is neither a checkout (no setup.py) nor a git directory" % (
                ENV_SRC[name],
                src,
            )
        say("cloning %s from %s into %s" % (name, src, cached))
        good, msg = clone(src, cached, git_timeout * 15, shallow=looks_remote)
        if not good:
            return None, "could not clone %s=%s (%s)" % (ENV_SRC[name], src, msg)
        (cached / ".stageinteractor_source").write_text(src + "\n")
        return cached, ""
    if is_checkout(cached):
        return cached, ""
    url = os.environ.get(ENV_URL[name], DEFAULT_URLS[name])
    if truthy("STAGEINTERACTOR_OFFLINE"):
        return None, "STAGEINTERACTOR_OFFLINE is set and %s is not set" % ENV_SRC[name]
    say("reaching %s (timeout %ds) ..." % (url, git_timeout))
    good, msg = git(["ls-remote", "--heads", url], git_timeout)
    if not good:
        return None, "could not reach %s (%s)" % (url, msg)
    say("cloning %s into %s" % (url, cached))
    good, msg = clone(url, cached, git_timeout * 15, shallow=True)
    if not good:
        return None, "could not clone %s (%s)" % (url, msg)
    (cached / ".stageinteractor_source").write_text(url + "\n")
    return cached, ""


def build_env(state):
    env = {}
    if not state.get("cuda", False) and "FORCE_CUDA" not in os.environ:
        env["FORCE_CUDA"] = "0"  # CPU-only build of the C++ ops
    env.setdefault("MAX_JOBS", str(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    return env


def setup_core(state):
    if not ok(state, "torch"):
        say("torch is not importable (%s); installing torch and torchvision" % err(state, "torch"))
        if not pip_install(["torch>=2.0", "torchvision"]):
            say("ERROR: could not install torch; see https://pytorch.org/get-started/locally/")
            sys.exit(1)
    elif not ok(state, "torchvision"):
        if not pip_install(["torchvision"]):
            say("ERROR: could not install torchvision")
            sys.exit(1)
    missing = [pkg for mod, pkg in CORE_DEPS.items() if not ok(state, mod)]
    if missing:
        say("installing missing dependencies: " + " ".join(missing))
        if not pip_install(missing):
            say("ERROR: could not install " + " ".join(missing))
            sys.exit(1)
    changed = bool(missing) or not ok(state, "torch") or not ok(state, "torchvision")
    if not ok(state, "stageinteractor"):
        say("stageinteractor is not installed; installing this checkout in editable mode")
        ensure_build_tools()
        if not pip_install(["--no-build-isolation", "--no-deps", "-e", str(REPO)]):
            say("WARNING: `pip install -e .` failed; the make targets still work because "
                "they put this checkout on PYTHONPATH")
        changed = True
    return changed


def ensure_detrex_runtime_deps(state):
    missing = [pkg for mod, pkg in DETREX_RUNTIME_DEPS.items() if not ok(state, mod)]
    if not missing:
        return False
    say("installing detrex runtime dependencies: " + " ".join(missing))
    # fairscale ships only an sdist that imports torch in its setup.py
    if not pip_install(["--no-build-isolation"] + missing):
        say("WARNING: could not install " + " ".join(missing))
    return True


def _version_tuple(dist):
    from importlib import metadata

    try:
        v = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for x in v.split(".")[:3]:
        digits = "".join(ch for ch in x if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def ensure_build_tools():
    """--no-build-isolation builds use this environment's setuptools: it must be recent enough
    for PEP 660 editable installs (>= 64) and provide bdist_wheel (built in from 70.1, else
    from the `wheel` package); fresh virtual environments often carry an older one."""
    st = _version_tuple("setuptools")
    want = []
    if st is None or st < (64,):
        want.append("setuptools>=64,<81")
    if (st is None or st < (70, 1)) and _version_tuple("wheel") is None:
        want.append("wheel")
    if want:
        say("build tools for --no-build-isolation: installing " + " ".join(want))
        pip_install(want)


def setuptools_below_81():
    try:
        from importlib import metadata

        major = int(metadata.version("setuptools").split(".")[0])
        return major < 81
    except Exception:
        return False


def install_dep(name, state, failures):
    """Install detectron2 or detrex when missing. Returns the source checkout used or None."""
    if truthy(ENV_SKIP[name]):
        failures[name] = "%s=1 is set" % ENV_SKIP[name]
        return None
    src, why = find_source(name)
    if src is None:
        failures[name] = why
        return None
    say("installing %s from %s (builds C++ ops: minutes on CPU)" % (name, src))
    ensure_build_tools()
    args = ["--no-build-isolation"]
    if name == "detrex":
        args.append("--no-deps")
        if not setuptools_below_81():
            # detrex.config imports pkg_resources, which setuptools 81 removed
            pip_install(["setuptools<81"])
    if not pip_install(args + [str(src)], extra_env=build_env(state), quiet=False):
        failures[name] = "`pip install %s` failed (see the build log above)" % src
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
    du = state.get("detrex_direct_url")
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
    """Make `projects` (detrex's namespace package) importable without putting the detrex
    root on sys.path (the root holds a `detrex/` folder that would shadow the installed
    package): a folder holding only a `projects` symlink, listed in a .pth file."""
    checkout = detrex_checkout_guess(state, installed_from)
    if checkout is None:
        failures["detrex projects"] = (
            "detrex is installed but its source tree (with projects/) was not found"
        )
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
                pth.read_text().strip() == str(link_dir)
            ):
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


def report(state, failures):
    d2 = ok(state, "detectron2") and ok(state, "detectron2.config")
    dx = ok(state, "detrex") and ok(state, "projects.dino.modeling")
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
    if d2:
        say("layer detectron2 : ready (detectron2 %s at %s)" % (
            m["detectron2"].get("version"), Path(m["detectron2"]["file"]).parent))
    else:
        why = failures.get("detectron2") or err(state, "detectron2")
        say("layer detectron2 : NOT AVAILABLE - " + why)
        say("    skipped because of it: the detectron2 test layer (tests/d2), the detrex "
            "layer (tests/detrex) and `make demo`")
        say("    to provide it: DETECTRON2_SRC=/path/to/detectron2 make setup   "
            "(a checkout or a git directory of %s)" % DEFAULT_URLS["detectron2"])
    if dx:
        paths = state.get("projects_path", [])
        say("layer detrex     : ready (detrex %s, projects from %s)" % (
            m["detrex"].get("version"), ", ".join(paths)))
    else:
        if not ok(state, "detrex"):
            why = failures.get("detrex") or err(state, "detrex")
        else:
            why = failures.get("detrex projects") or (
                "`import projects.dino.modeling` fails: " + err(state, "projects.dino.modeling"))
        say("layer detrex     : NOT AVAILABLE - " + why)
        say("    skipped because of it: the detrex test layer (tests/detrex)")
        say("    to provide it: DETREX_SRC=/path/to/detrex make setup   "
            "(a checkout or a git directory of %s)" % DEFAULT_URLS["detrex"])
    say("-" * 72)


def main():
    state = probe_env()
    failures = {}
    changed = setup_core(state)
    if changed:
        state = probe_env()

    d2_ready = ok(state, "detectron2") and ok(state, "detectron2.config")
    if not d2_ready:
        say("detectron2 is not importable (%s)" % err(state, "detectron2"))
        if install_dep("detectron2", state, failures):
            state = probe_env()
            d2_ready = ok(state, "detectron2")
            if not d2_ready:
                failures["detectron2"] = "installed, but `import detectron2` still fails: " + err(
                    state, "detectron2")

    installed_from = None
    if not ok(state, "detrex"):
        if not d2_ready:
            failures["detrex"] = "needs detectron2, which is not available"
        else:
            say("detrex is not importable (%s)" % err(state, "detrex"))
            if ensure_detrex_runtime_deps(state):
                state = probe_env()
            installed_from = install_dep("detrex", state, failures)
            if installed_from:
                state = probe_env()
    if ok(state, "detrex") and not ok(state, "projects.dino.modeling"):
        fixed = ensure_detrex_runtime_deps(state)
        fixed = ensure_projects_link(state, installed_from, failures) or fixed
        if fixed:
            state = probe_env()
    report(state, failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
