"""Tiny CPU versions of the detrex transfer configs, for tests and the CSLA overhead benchmark.

:func:`shrink_model_cfg` edits a detrex model config (DINO, DN-DETR, Deformable-DETR or
H-Deformable-DETR, e.g. one of ``projects/csla/configs``) in place: a random tiny ResNet
(one BasicBlock per stage, widths 16/32/64/128), one encoder and three decoder layers, few queries,
five classes, ``device="cpu"``. The transformer width stays 256 because detrex's DINO decoder
hard-codes a 512-d sine embedding of the 4-d reference boxes (= 2 x 256).
"""

from typing import Dict, List

import torch

__all__ = ["WIDTHS", "tiny_resnet_stages", "shrink_model_cfg", "tiny_batch", "model_kind"]

WIDTHS = (16, 32, 64, 128)  # res2..res5 channels


def tiny_resnet_stages(norm: str = "FrozenBN"):
    """detectron2 ResNet stages: one BasicBlock each, widths :data:`WIDTHS`, strides 4..32."""
    from detectron2.modeling.backbone import ResNet
    from detectron2.modeling.backbone.resnet import BasicBlock

    stages, in_ch = [], 16
    for i, out_ch in enumerate(WIDTHS):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                1,
                in_channels=in_ch,
                out_channels=out_ch,
                stride_per_block=[1 if i == 0 else 2],
                norm=norm,
            )
        )
        in_ch = out_ch
    return stages


def model_kind(model_cfg) -> str:
    """ "dino", "dn", "hdetr" or "deform" from the model's ``_target_`` class name."""
    target = model_cfg._target_
    name = target if isinstance(target, str) else target.__name__
    name = name.rsplit(".", 1)[-1]
    if name.endswith("DINO"):
        return "dino"
    if name == "DNDETR":
        return "dn"
    if name == "HDeformableDETR":
        return "hdetr"
    if name == "DeformableDETR":
        return "deform"
    raise ValueError(
        f"model_kind: unsupported model {name!r} (expected DINO, DNDETR, "
        "DeformableDETR or HDeformableDETR)"
    )


def shrink_model_cfg(model_cfg, num_classes: int = 5, decoder_layers: int = 3):
    """Make a detrex model config tiny and CPU-only (in place; also returned)."""
    from detectron2.config import LazyCall as L
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import BasicStem

    kind = model_kind(model_cfg)
    model_cfg.backbone.stem = L(BasicStem)(in_channels=3, out_channels=16, norm="FrozenBN")
    model_cfg.backbone.stages = L(tiny_resnet_stages)()
    if "neck" in model_cfg:
        model_cfg.neck.input_shapes = {
            f"res{i + 2}": ShapeSpec(channels=c) for i, c in enumerate(WIDTHS) if i > 0
        }
    for part, layers in (("encoder", 1), ("decoder", decoder_layers)):
        model_cfg.transformer[part].feedforward_dim = 256
        model_cfg.transformer[part].num_layers = layers
    model_cfg.num_classes = num_classes
    model_cfg.criterion.num_classes = num_classes
    model_cfg.device = "cpu"
    if kind == "dino":
        model_cfg.num_queries = 20
        model_cfg.dn_number = 3
    elif kind == "dn":
        model_cfg.in_channels = WIDTHS[-1]
        model_cfg.num_queries = 20
        model_cfg.denoising_groups = 2
    elif kind == "deform":
        model_cfg.num_queries = 20
        model_cfg.with_box_refine = True
        model_cfg.as_two_stage = True  # exercises the encoder (_enc) loss
    else:  # hdetr
        model_cfg.num_queries_one2one = 10
        model_cfg.num_queries_one2many = 20
        model_cfg.transformer.two_stage_num_proposals = 30
        model_cfg.k_one2many = 2
    return model_cfg


def tiny_batch(seed: int = 0) -> List[Dict]:
    """Two random images (64x64 and 56x64) with 2 and 1 boxes, detectron2 ``batched_inputs``."""
    from detectron2.structures import Boxes, Instances

    gen = torch.Generator().manual_seed(seed)
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
