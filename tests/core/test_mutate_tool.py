"""tools/mutate.py itself (not the mutation list: that run is slow, see docs/MUTATION.md)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("_mutate_tool", ROOT / "tools" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(mod)
    return mod


mutate = _tool()


def _m(**kw):
    d = dict(id="m1", file="pkg/a.py", old="return a + b", new="return a - b",
             tests=["test_a.py"], description="planted")
    d.update(kw)
    return mutate.Mutation(**d)


def test_apply_replaces_once_and_returns_the_original(tmp_path):
    (tmp_path / "pkg").mkdir()
    src = "def add(a, b):\n    return a + b\n"
    (tmp_path / "pkg" / "a.py").write_text(src)
    original = mutate.apply_mutation(tmp_path, _m())
    assert original == src
    assert (tmp_path / "pkg" / "a.py").read_text() == "def add(a, b):\n    return a - b\n"


def test_missing_or_ambiguous_snippet_is_named(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(LookupError, match=r"m1: snippet not found in pkg/a.py"):
        mutate.apply_mutation(tmp_path, _m())
    with pytest.raises(LookupError, match=r"m1: snippet found 2 times in pkg/a.py"):
        mutate.apply_mutation(tmp_path, _m(old="x = 1", new="x = 2"))
    with pytest.raises(LookupError, match=r"m1: file pkg/b.py does not exist"):
        mutate.apply_mutation(tmp_path, _m(file="pkg/b.py"))
    assert (tmp_path / "pkg" / "a.py").read_text() == "x = 1\nx = 1\n"  # untouched


def test_list_is_validated(tmp_path):
    good = dict(id="a", file="f.py", old="1", new="2", tests=["t.py"], description="d")
    path = tmp_path / "m.json"
    path.write_text(json.dumps([good, dict(good)]))
    with pytest.raises(ValueError, match="duplicate mutation id 'a'"):
        mutate.load_mutations(path)
    path.write_text(json.dumps([{k: v for k, v in good.items() if k != "tests"}]))
    with pytest.raises(ValueError, match=r"lacks \['tests'\]"):
        mutate.load_mutations(path)
    path.write_text(json.dumps([dict(good, new="1")]))
    with pytest.raises(ValueError, match="are the same"):
        mutate.load_mutations(path)


def test_project_list_is_well_formed():
    """The project's list loads, has >= 25 mutations, and names only existing test files
    (whether each snippet still applies is ``tools/mutate.py --check``)."""
    mutations = mutate.load_mutations(ROOT / mutate.DEFAULT_LIST)
    assert len(mutations) >= 25
    for m in mutations:
        assert (ROOT / m.file).is_file(), (m.id, m.file)
        for t in m.tests:
            assert (ROOT / t.split("::")[0]).is_file(), (m.id, t)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_copy_takes_tracked_and_untracked_but_not_ignored_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run = dict(cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **run)
    (repo / ".gitignore").write_text("ignored/\n")
    (repo / "tracked.py").write_text("a = 1\n")
    subprocess.run(["git", "add", "-A"], **run)
    (repo / "untracked.py").write_text("b = 2\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_text("x")
    dest = mutate.copy_checkout(repo, tmp_path / "copy")
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == [".gitignore", "tracked.py", "untracked.py"]


def test_end_to_end_on_a_toy_checkout(tmp_path, capsys):
    """caught (with the failing test's name), not caught, and a snippet that no longer applies;
    the working tree is never written to."""
    root = tmp_path / "toy"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    src = "def add(a, b):\n    return a + b\n"
    (root / "pkg" / "a.py").write_text(src)
    (root / "test_a.py").write_text("from pkg.a import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    muts = [
        dict(id="minus", file="pkg/a.py", old="a + b", new="a - b", tests=["test_a.py"], description="caught"),
        dict(id="swap", file="pkg/a.py", old="a + b", new="b + a", tests=["test_a.py"], description="equivalent"),
        dict(id="gone", file="pkg/a.py", old="a * b", new="a / b", tests=["test_a.py"], description="stale"),
    ]
    (root / "muts.json").write_text(json.dumps(muts))
    report = tmp_path / "report.json"
    rc = mutate.main(["--root", str(root), "--list", "muts.json", "--report", str(report),
                      "--python", sys.executable, "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 1
    res = {r["id"]: r for r in json.loads(report.read_text())["results"]}
    assert res["minus"]["status"] == "caught" and res["minus"]["detail"] == "test_a.py::test_add"
    assert res["swap"]["status"] == "not caught" and res["swap"]["detail"] == "tests passed"
    assert res["gone"]["status"] == "does not apply" and "snippet not found" in res["gone"]["detail"]
    assert "1/3 caught" in out and "FAILED: gone" in out and "FAILED: swap" in out
    assert (root / "pkg" / "a.py").read_text() == src
    # only the caught one: exit 0
    assert mutate.main(["--root", str(root), "--list", "muts.json", "--only", "minus", "--no-baseline"]) == 0


def test_classify_exit_codes():
    def proc(rc, out=""):
        return subprocess.CompletedProcess(["pytest"], rc, out, "")

    assert mutate.classify(proc(1, "FAILED t.py::test_x - assert 0\n")) == ("caught", "t.py::test_x", ["t.py::test_x"])
    assert mutate.classify(proc(2, "ERROR t.py\n"))[0] == "caught at collection"
    assert mutate.classify(proc(-11)) == ("caught (crashed)", "pytest killed by signal 11", [])
    assert mutate.classify(proc(0, "3 passed in 1s")) == ("not caught", "tests passed", [])
    assert mutate.classify(proc(0, "3 skipped in 1s")) == ("not caught", "every test skipped", [])
    assert mutate.classify(proc(124, "[timed out after 9 s]"))[0] == "not caught"
