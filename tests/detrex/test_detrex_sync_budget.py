"""CSLA adds no host sync to a detrex training step (issue 14).

Tiny CSLA DINO and CSLA DN-DETR (our transfer configs, shrunk) take one training step of this
project's Trainer under the host-sync counter's CPU dry run, with CSLA on and off. Most syncs
are detrex's own (its matcher, deformable attention, denoising); CSLA's pre-pass builds its
matches on the host and sends them in one non-blocking copy, keeps the normalisers and the
diagnostics on the device, and skips the assigner's (redundant) input check, so with CSLA on
no category of sync grows, and none of the CSLA code is a sync site.
"""

import os

import pytest
import torch

pytest.importorskip("detrex")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from stageinteractor.core.op_count import SYNC_CATEGORIES  # noqa: E402
from stageinteractor.d2.sync_count import count_training_step  # noqa: E402
from stageinteractor.detrex_ext.tiny import shrink_model_cfg, tiny_batch  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "csla", "configs")
CSLA_FILES = ("stageinteractor/core/csla.py", "stageinteractor/detrex_ext/csla_criterion.py",
              "stageinteractor/core/diagnostics.py")


def _count(config, csla):
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    cfg.model.criterion.csla_enabled = csla
    torch.manual_seed(0)
    model = instantiate(shrink_model_cfg(cfg.model))
    return count_training_step(model, tiny_batch())


@pytest.mark.parametrize("config", ["dino_r50_4scale_12ep_csla.py", "dn_detr_r50_50ep_csla.py"])
def test_csla_adds_no_host_sync(config):
    on, off = _count(config, True), _count(config, False)
    for cat in SYNC_CATEGORIES:
        assert on[cat] <= off[cat], (cat, on["sites"], off["sites"])
    csla_sites = [s for s in on["sites"] if any(f in s for f in CSLA_FILES)]
    # the only CSLA entries: the non-blocking copies of the matches and the stage tables
    assert csla_sites and all(s.startswith("to_gpu_async ") for s in csla_sites), csla_sites
    assert on["to_gpu_async"] - off["to_gpu_async"] == 2
    # the trainer copies the losses and the CSLA diagnostics together: one copy of ours
    ours = [s for s in on["sites"] if "stageinteractor/d2/engine.py" in s]
    assert ours == [s for s in ours if s.startswith("to_cpu ")] and on["sites"][ours[0]] == 1
