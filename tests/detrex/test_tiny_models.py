"""Tiny versions of the four detectors, built FROM OUR TRANSFER CONFIGS (with size overrides),
train on the CPU with CSLA: forward + backward, and the loss falls on a fixed batch."""

import os

import pytest
import torch

pytest.importorskip("detrex")

from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone import BasicStem, ResNet  # noqa: E402
from detectron2.modeling.backbone.resnet import BasicBlock  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from stageinteractor.detrex_ext.criteria import (  # noqa: E402
    CSLADeformableCriterion,
    CSLADINOCriterion,
    CSLADNCriterion,
    CSLAHDeformableCriterion,
)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "csla", "configs")
NUM_CLASSES = 5
WIDTHS = (16, 32, 64, 128)  # res2..res5 channels of the tiny ResNet
STEPS = 5


def tiny_resnet_stages():
    """A tiny ResNet body: one BasicBlock per stage, widths ``WIDTHS``, strides 4..32."""
    stages, in_ch = [], 16
    for i, out_ch in enumerate(WIDTHS):
        stages.append(
            ResNet.make_stage(
                BasicBlock, 1, in_channels=in_ch, out_channels=out_ch,
                stride_per_block=[1 if i == 0 else 2], norm="FrozenBN",
            )
        )
        in_ch = out_ch
    return stages


def _shrink(model, kind: str):
    """Tiny random ResNet, 1 encoder / 3 decoder layers, few queries, 5 classes, CPU."""
    model.backbone.stem = L(BasicStem)(in_channels=3, out_channels=16, norm="FrozenBN")
    model.backbone.stages = L(tiny_resnet_stages)()
    if "neck" in model:
        model.neck.input_shapes = {
            f"res{i + 2}": ShapeSpec(channels=c) for i, c in enumerate(WIDTHS) if i > 0
        }
    for part in ("encoder", "decoder"):
        node = model.transformer[part]
        node.feedforward_dim = 256
        node.num_layers = 1 if part == "encoder" else 3
    model.num_classes = NUM_CLASSES
    model.criterion.num_classes = NUM_CLASSES
    model.device = "cpu"
    if kind == "dino":
        model.num_queries = 20
        model.dn_number = 3
    elif kind == "dn":
        model.in_channels = WIDTHS[-1]
        model.num_queries = 20
        model.denoising_groups = 2
    elif kind == "deform":
        model.num_queries = 20
        model.with_box_refine = True
        model.as_two_stage = True  # exercises the _enc loss
    elif kind == "hdetr":
        model.num_queries_one2one = 10
        model.num_queries_one2many = 20
        model.transformer.two_stage_num_proposals = 30
        model.k_one2many = 2
    return model


def _batch():
    gen = torch.Generator().manual_seed(0)
    batch = []
    for h, w, boxes, classes in [
        (64, 64, [[4.0, 6.0, 30.0, 40.0], [32.0, 20.0, 60.0, 58.0]], [1, 3]),
        (56, 64, [[10.0, 10.0, 50.0, 30.0]], [2]),
    ]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor(classes)
        image = (torch.rand(3, h, w, generator=gen) * 255).float()
        batch.append({"image": image, "height": h, "width": w, "instances": inst})
    return batch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add overhead (and the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    model = instantiate(_shrink(cfg.model, kind))
    assert type(model.criterion) is criterion_cls
    if config.endswith("_dca.py"):
        layer = model.transformer.decoder.layers[0]
        assert layer.operation_order.count("cross_attn") == 2
        assert layer.attentions[1] is not layer.attentions[2]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    batch = _batch()
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
