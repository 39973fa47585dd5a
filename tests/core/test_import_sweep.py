"""scripts/import_sweep.py: a module importing a package that the set-up step does not install
is caught, at module level and inside a function; optional imports and not-installed layers are
not errors. Also: stageinteractor.requirements (the tools' start-up check) and its table against
pyproject.toml."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "scripts" / "import_sweep.py"
MISSING = "stageinteractor_no_such_package_xyz"


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def _sweep(root, *extra):
    r = subprocess.run([sys.executable, str(SWEEP), "--root", str(root), "--package", "sweeppkg",
                        "--scripts", "tools"] + list(extra),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return r.returncode, r.stdout


def _clean_tree(tmp_path):
    _write(tmp_path, "sweeppkg/__init__.py", "import json\n")
    _write(tmp_path, "sweeppkg/a.py", """\
        import os
        from . import b
        try:
            import %s  # optional: guarded
        except ImportError:
            pass
        """ % MISSING)
    _write(tmp_path, "sweeppkg/b.py", "def f():\n    import math\n    return math.pi\n")
    _write(tmp_path, "tools/tool.py", """\
        import sys
        if __name__ == "__main__":
            raise SystemExit("a tool's main block must not run")
        """)


def test_clean_tree_passes(tmp_path):
    _clean_tree(tmp_path)
    rc, out = _sweep(tmp_path)
    assert rc == 0, out
    assert "0 error(s)" in out and "4 files" in out


def test_top_level_import_of_uninstalled_package_is_caught(tmp_path):
    _clean_tree(tmp_path)
    _write(tmp_path, "sweeppkg/bad.py", "import numpy\nimport %s\n" % MISSING)
    rc, out = _sweep(tmp_path)
    assert rc == 1, out
    assert "ERROR sweeppkg/bad.py (import)" in out
    assert "No module named '%s'" % MISSING in out
    assert "ERROR sweeppkg/bad.py:2 `import %s`" % MISSING in out


def test_lazy_import_inside_a_function_is_caught(tmp_path):
    """The module imports fine; only the function would fail, on the code path that calls it
    (like ``import onnx`` inside the export function)."""
    _clean_tree(tmp_path)
    _write(tmp_path, "sweeppkg/lazy.py", """\
        def export():
            from %s.sub import thing
            return thing
        """ % MISSING)
    rc, out = _sweep(tmp_path)
    assert rc == 1, out
    line = [x for x in out.splitlines() if x.startswith("ERROR")]
    assert len(line) == 1, out
    assert line[0].startswith("ERROR sweeppkg/lazy.py:2 `from %s.sub import thing` (inside a "
                              "function)" % MISSING), out


def test_script_importing_uninstalled_package_is_caught(tmp_path):
    _clean_tree(tmp_path)
    _write(tmp_path, "tools/bad_tool.py", "import %s\n" % MISSING)
    rc, out = _sweep(tmp_path)
    assert rc == 1 and "ERROR tools/bad_tool.py (import)" in out, out


def test_tool_requirement_check_is_reported_with_the_missing_name(tmp_path):
    """A tool stopping at its start-up check (``require``) is an error naming the module."""
    _clean_tree(tmp_path)
    _write(tmp_path, "tools/req_tool.py", """\
        import sys
        sys.path.insert(0, %r)
        from stageinteractor.requirements import require
        require("tools/req_tool.py", "%s")
        """ % (str(REPO), MISSING))
    rc, out = _sweep(tmp_path)
    assert rc == 1, out
    assert "ERROR tools/req_tool.py (import)" in out and MISSING in out


def test_relative_import_of_missing_submodule_is_caught(tmp_path):
    _clean_tree(tmp_path)
    _write(tmp_path, "sweeppkg/rel.py", "def f():\n    from .gone import x\n    return x\n")
    rc, out = _sweep(tmp_path)
    assert rc == 1 and "sweeppkg.gone" in out, out


def test_collector_marks_lazy_and_optional(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import import_sweep
    finally:
        sys.path.remove(str(REPO / "scripts"))
    p = _write(tmp_path, "m.py", """\
        import a
        try:
            import b
        except (ValueError, ModuleNotFoundError):
            import c
        def f():
            from d.e import g
        """)
    got = {mod: (lazy, opt) for _, mod, _, lazy, opt in import_sweep.collect_imports(p)}
    assert got == {"a": (False, False), "b": (False, True), "c": (False, False),
                   "d.e": (True, False)}


@pytest.mark.slow
def test_repository_sweep_passes():
    """The real project: every module of stageinteractor/ and tools/ imports here."""
    r = subprocess.run([sys.executable, str(SWEEP), "--root", str(REPO)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    assert "0 error(s)" in r.stdout


# ------------------------------------------------------------------------------------------
# stageinteractor.requirements


def test_require_names_module_package_and_extra():
    from stageinteractor.requirements import MissingDependency, require

    require("x", "json", "os.path")  # present: no exception
    with pytest.raises(MissingDependency) as e:
        require("tools/export_onnx.py", "json", MISSING, MISSING + "2")
    assert e.value.missing == [MISSING, MISSING + "2"]
    assert "tools/export_onnx.py: missing dependencies" in e.value.message
    assert isinstance(e.value, SystemExit)


def test_require_hint_for_onnx_and_cv2():
    from stageinteractor.requirements import install_hint

    assert "pip install onnx" in install_hint("onnx") and "`onnx`" in install_hint("onnx")
    assert "opencv-python-headless" in install_hint("cv2")
    assert "DETECTRON2_SRC" in install_hint("detectron2")
    assert "DETREX_SRC" in install_hint("projects.dino.modeling")


def test_requirement_table_matches_pyproject():
    """Every pip package the tools' start-up check advises is in the extra it names, so the
    advice and what `make setup` installs cannot drift apart."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import setup_env
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from stageinteractor.requirements import PROVIDERS

    deps, extras = setup_env.read_requirements(REPO / "pyproject.toml")
    names = lambda reqs: {setup_env.requirement_name(r) for r in reqs}  # noqa: E731
    for module, (pip_name, extra) in PROVIDERS.items():
        if pip_name is None:
            assert extra in extras, (module, extra)
            continue
        listed = names(deps) if extra == "core" else names(extras[extra])
        assert setup_env.requirement_name(pip_name) in listed, (module, pip_name, extra)


def test_tools_check_their_optional_imports_first():
    """Each tool that needs detectron2 (or onnx, cv2) calls require() before importing it."""
    for tool in ("demo.py", "export_onnx.py", "train_net.py", "run_demo.py"):
        tree = ast.parse((REPO / "tools" / tool).read_text())
        first_require = first_d2 = None
        for node in tree.body:
            if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "require"):
                first_require = first_require or node.lineno
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2"):
                first_d2 = first_d2 or node.lineno
        assert first_require is not None, tool
        assert first_d2 is None or first_require < first_d2, tool


_BLOCK = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = [{tool!r}] + {args!r}
runpy.run_path({tool!r}, run_name="__main__")
"""


def test_export_tool_without_onnx_stops_at_once_naming_it(tmp_path):
    """tools/export_onnx.py with onnx not installed: exits 1 before building any model, with
    the module, the pip package and the extra in the message."""
    tool = str(REPO / "tools" / "export_onnx.py")
    code = _BLOCK.format(blocked={"onnx", "onnxruntime"}, tool=tool,
                         args=["--config-file", "configs/demo/stageinteractor_demo.py",
                               "--output", str(tmp_path / "m.onnx")])
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "tools/export_onnx.py: missing dependencies" in r.stdout
    assert "`onnx`, `onnxruntime`" in r.stdout
    assert "pip install onnx" in r.stdout and "extra `onnx`" in r.stdout
    assert "Traceback" not in r.stdout
    assert not (tmp_path / "m.onnx").exists()
