#!/usr/bin/env python3
"""Build the authors' environment: a virtual environment that runs their StageInteractor code.

The authors' code (github.com/MCG-NJU/StageInteractor, an mmdet 2.12 fork) is the reference of
every parity fixture and every same-run speed comparison (``tools/benchmark.py
--official-python PY --official-repo DIR``). This script makes that reference from a clone of
this repository::

    python scripts/build_official_env.py VENV [--authors-repo SRC] [--commit C]
        [--torch VERSION | --torch-from PY] [--torch-index-url URL] [--pip-arg ARG]... [--dry-run]

It runs on the CPU and changes nothing outside ``VENV`` (and ``--authors-dir``):

1. the torch version: by default the one of the Python that runs this script (the environment
   you compare against; ``--torch-from PY`` names another Python, ``--torch VERSION`` gives it).
   A Python without torch stops the script: a reference on another torch is no same-run
   comparison (the authors' decoder runs 22 % slower on torch 2.0.1 than on 2.14.1);
2. ``VENV``: a new virtual environment (reused when it exists) with that torch, torchvision,
   ``numpy<2``, mmcv 1.7.2 "lite" (pure Python, built without compiled ops and without build
   isolation on ``setuptools<81``: its setup.py imports ``pkg_resources``) and the packages
   the authors' code imports;
3. ``mmcv._ext``: a module whose every function raises ``NotImplementedError`` naming the op.
   The R50 decoder path calls no compiled op (sampling is ``F.grid_sample``, the IoF is mmdet's
   pure-torch ``bbox_overlaps``, NMS is off), so nothing of the compared code is replaced;
4. the authors' repository at ``--commit`` (default: the commit the fixtures and figures were
   made with), cloned from ``--authors-repo`` (a URL, a git directory or a checkout; default
   GitHub) into ``--authors-dir`` (default ``VENV/StageInteractor``), with one line changed:
   its mmcv version ceiling (``mmcv_maximum_version``, 1.4.0) raised to admit mmcv 1.7.2;
5. a check: the environment's torch is the requested version, and the authors' R50-100q
   detector builds from their config. ``VENV/official_env.json`` records the versions and
   the commit; the last lines printed are ``export OFFICIAL_PY=... OFFICIAL_REPO=...``.

``--dry-run`` resolves everything (torch version, source, paths) and prints the steps without
running them. Exit status: 0 done, 2 a usage error (no torch, a bad source), 1 a failed step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

AUTHORS_URL = "https://github.com/MCG-NJU/StageInteractor"
# the authors' commit the parity fixtures and the same-run figures were made with
AUTHORS_COMMIT = "477aa15af58c8d9857a37c48bb017b118f1b07d1"
MMCV = "mmcv==1.7.2"
# mmcv 1.7.2 is an sdist whose setup.py imports pkg_resources: it is built without build
# isolation, on a setuptools installed first (an isolated build gets the newest setuptools,
# which has no pkg_resources from 81 on; torch 2.14 needs setuptools >= 77.0.3)
BUILD_TOOLS = ("setuptools<81", "wheel")
# what the authors' code imports besides torch/mmcv; yapf 0.32 (mmcv 1.x's Config calls
# FormatCode(verify=...), removed in yapf 0.40); numpy 1.x (mmcv 1.x / mmdet 2.x use np.bool etc.)
PACKAGES = ("yapf==0.32.0", "opencv-python-headless", "matplotlib<3.9", "scipy", "pycocotools",
            "terminaltables", "six", "numpy<2")
CEILING_OLD = "mmcv_maximum_version = '1.4.0'"
CEILING_NEW = "mmcv_maximum_version = '1.8.0'"
CONFIG = "configs/stageinteractor/stageinteractor_r50_1x_coco.py"
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)*((a|b|rc|\.dev|\.post)\d+)*(\+[0-9A-Za-z.]+)?$")

# the stub ``mmcv._ext`` (mmcv lite has no compiled ops; mmcv.ops imports this module)
EXT_STUB = '''"""mmcv lite: no compiled ops (written by stageinteractor scripts/build_official_env.py)."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing_compiled_op(*args, **kwargs):
        raise NotImplementedError(f"mmcv compiled op {name!r} is not available (mmcv lite)")

    return missing_compiled_op
'''

# run in the new environment: versions, and the authors' detector built from their config
CHECK = '''
import json, os, sys, warnings
warnings.filterwarnings("ignore")
repo = sys.argv[1]
sys.path.insert(0, repo)
os.chdir(repo)
import torch, mmcv
from mmcv import Config
from mmdet.models import build_detector
cfg = Config.fromfile(sys.argv[2])
cfg.model.pretrained = None
model = build_detector(cfg.model)
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"torch": torch.__version__, "mmcv": mmcv.__version__, "python": sys.version.split()[0],
                  "r50_parameters": n}))
'''


class UsageError(Exception):
    """A wrong argument or environment; the message says what to do (exit status 2)."""


class StepError(Exception):
    """A step failed (exit status 1)."""


def public_version(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1`` (the local build tag is not part of the release)."""
    return version.split("+", 1)[0]


def torch_version_of(python: str) -> str:
    """The torch version that ``python`` imports; :class:`UsageError` when it has none."""
    try:
        r = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    except OSError as e:
        raise UsageError(f"cannot run {python} ({e.strerror or e})") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(
            f"{python} has no torch ({why}). The reference must run on the torch of the "
            f"environment you compare against: run this script with that environment's Python, "
            f"name it with --torch-from PY, or give the version with --torch VERSION")
    version = lines[-1].strip()
    if not _VERSION.match(version):
        raise UsageError(f"{python}: torch.__version__ is {version!r}, not a version number")
    return version


def torch_requirement(version: str, index_url: Optional[str]) -> str:
    """The pip requirement for ``version``: with an index URL (e.g. PyTorch's CPU wheels) the
    local build tag is kept (``torch==2.14.1+cpu``), on PyPI it is dropped."""
    if not _VERSION.match(version):
        raise UsageError(f"--torch {version!r} is not a version number (e.g. 2.14.1)")
    return f"torch=={version if index_url else public_version(version)}"


def source_kind(src: str) -> str:
    """``"url"``, ``"git"`` (a git directory or a checkout with .git) or ``"copy"`` (a plain
    folder of the authors' files); :class:`UsageError` for anything else."""
    if re.match(r"^(https?|ssh|git)://|^git@", src):
        return "url"
    p = Path(src)
    if not p.exists():
        raise UsageError(f"--authors-repo {src}: no such directory (give a git directory, a "
                         f"checkout of {AUTHORS_URL} or its URL)")
    if (p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir()):
        return "git"
    if (p / "mmdet" / "__init__.py").is_file():
        return "copy"
    raise UsageError(f"--authors-repo {src}: neither a git directory nor a checkout of the "
                     f"authors' repository (no mmdet/__init__.py)")


def raise_mmcv_ceiling(init_file: Path) -> bool:
    """Admit mmcv 1.7.2 in the authors' ``mmdet/__init__.py``; True when the file changed,
    False when it was raised already; :class:`StepError` when the line is not there."""
    text = init_file.read_text()
    if CEILING_NEW in text:
        return False
    if text.count(CEILING_OLD) != 1:
        raise StepError(f"{init_file}: expected one line {CEILING_OLD!r} (the authors' mmcv "
                        f"version ceiling); is this their repository?")
    init_file.write_text(text.replace(CEILING_OLD, CEILING_NEW))
    return True


class Builder:
    """The steps, run or (``dry_run``) printed."""

    def __init__(self, *, venv: Path, authors_dir: Path, dry_run: bool):
        self.venv, self.authors_dir, self.dry_run = venv, authors_dir, dry_run
        self.python = venv / "bin" / "python"

    def say(self, text: str) -> None:
        print(f"[build_official_env] {text}", flush=True)

    def run(self, cmd: Sequence[str], env: Optional[dict] = None, capture: bool = False,
            shown: Optional[Sequence[str]] = None) -> str:
        extra = "".join(f"{k}={v} " for k, v in (env or {}).items())
        self.say("$ " + extra + " ".join(shlex.quote(str(c)) for c in (shown or cmd)))
        if self.dry_run:
            return ""
        r = subprocess.run([str(c) for c in cmd], env=dict(os.environ, **(env or {})), text=True,
                           stdout=subprocess.PIPE if capture else None)
        if r.returncode != 0:
            raise StepError(f"step failed (exit {r.returncode}): {' '.join(map(str, cmd))}")
        return r.stdout or ""

    def make_venv(self) -> None:
        if self.python.exists():
            self.say(f"reusing the virtual environment {self.venv}")
        else:
            self.run([sys.executable, "-m", "venv", self.venv])

    def pip(self, reqs: Sequence[str], pip_args: Sequence[str], env: Optional[dict] = None) -> None:
        self.run([self.python, "-m", "pip", "install", "-q", *pip_args, *reqs], env=env)

    def stub_ext(self) -> None:
        where = self.run([self.python, "-c", "import mmcv, os; print(os.path.dirname(mmcv.__file__))"],
                         capture=True).strip()
        self.say(f"write {where or '<mmcv>'}/_ext.py (no compiled ops; each raises NotImplementedError)")
        if not self.dry_run:
            (Path(where) / "_ext.py").write_text(EXT_STUB)

    def authors_repo(self, src: str, kind: str, commit: Optional[str]) -> None:
        dest = self.authors_dir
        if (dest / "mmdet" / "__init__.py").is_file():
            self.say(f"reusing the authors' repository {dest}")
            if commit and (dest / ".git").exists():
                self.run(["git", "-C", dest, "checkout", "--quiet", "--detach", commit])
        elif kind == "copy":
            self.say(f"copy {src} -> {dest} (no git: the commit cannot be checked)")
            if not self.dry_run:
                shutil.copytree(src, dest)
        else:
            self.run(["git", "clone", "--quiet", "--no-checkout", src, dest])
            self.run(["git", "-C", dest, "checkout", "--quiet", "--detach", commit or "HEAD"])
        self.say(f"raise the mmcv version ceiling in {dest}/mmdet/__init__.py ({CEILING_OLD!r} -> "
                 f"{CEILING_NEW!r})")
        if not self.dry_run:
            raise_mmcv_ceiling(dest / "mmdet" / "__init__.py")

    def check(self, want_torch: str, commit: Optional[str]) -> dict:
        cmd = [self.python, "-c", CHECK, self.authors_dir, CONFIG]
        shown = [self.python, "-c", "<import torch, mmcv, mmdet; build their R50 detector>", *cmd[3:]]
        out = self.run(cmd, capture=True, shown=shown)
        if self.dry_run:
            return {}
        info = json.loads(out.strip().splitlines()[-1])
        if public_version(info["torch"]) != public_version(want_torch):
            raise StepError(f"{self.venv} has torch {info['torch']}, not {want_torch}: a reference "
                            f"on another torch is no same-run comparison")
        if commit is None and (self.authors_dir / ".git").exists():
            commit = self.run(["git", "-C", self.authors_dir, "rev-parse", "HEAD"], capture=True).strip()
        info.update(authors_repo=str(self.authors_dir), authors_commit=commit, python_exe=str(self.python))
        (self.venv / "official_env.json").write_text(json.dumps(info, indent=1) + "\n")
        return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("venv", help="the virtual environment to create (reused when it exists)")
    p.add_argument("--authors-repo", default=AUTHORS_URL,
                   help="the authors' repository: URL, git directory (bare or not) or a checkout")
    p.add_argument("--commit", default=AUTHORS_COMMIT,
                   help="the authors' commit to check out ('' = the source's HEAD)")
    p.add_argument("--authors-dir", default=None, help="where their code goes (default VENV/StageInteractor)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--torch", default=None, help="torch version to install (default: see --torch-from)")
    g.add_argument("--torch-from", default=sys.executable,
                   help="install the torch version of this Python (default: the one running this script)")
    p.add_argument("--torch-index-url", default=None,
                   help="package index for torch/torchvision, e.g. https://download.pytorch.org/whl/cpu")
    p.add_argument("--pip-arg", action="append", default=[],
                   help="extra argument for every pip install (repeatable), e.g. --pip-arg=--no-index")
    p.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> int:
    venv = Path(args.venv).absolute()
    authors_dir = Path(args.authors_dir).absolute() if args.authors_dir else venv / "StageInteractor"
    if args.torch is not None:
        torch_version, origin = args.torch, "--torch"
    else:
        torch_version, origin = torch_version_of(args.torch_from), args.torch_from
    torch_req = torch_requirement(torch_version, args.torch_index_url)
    kind = source_kind(args.authors_repo)
    commit = args.commit or None
    if kind == "copy":
        commit = None
    b = Builder(venv=venv, authors_dir=authors_dir, dry_run=args.dry_run)
    b.say(f"torch {torch_version} (from {origin}) -> {torch_req}; authors' repository {args.authors_repo} "
          f"({kind}) at {commit or 'its HEAD'} -> {authors_dir}" + ("; dry run" if args.dry_run else ""))
    b.make_venv()
    index = ["--index-url", args.torch_index_url] if args.torch_index_url else []
    b.pip([torch_req, "torchvision", "numpy<2"], [*args.pip_arg, *index])
    b.pip(BUILD_TOOLS, args.pip_arg)
    # torch pinned again so that nothing here can replace it; MMCV_WITH_OPS=0: mmcv lite
    b.pip([torch_req, MMCV, *PACKAGES], ["--no-build-isolation", *args.pip_arg], env={"MMCV_WITH_OPS": "0"})
    b.stub_ext()
    b.authors_repo(args.authors_repo, kind, commit)
    info = b.check(torch_version, commit)
    if info:
        b.say("ready: " + json.dumps(info))
    print(f"export OFFICIAL_PY={b.python} OFFICIAL_REPO={authors_dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except UsageError as e:
        print(f"build_official_env: {e}", file=sys.stderr)
        return 2
    except StepError as e:
        print(f"build_official_env: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
