"""scripts/build_official_env.py without network: which torch it installs, how it takes the
authors' repository, the two adaptations it writes, and its final check, with fake Pythons
(small shell scripts) standing in for the environments. Nothing is installed: ``--dry-run``
prints the steps; the steps that write files are run on temporary folders."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build_official_env.py"


@pytest.fixture(scope="module")
def bo():
    spec = importlib.util.spec_from_file_location("build_official_env", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_python(path, stdout="", rc=0, stderr=""):
    path.write_text("#!/bin/sh\nprintf '%s' '" + stdout + "'\nprintf '%s' '" + stderr + "' >&2\nexit "
                    + str(rc) + "\n")
    path.chmod(0o755)
    return str(path)


def _run(*args):
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def bare_git(tmp_path):
    src = tmp_path / "authors.git"
    subprocess.run(["git", "init", "-q", "--bare", str(src)], check=True)
    return src


def test_default_is_the_torch_of_the_python_running_it(tmp_path, bare_git):
    venv = tmp_path / "venv"
    rc, out, err = _run(venv, "--authors-repo", bare_git, "--dry-run")
    assert rc == 0, err
    want = torch.__version__.split("+")[0]
    assert f"torch {torch.__version__} (from {sys.executable}) -> torch=={want}" in out
    pips = [line for line in out.splitlines() if " -m pip install " in line]
    assert len(pips) == 3 and f"torch=={want} torchvision" in pips[0]
    assert f"torch=={want} mmcv==1.7.2" in pips[2]  # pinned again: nothing may replace it
    assert "MMCV_WITH_OPS=0" in pips[2] and "--no-build-isolation" in pips[2]
    assert pips[1].endswith("install -q 'setuptools<81' wheel")
    assert out.rstrip().splitlines()[-1] == (f"export OFFICIAL_PY={venv}/bin/python "
                                             f"OFFICIAL_REPO={venv}/StageInteractor")
    assert not venv.exists()  # a dry run creates nothing


def test_a_python_without_torch_stops_with_one_clear_line(tmp_path, bare_git):
    no_torch = _fake_python(tmp_path / "python3", rc=1,
                            stderr="ModuleNotFoundError: No module named torch")
    rc, out, err = _run(tmp_path / "venv", "--authors-repo", bare_git, "--torch-from", no_torch, "--dry-run")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert f"{no_torch} has no torch (ModuleNotFoundError: No module named torch)" in lines[0]
    assert "--torch-from PY" in lines[0] and "--torch VERSION" in lines[0]
    assert not (tmp_path / "venv").exists()


def test_local_build_tag_dropped_on_pypi_kept_with_an_index(tmp_path, bare_git):
    py = _fake_python(tmp_path / "python3", stdout="2.5.1+cpu\n")
    rc, out, err = _run(tmp_path / "v", "--authors-repo", bare_git, "--torch-from", py, "--dry-run")
    assert rc == 0, err
    assert "torch 2.5.1+cpu (from %s) -> torch==2.5.1;" % py in out
    url = "https://download.pytorch.org/whl/cpu"
    rc, out, err = _run(tmp_path / "v", "--authors-repo", bare_git, "--torch-from", py,
                        "--torch-index-url", url, "--dry-run")
    assert rc == 0, err
    pips = [line for line in out.splitlines() if " -m pip install " in line]
    assert pips[0].endswith(f"install -q --index-url {url} torch==2.5.1+cpu torchvision 'numpy<2'")
    assert url not in pips[1] + pips[2]  # the index is for torch/torchvision only


def test_explicit_version_and_bad_values(tmp_path, bare_git):
    rc, out, _ = _run(tmp_path / "v", "--authors-repo", bare_git, "--torch", "2.3.0", "--dry-run")
    assert rc == 0 and "torch 2.3.0 (from --torch) -> torch==2.3.0;" in out
    rc, _, err = _run(tmp_path / "v", "--authors-repo", bare_git, "--torch", "latest", "--dry-run")
    assert rc == 2 and "--torch 'latest' is not a version number" in err
    rc, _, err = _run(tmp_path / "v", "--torch", "2.3.0", "--torch-from", sys.executable, "--dry-run")
    assert rc == 2 and "not allowed with argument" in err
    garbage = _fake_python(tmp_path / "python3", stdout="hello\n")
    rc, _, err = _run(tmp_path / "v", "--authors-repo", bare_git, "--torch-from", garbage, "--dry-run")
    assert rc == 2 and "torch.__version__ is 'hello', not a version number" in err


def test_authors_repository_sources(tmp_path, bare_git, bo):
    assert bo.source_kind(bo.AUTHORS_URL) == "url" and bo.source_kind("git@github.com:a/b.git") == "url"
    assert bo.source_kind(str(bare_git)) == "git"
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    assert bo.source_kind(str(checkout)) == "git"
    copy = tmp_path / "copy"
    (copy / "mmdet").mkdir(parents=True)
    (copy / "mmdet" / "__init__.py").write_text("")
    assert bo.source_kind(str(copy)) == "copy"
    with pytest.raises(bo.UsageError, match="no such directory"):
        bo.source_kind(str(tmp_path / "missing"))
    with pytest.raises(bo.UsageError, match="no mmdet/__init__.py"):
        bo.source_kind(str(tmp_path))

    rc, out, _ = _run(tmp_path / "v", "--torch", "2.3.0", "--dry-run")  # default: GitHub, pinned
    assert rc == 0
    assert f"$ git clone --quiet --no-checkout {bo.AUTHORS_URL} {tmp_path}/v/StageInteractor" in out
    assert f"checkout --quiet --detach {bo.AUTHORS_COMMIT}" in out
    rc, out, _ = _run(tmp_path / "v", "--torch", "2.3.0", "--authors-repo", copy, "--dry-run")
    assert rc == 0 and "(no git: the commit cannot be checked)" in out and "git clone" not in out


def test_mmcv_ceiling_is_raised_once_and_only_on_their_line(tmp_path, bo):
    init = tmp_path / "__init__.py"
    init.write_text("import mmcv\n\nmmcv_minimum_version = '1.3.2'\nmmcv_maximum_version = '1.4.0'\n")
    assert bo.raise_mmcv_ceiling(init) is True
    assert init.read_text() == "import mmcv\n\nmmcv_minimum_version = '1.3.2'\nmmcv_maximum_version = '1.8.0'\n"
    assert bo.raise_mmcv_ceiling(init) is False  # a rerun changes nothing
    other = tmp_path / "other.py"
    other.write_text("version = '1.4.0'\n")
    with pytest.raises(bo.StepError, match="expected one line"):
        bo.raise_mmcv_ceiling(other)


def test_the_ext_stub_raises_naming_the_op(tmp_path, bo):
    (tmp_path / "_ext.py").write_text(bo.EXT_STUB)
    spec = importlib.util.spec_from_file_location("fake_mmcv_ext", tmp_path / "_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    fn = ext.nms  # mmcv.ops looks functions up at import; calling one is what fails
    with pytest.raises(NotImplementedError, match="mmcv compiled op 'nms' is not available"):
        fn(torch.zeros(1, 4), torch.zeros(1), 0.5)
    with pytest.raises(AttributeError):
        ext.__path__  # not a package: the import system must not look inside it


def _fake_venv(tmp_path, torch_version):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    info = {"torch": torch_version, "mmcv": "1.7.2", "python": "3.11.7", "r50_parameters": 1}
    _fake_python(venv / "bin" / "python", stdout=json.dumps(info) + "\n")
    return venv


def test_final_check_refuses_another_torch(tmp_path, bo):
    """The failure the script exists to prevent: a reference on another torch (2.0.1 was once
    installed silently) stops the build instead of giving a figure."""
    venv = _fake_venv(tmp_path, "2.0.1")
    b = bo.Builder(venv=venv, authors_dir=tmp_path / "authors", dry_run=False)
    with pytest.raises(bo.StepError, match=r"has torch 2\.0\.1, not 2\.14\.1\+cu130"):
        b.check("2.14.1+cu130", "abc")
    assert not (venv / "official_env.json").exists()


def test_final_check_records_the_environment(tmp_path, bo):
    venv = _fake_venv(tmp_path, "2.14.1+cpu")
    b = bo.Builder(venv=venv, authors_dir=tmp_path / "authors", dry_run=False)
    info = b.check("2.14.1+cu130", "abc")  # same release, another build: the same kernels' code
    saved = json.loads((venv / "official_env.json").read_text())
    assert saved == info and saved["authors_commit"] == "abc" and saved["torch"] == "2.14.1+cpu"
    assert saved["python_exe"] == str(venv / "bin" / "python")
