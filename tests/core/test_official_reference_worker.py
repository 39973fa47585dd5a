"""The authors'-code reference worker (``tools/official_reference.py`` ->
``stageinteractor.official.reference_worker``), run through its own command line over a pipe.

The authors' environment is not here: a tiny stand-in of their packages (``mmcv.Config``,
``mmdet.models.build_detector``) in a temporary "repository" gives a detector whose decoder
makes a known set of aten calls (mul, add, sum, sub: four), so the ``count`` answer is checked
against a hand count, the timed commands and the error paths against the protocol. The worker
itself, its start-up, its stdout discipline (everything but protocol lines to stderr) and its
line loop are the real code.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stageinteractor.official import reference_worker

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "official_reference.py"

FAKE_MMCV = '''
class _Node(dict):
    __getattr__ = dict.__getitem__
    def __setattr__(self, k, v):
        self[k] = v

class Config:
    @staticmethod
    def fromfile(path):
        import os
        assert os.path.isfile(path), path  # relative to the authors' repository (the worker chdirs)
        return _Node(model=_Node(type="StageInteractor", pretrained="torchvision://resnet50"))
'''

FAKE_MODELS = '''
import torch
from torch import nn

print("a print of the authors' code at import")  # must not reach the protocol's stdout

class _Rpn(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
    def simple_test_rpn(self, feats, metas):
        x = feats[0]
        return x.mul(2), x.add(1), x.sum()          # 3 aten calls

class _Roi(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
    def simple_test(self, feats, xyzr, content, metas, imgs_whwh=None, rescale=False):
        if metas[0].get("fail"):
            raise RuntimeError("planted failure")
        return xyzr.sub(content)                     # 1 aten call

class _Detector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.pretrained is None, "the worker builds random weights"
        self.rpn_head, self.roi_head = _Rpn(), _Roi()
    def init_weights(self):
        pass
    def extract_feat(self, img):
        return [img.mean(dim=1, keepdim=True)]
    def simple_test(self, img, metas, rescale=False):
        feats = self.extract_feat(img)
        xyzr, content, _ = self.rpn_head.simple_test_rpn(feats, metas)
        return self.roi_head.simple_test(feats, xyzr, content, metas)

def build_detector(cfg):
    return _Detector(cfg)
'''


@pytest.fixture
def fake_authors_repo(tmp_path):
    repo = tmp_path / "StageInteractor"
    for rel, text in {"mmcv/__init__.py": FAKE_MMCV, "mmdet/__init__.py": "",
                      "mmdet/models/__init__.py": FAKE_MODELS,
                      "configs/stageinteractor/stageinteractor_r50_1x_coco.py": "model = dict()\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(textwrap.dedent(text))
    return repo


def _talk(repo, commands, *extra):
    r = subprocess.run([sys.executable, str(TOOL), "--repo", str(repo), "--threads", "1",
                        "--size", "8", "12", *extra], input="".join(c + "\n" for c in commands),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                       cwd=str(REPO))
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def test_protocol_over_the_pipe(fake_authors_repo):
    rc, replies, err = _talk(fake_authors_repo, ["decoder", "", "backbone", "whole", "count",
                                                 "nonsense", "quit", "decoder"])
    assert rc == 0, err
    ready, dec, back, whole, count, bad, bye = replies  # nothing after quit, blank line ignored
    import torch

    assert ready == {"ready": True, "torch": torch.__version__, "threads": 1, "size": [8, 12]}
    for timed in (dec, back, whole):
        assert set(timed) == {"wall_s", "cpu_s"} and timed["wall_s"] >= 0 and timed["cpu_s"] >= 0
    assert count == {"aten_calls": 4, "by_op": {"aten.mul": 1, "aten.add": 1, "aten.sum": 1,
                                                "aten.sub": 1}}
    assert bad == {"error": "unknown command 'nonsense'"}
    assert bye == {"bye": True}
    assert "a print of the authors' code at import" in err
    # the protocol's constants (the client's side reads them) name exactly these commands
    assert reference_worker.TIMED_COMMANDS == ("decoder", "backbone", "whole")
    assert set(reference_worker.COMMANDS) == {"decoder", "backbone", "whole", "count", "quit"}


def test_a_failing_call_is_answered_and_the_worker_stays_up(fake_authors_repo):
    models = fake_authors_repo / "mmdet" / "models" / "__init__.py"
    models.write_text(models.read_text().replace('metas[0].get("fail")', "content.numel() > 0"))
    rc, replies, err = _talk(fake_authors_repo, ["decoder", "whole", "quit"])
    assert rc == 0, err
    assert replies[1:] == [{"error": "RuntimeError: planted failure"}] * 2 + [{"bye": True}]


def test_without_the_authors_packages_it_names_the_environment_builder(tmp_path):
    empty = tmp_path / "not_their_repo"
    (empty / "configs").mkdir(parents=True)
    rc, replies, err = _talk(empty, ["quit"])
    assert rc != 0 and replies == []
    assert "scripts/build_official_env.py" in err and "No module named 'mmcv'" in err
    assert "../shared" not in err
