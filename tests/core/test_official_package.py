"""stageinteractor.official: one home for the authors' layout, depending on the core only.

* no module of the package imports detectron2, detrex or the d2 / detrex layers (at the top or
  inside a function), so a core-only install converts checkpoints and rebuilds the fixture;
* importing the package or the reference worker imports nothing heavy (the worker runs in the
  authors' environment, which has none of this project's requirements);
* no second copy: the package's public functions are defined nowhere else in the repository.
"""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "stageinteractor" / "official"
FORBIDDEN = ("detectron2", "detrex", "projects", "stageinteractor.d2", "stageinteractor.detrex_ext")


def _imports(path):
    """Every module named by an import statement of ``path`` (absolute and relative)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside stageinteractor.official
                parent = "stageinteractor.official" if node.level == 1 else "stageinteractor"
                out.append((node.lineno, parent + ("." + node.module if node.module else "")))
            else:
                out.append((node.lineno, node.module))
    return out


def _forbidden(module):
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_package_never_imports_detectron2_detrex_or_their_layers():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "layout.py", "checkpoint.py", "fixture.py",
                                      "reference_worker.py"}
    bad = [f"{f.relative_to(REPO)}:{line} imports {m}" for f in files for line, m in _imports(f)
           if _forbidden(m)]
    assert bad == []


def test_forbidden_import_check_catches_a_lazy_layer_import(tmp_path):
    """The check above sees an import inside a function (a planted d2 import must fail it)."""
    p = tmp_path / "m.py"
    p.write_text("import torch\ndef f():\n    from stageinteractor.d2.engine import Trainer\n"
                 "    from ..d2 import checkpoint\n")
    found = [m for _, m in _imports(p) if _forbidden(m)]
    assert found == ["stageinteractor.d2.engine", "stageinteractor.d2"]


_NOTHING_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "numpy", "scipy", "detectron2", "detrex"}:
            raise ModuleNotFoundError("blocked %r" % name, name=name)
        return None
sys.meta_path.insert(0, Block())
import stageinteractor.official
import stageinteractor.official.reference_worker as w
assert callable(w.main)
print("ok")
"""


def test_package_and_reference_worker_import_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", _NOTHING_HEAVY], cwd=str(REPO),
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout


def _public_defs(path):
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
            and n.name not in {"main", "run", "parse_args"}}


def test_no_second_copy_of_the_authors_layout():
    """Each public function/class of the package is defined in exactly one file of the
    repository's code (stageinteractor/, tools/, scripts/)."""
    ours = {f: _public_defs(f) for f in PACKAGE.glob("*.py")}
    names = set().union(*ours.values())
    assert {"official_decoder_layout", "decoder_key_maps", "convert_official_to_ours",
            "formula_base", "load_fixture"} <= names
    where = {}
    for folder in ("stageinteractor", "tools", "scripts"):
        for f in (REPO / folder).rglob("*.py"):
            for name in _public_defs(f) & names:
                where.setdefault(name, []).append(str(f.relative_to(REPO)))
    dups = {n: sorted(fs) for n, fs in where.items() if len(fs) > 1}
    # same name, another function: d2/checkpoint.py's check of an ImageNet backbone init
    # (returns missing/unexpected lists) vs the converter's whole-model check (raises)
    assert dups.pop("check_against_model", None) in (None, ["stageinteractor/d2/checkpoint.py",
                                                           "stageinteractor/official/checkpoint.py"])
    assert dups == {}
    for old in ("stageinteractor/core/official_layout.py", "stageinteractor/core/testing",
                "stageinteractor/d2/official_checkpoint.py"):
        assert not (REPO / old).exists(), old


USER_FACING = ("README.md", "docs", "tools", "scripts", "configs", "projects", "stageinteractor",
               "Makefile", "pyproject.toml")


def test_no_user_facing_file_points_into_shared():
    """A clone has no ``../shared``: README, docs, tools, scripts, configs and the package name
    files of the repository only (the parity fixtures are in tests/fixtures)."""
    hits = []
    for name in USER_FACING:
        root = REPO / name
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
        for f in files:
            if f.suffix in {".png", ".jpg", ".pt", ".pth", ".pyc"}:
                continue
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if "../shared" in line or "shared/tools/" in line or "shared/spec/" in line \
                        or "shared/fixtures/" in line:
                    hits.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert hits == []
