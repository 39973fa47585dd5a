"""Tiny versions of the four detectors, built FROM OUR TRANSFER CONFIGS (with size overrides),
train on the CPU with CSLA: forward + backward, and the loss falls on a fixed batch."""

import os

import pytest
import torch

pytest.importorskip("detrex")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from stageinteractor.detrex_ext.criteria import (  # noqa: E402
    CSLADeformableCriterion,
    CSLADINOCriterion,
    CSLADNCriterion,
    CSLAHDeformableCriterion,
)
from stageinteractor.detrex_ext.tiny import shrink_model_cfg, tiny_batch  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "csla", "configs")
STEPS = 5


CASES = [
    ("dino_r50_4scale_12ep_csla.py", "dino", CSLADINOCriterion),
    ("dino_r50_4scale_12ep_csla_dca.py", "dino", CSLADINOCriterion),
    ("dn_detr_r50_50ep_csla.py", "dn", CSLADNCriterion),
    ("deformable_detr_r50_50ep_csla.py", "deform", CSLADeformableCriterion),
    ("h_deformable_detr_r50_two_stage_12ep_csla.py", "hdetr", CSLAHDeformableCriterion),
]


@pytest.mark.parametrize("config,kind,criterion_cls", CASES, ids=[c[0][:-3] for c in CASES])
def test_tiny_model_trains_on_cpu_with_csla(config, kind, criterion_cls):
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    torch.manual_seed(0)
    model = instantiate(shrink_model_cfg(cfg.model))
    assert type(model.criterion) is criterion_cls
    if config.endswith("_dca.py"):
        layer = model.transformer.decoder.layers[0]
        assert layer.operation_order.count("cross_attn") == 2
        assert layer.attentions[1] is not layer.attentions[2]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    batch = tiny_batch()
    totals = []
    for _ in range(STEPS):
        torch.manual_seed(1)  # same denoising noise every step: a fixed problem
        losses = model(batch)
        assert all(k.startswith("loss_") for k in losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    if kind in ("dino", "dn"):
        assert any(k.startswith("loss_class_dn") for k in losses)
    if kind in ("deform", "hdetr", "dino"):
        assert "loss_class_enc" in losses
    if kind == "hdetr":
        assert "loss_class_one2many" in losses
    assert totals[-1] < totals[0], totals
