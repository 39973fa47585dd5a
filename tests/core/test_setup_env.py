"""scripts/setup_env.py: the requirement list comes from pyproject.toml, the wheel cache is keyed
and reused, sources from git directories are cloned once per commit, a package that is installed
but does not import is reported with the missing module (and not rebuilt), required layers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
try:
    import setup_env  # noqa: E402
finally:
    sys.path.remove(str(REPO / "scripts"))


def _git(*args, cwd=None):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git"] + list(args), cwd=cwd, env=env, check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)


def _tiny_package(root, version="0.1"):
    """A git checkout of a pure-python package with a setup.py (like detectron2/detrex)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "setup.py").write_text(
        "from setuptools import setup\nsetup(name='si_tiny_pkg', version=%r, "
        "py_modules=['si_tiny_pkg'])\n" % version)
    (root / "si_tiny_pkg.py").write_text("X = %r\n" % version)
    if not (root / ".git").exists():
        _git("init", "-q", str(root))
    _git("add", "-A", cwd=root)
    _git("commit", "-qm", "v" + version, cwd=root)
    return root


def _state(cuda=False):
    return {"py": "3.11", "cuda": cuda, "torch_cuda": "13.0" if cuda else None,
            "mods": {"torch": {"ok": True, "version": "2.14.1+cu130"}}}


# ------------------------------------------------------------------------------------------
# pyproject.toml is the one list


def test_requirements_come_from_pyproject_with_every_extra():
    deps, extras = setup_env.read_requirements()
    assert "torch>=2.0" in deps and "scipy" in deps
    assert set(setup_env.EXTRAS) <= set(extras)
    want = setup_env.wanted_requirements()
    for name in ("pytest", "opencv-python-headless", "onnx", "onnxruntime", "wandb", "timm"):
        assert name in want, name
    # setuptools 81 removed pkg_resources, which detectron2 and detrex import
    assert any(r.replace(" ", "").startswith("setuptools") and "<81" in r for r in want)
    # skipping the detrex layer drops its extra only
    no_detrex = setup_env.wanted_requirements(skip_layers=("detrex",))
    assert "wandb" not in no_detrex and "onnx" in no_detrex


def test_fallback_toml_reader_agrees_with_tomllib():
    text = (REPO / "pyproject.toml").read_text()
    assert setup_env._parse_toml_lists(text) == setup_env.read_requirements()


def test_unsatisfied_checks_presence_version_and_markers():
    import pytest as _pytest  # installed here

    assert setup_env.unsatisfied(["pytest", "pytest>=1.0"]) == []
    assert setup_env.unsatisfied(["pytest<1.0"]) == ["pytest<1.0"]
    assert setup_env.unsatisfied(["si-no-such-dist-xyz"]) == ["si-no-such-dist-xyz"]
    assert setup_env.unsatisfied(["si-no-such-dist-xyz; python_version < '3'"]) == []
    assert _pytest


# ------------------------------------------------------------------------------------------
# wheel cache


def test_wheel_cache_key_depends_on_commit_torch_python_and_device():
    c1, c2 = "a" * 40, "b" * 40
    k = setup_env.wheel_cache_key("detrex", c1, "2.14.1+cu130", "3.11", None)
    assert k == "detrex-aaaaaaaaaaaa-torch2.14.1_cu130-py311-cpu"
    others = [
        setup_env.wheel_cache_key("detrex", c2, "2.14.1+cu130", "3.11", None),
        setup_env.wheel_cache_key("detrex", c1, "2.13.0", "3.11", None),
        setup_env.wheel_cache_key("detrex", c1, "2.14.1+cu130", "3.12", None),
        setup_env.wheel_cache_key("detrex", c1, "2.14.1+cu130", "3.11", "13.0"),
        setup_env.wheel_cache_key("detectron2", c1, "2.14.1+cu130", "3.11", None),
    ]
    assert len(set(others + [k])) == 6
    assert others[3].endswith("-cu130")


@pytest.mark.slow
def test_wheel_is_built_once_per_commit_and_reused(tmp_path, monkeypatch):
    """A real `pip wheel` of a tiny checkout: built into the cache on the first call, taken from
    it on the second (no build), built again after a new commit."""
    monkeypatch.setenv("STAGEINTERACTOR_WHEEL_CACHE", str(tmp_path / "wheels"))
    src = _tiny_package(tmp_path / "src")
    w1, built1 = setup_env.obtain_wheel("detrex", src, _state())
    assert built1 and w1 is not None and w1.is_file() and w1.suffix == ".whl"
    commit = setup_env.source_commit(src)
    assert w1.parent.name == setup_env.wheel_cache_key("detrex", commit, "2.14.1+cu130", "3.11",
                                                       None)
    w2, built2 = setup_env.obtain_wheel("detrex", src, _state())
    assert (w2, built2) == (w1, False)
    _tiny_package(src, version="0.2")
    w3, built3 = setup_env.obtain_wheel("detrex", src, _state())
    assert built3 and w3.parent != w1.parent and "0.2" in w3.name
    # another torch version never reuses a wheel compiled against the first
    st = _state()
    st["mods"]["torch"]["version"] = "2.13.0"
    _, built4 = setup_env.obtain_wheel("detrex", src, st)
    assert built4


def test_source_commit_of_checkout_and_git_dir(tmp_path):
    src = _tiny_package(tmp_path / "src")
    c = setup_env.source_commit(src)
    assert c is not None and len(c) == 40
    assert setup_env.source_commit(src / ".git") == c  # a bare git directory, like the mirrors
    assert setup_env.source_commit(tmp_path) is None


def test_git_dir_source_is_cloned_once_per_commit(tmp_path, monkeypatch, capsys):
    src = _tiny_package(tmp_path / "src")
    monkeypatch.setenv("STAGEINTERACTOR_DEPS_DIR", str(tmp_path / "deps"))
    monkeypatch.setenv("DETREX_SRC", str(src / ".git"))
    got, why = setup_env.find_source("detrex")
    assert why == "" and got == tmp_path / "deps" / "detrex"
    assert setup_env.source_commit(got) == setup_env.source_commit(src)
    assert "cloning detrex" in capsys.readouterr().out
    got2, _ = setup_env.find_source("detrex")
    assert got2 == got and "cloning" not in capsys.readouterr().out
    _tiny_package(src, version="0.2")
    got3, _ = setup_env.find_source("detrex")
    assert "cloning detrex" in capsys.readouterr().out
    assert setup_env.source_commit(got3) == setup_env.source_commit(src)


def test_offline_without_source_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEINTERACTOR_DEPS_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("DETECTRON2_SRC", raising=False)
    monkeypatch.setenv("STAGEINTERACTOR_OFFLINE", "1")
    got, why = setup_env.find_source("detectron2")
    assert got is None and "DETECTRON2_SRC is not set" in why
    monkeypatch.setenv("DETECTRON2_SRC", str(tmp_path))  # neither a checkout nor a git dir
    got, why = setup_env.find_source("detectron2")
    assert got is None and "neither a checkout" in why


# ------------------------------------------------------------------------------------------
# installed but does not import


def _broken_detrex_state():
    return {
        "py": "3.11", "purelib": "/nowhere", "usersite": None, "projects_path": [],
        "dists": {"detectron2": {"version": "0.6"}, "detrex": {"version": "0.3.0"},
                  "stageinteractor": None},
        "mods": {
            "torch": {"ok": True, "version": "2.14.1"},
            "stageinteractor": {"ok": False, "error": "ModuleNotFoundError: x"},
            "detectron2": {"ok": True, "version": "0.6", "file": "/x/detectron2/__init__.py"},
            "detectron2.config": {"ok": True},
            "detrex": {"ok": False, "missing": "wandb",
                       "error": "ModuleNotFoundError: No module named 'wandb'"},
            "projects.dino.modeling": {"ok": False, "error": "not probed"},
            "cv2": {"ok": True, "version": "4"}, "onnx": {"ok": True, "version": "1"},
            "onnxruntime": {"ok": True, "version": "1"},
        },
    }


def test_installed_but_broken_detrex_names_the_missing_module(capsys):
    state = _broken_detrex_state()
    status = setup_env.layer_status(state, {})
    assert status["detectron2"] is None
    msg = status["detrex"]
    assert "detrex 0.3.0 is installed but `import detrex` fails" in msg
    assert "module `wandb` is missing" in msg and "pip install wandb" in msg
    assert "`detrex` extra of pyproject.toml" in msg
    setup_env.report(state, {}, status)
    out = capsys.readouterr().out
    assert "layer detrex     : NOT AVAILABLE - detrex 0.3.0 is installed but" in out
    assert "DETREX_SRC" not in out  # already set; the advice would not help


def test_not_installed_detrex_advises_the_source(capsys):
    state = _broken_detrex_state()
    state["dists"]["detrex"] = None
    state["mods"]["detrex"] = {"ok": False, "missing": "detrex",
                               "error": "ModuleNotFoundError: No module named 'detrex'"}
    status = setup_env.layer_status(state, {})
    setup_env.report(state, {}, status)
    assert "DETREX_SRC=/path/to/detrex make setup" in capsys.readouterr().out


def test_required_layers(monkeypatch):
    monkeypatch.delenv("STAGEINTERACTOR_REQUIRE_LAYERS", raising=False)
    assert setup_env.required_layers() == []
    monkeypatch.setenv("STAGEINTERACTOR_REQUIRE_LAYERS", "all")
    assert setup_env.required_layers() == ["core", "detectron2", "detrex"]
    monkeypatch.setenv("STAGEINTERACTOR_REQUIRE_LAYERS", "core, detrex")
    assert setup_env.required_layers() == ["core", "detrex"]
    monkeypatch.setenv("STAGEINTERACTOR_REQUIRE_LAYERS", "core,d2")
    with pytest.raises(SystemExit, match="unknown layer.*d2"):
        setup_env.required_layers()


@pytest.mark.slow
def test_setup_run_with_everything_installed_changes_nothing(tmp_path):
    """The idempotent path: no pip call, no build, exit 0. It runs in a throwaway virtual
    environment layered on this one (``--system-site-packages``, no pip of its own), so that
    whatever the step would install or write lands in tmp_path, never in the environment that
    runs the tests (issue 23)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = dict(os.environ, STAGEINTERACTOR_OFFLINE="1", PYTHONNOUSERSITE="1",
               STAGEINTERACTOR_WHEEL_CACHE=str(tmp_path / "wheels"),
               STAGEINTERACTOR_DEPS_DIR=str(tmp_path / "src"))
    r = subprocess.run([str(python), str(REPO / "scripts" / "setup_env.py")], cwd=str(REPO),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                       env=env)
    assert str(venv) in subprocess.run(
        [str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
        env=env).stdout
    assert r.returncode == 0, r.stdout
    assert "$ pip install" not in r.stdout and "building the" not in r.stdout, r.stdout
    assert "import sweep:" in r.stdout and "0 error(s)" in r.stdout
    assert "set-up done" in r.stdout


def test_parity_fixture_is_found_in_the_repository(monkeypatch):
    """A plain clone (no shared/ beside it) finds the official parity fixture in tests/fixtures."""
    from stageinteractor.official.fixture import find_parity_fixture, load_fixture

    monkeypatch.delenv("STAGEINTERACTOR_PARITY_FIXTURE", raising=False)
    found = find_parity_fixture()
    assert found == REPO / "tests" / "fixtures" / "official_decoder_parity"
    assert (found / "README.md").is_file()
    fx = load_fixture(found)
    assert fx is not None


# ------------------------------------------------------------------------------------------
# CUDA ops (issue 21 item 2): decided, keyed and checked; the environment is faked here


@pytest.fixture
def no_cuda_toolkit(monkeypatch, tmp_path):
    """No FORCE_CUDA / CUDA_HOME / CUDA_PATH, no nvcc on PATH or in the default places."""
    for var in ("FORCE_CUDA", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: None)
    monkeypatch.setattr(setup_env, "DEFAULT_CUDA_HOMES", (str(tmp_path / "no-cuda"),))


def _toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return root


def test_cuda_ops_are_built_when_torch_sees_cuda(no_cuda_toolkit, monkeypatch, tmp_path):
    assert setup_env.build_env(_state(cuda=False))["FORCE_CUDA"] == "0"
    with pytest.raises(setup_env.SetupError) as e:  # CUDA but no toolkit: a clear error
        setup_env.build_env(_state(cuda=True))
    assert "CUDA_HOME" in str(e.value) and "nvcc" in str(e.value)
    assert "Not compiled with GPU support" in str(e.value) and "13.0" in str(e.value)
    home = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    env = setup_env.build_env(_state(cuda=True))
    assert env["FORCE_CUDA"] == "1" and env["CUDA_HOME"] == str(home)
    monkeypatch.delenv("CUDA_HOME")  # nvcc on PATH
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: str(home / "bin" / "nvcc"))
    assert setup_env.build_env(_state(cuda=True))["CUDA_HOME"] == str(home.resolve())
    monkeypatch.setenv("FORCE_CUDA", "0")  # explicit CPU-only build on a CUDA machine
    assert setup_env.build_env(_state(cuda=True))["FORCE_CUDA"] == "0"
    monkeypatch.setenv("FORCE_CUDA", "1")  # explicit CUDA build without a device
    assert setup_env.build_env(_state(cuda=False))["FORCE_CUDA"] == "1"


def test_wheel_cache_key_says_whether_the_cuda_ops_are_in_it(no_cuda_toolkit, monkeypatch):
    keys = []
    monkeypatch.setattr(setup_env, "source_commit", lambda src: "c" * 40)
    monkeypatch.setattr(setup_env, "cached_wheel", lambda key: keys.append(key) or Path(key))
    setup_env.obtain_wheel("detrex", "src", _state(cuda=True))
    setup_env.obtain_wheel("detrex", "src", _state(cuda=False))
    monkeypatch.setenv("FORCE_CUDA", "0")
    setup_env.obtain_wheel("detrex", "src", _state(cuda=True))
    assert [k.rsplit("-", 1)[1] for k in keys] == ["cu130", "cpu", "cpu"]


def test_no_toolkit_fails_the_build_before_compiling(no_cuda_toolkit, monkeypatch, tmp_path,
                                                     capsys):
    monkeypatch.setenv("STAGEINTERACTOR_WHEEL_CACHE", str(tmp_path / "wheels"))
    monkeypatch.setattr(setup_env.subprocess, "run",
                        lambda *a, **k: pytest.fail("must not compile without a toolkit"))
    assert setup_env.build_wheel("detrex", tmp_path, "k", _state(cuda=True)) is None
    assert "no CUDA toolkit was found" in capsys.readouterr().out


def _detrex_state(cuda):
    st = _state(cuda=cuda)
    st["mods"]["detrex"] = {"ok": True}
    return st


def test_detrex_without_its_cuda_kernel_is_rebuilt(no_cuda_toolkit, monkeypatch):
    checks, installs = [], []

    def check():
        checks.append(1)
        return "RuntimeError: Not compiled with GPU support" if len(checks) == 1 else None

    monkeypatch.setattr(setup_env, "check_detrex_cuda_ops", check)
    monkeypatch.setattr(setup_env, "install_dep",
                        lambda name, state, failures, reinstall=False:
                        installs.append((name, reinstall)) or "src")
    failures = {}
    assert setup_env.ensure_detrex_cuda_ops(_detrex_state(cuda=True), failures)
    assert installs == [("detrex", True)] and len(checks) == 2 and failures == {}
    # kernel present: nothing rebuilt; no CUDA device: nothing checked
    checks[:], installs[:] = [1], []
    assert not setup_env.ensure_detrex_cuda_ops(_detrex_state(cuda=True), failures)
    assert installs == [] and len(checks) == 2
    checks[:] = []
    assert not setup_env.ensure_detrex_cuda_ops(_detrex_state(cuda=False), failures)
    assert checks == []
    # another CUDA failure is reported (and makes the detrex layer unavailable), not rebuilt
    monkeypatch.setattr(setup_env, "check_detrex_cuda_ops", lambda: "RuntimeError: boom")
    st = _detrex_state(cuda=True)
    st["mods"]["projects.dino.modeling"] = {"ok": True}
    st["mods"]["detectron2"] = st["mods"]["detectron2.config"] = {"ok": True}
    assert not setup_env.ensure_detrex_cuda_ops(st, failures)
    assert installs == [] and "boom" in failures["detrex cuda"]
    assert "boom" in setup_env.layer_status(st, failures)["detrex"]


def test_detrex_cuda_check_script_matches_detrex_api(tmp_path):
    """The check's MultiScaleDeformableAttention call, run on the CPU (detrex's PyTorch path):
    the arguments fit detrex's API (on a GPU the same call runs its CUDA kernel)."""
    pytest.importorskip("detrex")
    code = (setup_env.DETREX_CUDA_CHECK.replace('device="cuda"', 'device="cpu"')
            .replace(".cuda()", "").replace("torch.cuda.synchronize()", ""))
    assert code.count('"cpu"') == 5
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert "@@CUDA_OK@@ [1, 3, 32]" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
