#!/usr/bin/env python3
"""Mutation testing: plant each bug of a list in a copy of the checkout, run the tests it names.

A planted bug ("mutation") is one exact text replacement in one file plus the tests that must
catch it. The list is a JSON file (default ``tests/mutations/mutations.json``), an array of::

    {"id": "matcher-image0-scale",                       # unique name
     "file": "stageinteractor/core/matcher.py",          # path in the repository
     "old": "exact snippet (must occur exactly once)",
     "new": "its replacement",
     "tests": ["tests/core/test_matcher.py"],             # pytest paths / node ids
     "description": "one line: what the bug is"}

The checkout (tracked and untracked-but-not-ignored files of ``--root``) is copied once into a
temporary directory; the working tree is never written to. Then, for each mutation in turn: the
snippet is replaced in the copy, ``python -m pytest -x -q <tests>`` runs in the copy with
``PYTHONPATH`` set to it, and the file is restored. A mutation is *caught* when its tests fail
(pytest exit code 1; the first failing test is reported); exit code 2-4 (collection error,
e.g. a mutation that breaks an import) is reported as caught at collection, a pytest killed by
a signal (a crash) as caught (crashed); 0 or all-skipped, or a timeout, is *not caught*. Before the mutations, the union of their tests runs once unmutated
(``--no-baseline`` skips this): a failing baseline would make every mutation look caught.

Exit status: 0 when every mutation applies and is caught; 1 when one is not caught or its
snippet does not apply (not found, or found more than once: the report names it); 2 when the
baseline fails or the list is malformed. See docs/MUTATION.md.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIST = "tests/mutations/mutations.json"
REQUIRED = ("id", "file", "old", "new", "tests", "description")
_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "datasets", "output*")


@dataclass
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: List[str]
    description: str


@dataclass
class Result:
    id: str
    status: str  # caught | caught at collection | caught (crashed) | not caught | does not apply | applies
    detail: str = ""
    seconds: float = 0.0
    failed: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status.startswith("caught") or self.status == "applies"


def load_mutations(path: Path) -> List[Mutation]:
    """Read and check the list: every field present, ids unique, tests a non-empty list."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of mutations")
    out, seen = [], set()
    for i, d in enumerate(data):
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{path}: mutation #{i} ({d.get('id', '?')}) lacks {missing}")
        if d["id"] in seen:
            raise ValueError(f"{path}: duplicate mutation id {d['id']!r}")
        if not isinstance(d["tests"], list) or not d["tests"]:
            raise ValueError(f"{path}: mutation {d['id']!r}: 'tests' must be a non-empty list")
        if d["old"] == d["new"]:
            raise ValueError(f"{path}: mutation {d['id']!r}: 'old' and 'new' are the same")
        seen.add(d["id"])
        out.append(Mutation(**{k: d[k] for k in REQUIRED}))
    return out


def checkout_files(root: Path) -> Optional[List[str]]:
    """Tracked + untracked-not-ignored files of a git checkout (relative paths), or None."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_checkout(root: Path, dest: Path) -> Path:
    """Copy the checkout at ``root`` into ``dest`` (git's file list, else a filtered copytree)."""
    files = checkout_files(root)
    if files is None:
        shutil.copytree(root, dest, ignore=_IGNORE, symlinks=True)
        return dest
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target, follow_symlinks=False)
    return dest


def apply_mutation(root: Path, m: Mutation) -> str:
    """Replace ``m.old`` by ``m.new`` in ``root / m.file``; return the original text.

    Raises LookupError naming the mutation and file when the file is missing or the snippet
    occurs zero or several times."""
    path = root / m.file
    if not path.is_file():
        raise LookupError(f"{m.id}: file {m.file} does not exist")
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        what = "not found" if n == 0 else f"found {n} times"
        raise LookupError(f"{m.id}: snippet {what} in {m.file}: {m.old[:60]!r}")
    path.write_text(text.replace(m.old, m.new, 1))
    return text


def run_pytest(copy: Path, tests: Sequence[str], timeout: float, python: str,
               plugins: bool = False) -> subprocess.CompletedProcess:
    """``pytest -x -q`` on ``tests`` in ``copy``; third-party plugin autoload is off unless
    ``plugins`` (no test here uses one; loading them costs seconds per run)."""
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    if not plugins:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out + f"\n[timed out after {timeout:.0f} s]", "")


def failed_tests(output: str) -> List[str]:
    """Node ids from pytest's short summary (``FAILED a::b - msg`` / ``ERROR a::b``)."""
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)


def classify(proc: subprocess.CompletedProcess) -> Tuple[str, str, List[str]]:
    out = (proc.stdout or "") + (proc.stderr or "")
    failed = failed_tests(out)
    if proc.returncode == 1:
        return "caught", failed[0] if failed else "(a test failed)", failed
    if proc.returncode in (2, 3, 4):
        return "caught at collection", (failed[0] if failed else f"pytest exit {proc.returncode}"), failed
    if proc.returncode < 0:  # killed by a signal (e.g. a segfault on NaN): the suite goes red
        return "caught (crashed)", f"pytest killed by signal {-proc.returncode}", failed
    if proc.returncode == 0:
        why = "tests passed" if re.search(r"\d+ passed", out) else "every test skipped"
        return "not caught", why, failed
    tail = out.strip().splitlines()[-1:] or [""]
    return "not caught", f"pytest exit {proc.returncode}: {tail[0][:120]}", failed


def run_one(copy: Path, m: Mutation, timeout: float, python: str, plugins: bool = False) -> Result:
    t0 = time.perf_counter()
    try:
        original = apply_mutation(copy, m)
    except LookupError as e:
        return Result(m.id, "does not apply", str(e))
    try:
        proc = run_pytest(copy, m.tests, timeout, python, plugins)
    finally:
        (copy / m.file).write_text(original)
    status, detail, failed = classify(proc)
    return Result(m.id, status, detail, time.perf_counter() - t0, failed)


def baseline(copy: Path, mutations: Sequence[Mutation], timeout: float, python: str,
             plugins: bool = False) -> Optional[str]:
    """Run the union of the tests unmutated; the failure text, or None when they pass."""
    tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
    proc = run_pytest(copy, tests, timeout * max(1, len(tests)), python, plugins)
    if proc.returncode == 0 and re.search(r"\d+ passed", proc.stdout or ""):
        return None
    return f"exit {proc.returncode}: " + "; ".join(failed_tests(proc.stdout or "")[:5]) + \
        "\n" + "\n".join((proc.stdout or "").strip().splitlines()[-15:])


def report_lines(results: Sequence[Result], mutations: Sequence[Mutation], wall: float) -> List[str]:
    desc = {m.id: m.description for m in mutations}
    width = max([len(r.id) for r in results] + [2])
    lines = [f"{'id':<{width}}  {'result':<20}  {'s':>6}  failing test / reason"]
    for r in results:
        lines.append(f"{r.id:<{width}}  {r.status:<20}  {r.seconds:6.1f}  {r.detail}")
    n_ok = sum(r.ok for r in results)
    verb = "apply" if all(r.status in ("applies", "does not apply") for r in results) else "caught"
    lines.append(f"{n_ok}/{len(results)} {verb}; wall time {wall:.0f} s")
    for r in results:
        if not r.ok:
            lines.append(f"FAILED: {r.id} ({desc.get(r.id, '')}): {r.status}: {r.detail}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", default=DEFAULT_LIST, help="the JSON list (relative to --root)")
    p.add_argument("--root", default=str(REPO), help="the checkout to copy (default: this one)")
    p.add_argument("--only", nargs="*", default=None, help="run only these mutation ids")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test run")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    p.add_argument("--report", default=None, help="also write the results as JSON here")
    p.add_argument("--check", action="store_true", help="only check that every snippet applies")
    p.add_argument("--python", default=sys.executable, help="interpreter for pytest")
    p.add_argument("--plugins", action="store_true", help="let pytest autoload third-party plugins")
    return p.parse_args(argv)


def select(mutations: List[Mutation], only: Optional[Sequence[str]]) -> List[Mutation]:
    if not only:
        return mutations
    unknown = sorted(set(only) - {m.id for m in mutations})
    if unknown:
        raise ValueError(f"unknown mutation ids: {unknown}")
    return [m for m in mutations if m.id in set(only)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    root = Path(args.root).resolve()
    try:
        mutations = select(load_mutations(root / args.list), args.only)
    except (OSError, ValueError) as e:
        print(f"mutate: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = copy_checkout(root, Path(tmp) / "checkout")
        if args.check:
            results = []
            for m in mutations:
                try:
                    (copy / m.file).write_text(apply_mutation(copy, m))
                    results.append(Result(m.id, "applies", "(tests not run: --check)"))
                except LookupError as e:
                    results.append(Result(m.id, "does not apply", str(e)))
        else:
            if not args.no_baseline:
                print(f"baseline: running the {len(mutations)} mutations' tests unmutated ...", flush=True)
                bad = baseline(copy, mutations, args.timeout, args.python, args.plugins)
                if bad is not None:
                    print(f"mutate: the unmutated tests fail ({bad})", file=sys.stderr)
                    return 2
            results = []
            for i, m in enumerate(mutations, 1):
                r = run_one(copy, m, args.timeout, args.python, args.plugins)
                print(f"[{i}/{len(mutations)}] {r.id}: {r.status} ({r.seconds:.1f} s) {r.detail}", flush=True)
                results.append(r)
    wall = time.perf_counter() - t0
    print("\n".join(report_lines(results, mutations, wall)))
    if args.report:
        Path(args.report).write_text(json.dumps(
            {"wall_s": round(wall, 1), "results": [r.__dict__ for r in results]}, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
