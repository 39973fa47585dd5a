"""The CSLA twins of detrex's criteria: ``CSLAMixin`` in front of each detrex class.

=============================  =====================================================================
CSLA class                     detrex parent
=============================  =====================================================================
``CSLASetCriterion``           ``detrex.modeling.criterion.criterion.SetCriterion``
``CSLADINOCriterion``          ``projects.dino.modeling.DINOCriterion`` (TwoStageCriterion)
``CSLADNCriterion``            ``projects.dn_detr.modeling.DNCriterion``
``CSLADeformableCriterion``    ``projects.deformable_detr.modeling.DeformableCriterion``
``CSLAHDeformableCriterion``   ``projects.h_deformable_detr.modeling.DeformableCriterion``
=============================  =====================================================================

detrex's DINO and DN-DETR criteria build their denoising indices (and the zero losses used when
there is nothing to denoise) with hard-coded ``.cuda()``. The two twins here override exactly those
methods (``compute_dn_loss`` / ``calculate_dn_loss``) with device-agnostic versions that create
every tensor on the device of the predictions; the losses, normalisers and key names are the
parent's.
"""

from typing import Dict, List, Sequence, Tuple

import torch

from detrex.modeling.criterion.criterion import SetCriterion
from projects.deformable_detr.modeling import DeformableCriterion
from projects.dino.modeling import DINOCriterion
from projects.dn_detr.modeling import DNCriterion
from projects.h_deformable_detr.modeling import DeformableCriterion as HDeformableCriterion

from .csla_criterion import CSLAMixin

__all__ = [
    "CSLASetCriterion",
    "CSLADINOCriterion",
    "CSLADNCriterion",
    "CSLADeformableCriterion",
    "CSLAHDeformableCriterion",
    "CSLA_TWINS",
    "denoising_indices",
]

_Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def denoising_indices(
    num_gts: Sequence[int], groups: int, group_stride: int, device: torch.device
) -> _Indices:
    """Fixed (query, gt) pairs of the denoising part, one pair of 1-D long tensors per image.

    Ground truth ``t`` of an image in denoising group ``g`` sits at query ``g * group_stride + t``.
    Images without ground truths get two empty tensors. All tensors live on ``device``.
    """
    pairs = []
    for n in num_gts:
        if n > 0:
            tgt = torch.arange(n, device=device, dtype=torch.long).repeat(groups)
            offsets = torch.arange(groups, device=device, dtype=torch.long) * int(group_stride)
            src = offsets.repeat_interleave(n) + tgt
        else:
            src = tgt = torch.zeros(0, dtype=torch.long, device=device)
        pairs.append((src, tgt))
    return pairs


def _dn_losses(criterion, dn_outputs, targets, groups, group_stride, aux_num, num_boxes, device):
    """The ``_dn`` / ``_dn_{i}`` losses of detrex's DINO and DN-DETR criteria, on any device.

    ``dn_outputs`` is None when the batch had nothing to denoise; the keys are then zeros (as in
    detrex: ``loss_{class,bbox,giou}_dn`` and ``loss_{...}_dn_{i}``).
    """
    losses: Dict[str, torch.Tensor] = {}
    names = ("loss_class", "loss_bbox", "loss_giou")
    if dn_outputs is None:
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        losses.update({f"{n}_dn": zero() for n in names})
        for i in range(aux_num):
            losses.update({f"{n}_dn_{i}": zero() for n in names})
        return losses
    dn_idx = denoising_indices([len(t["labels"]) for t in targets], groups, group_stride, device)
    norm = num_boxes * groups
    layers = [("_dn", dn_outputs)] + [
        (f"_dn_{i}", dn_outputs["aux_outputs"][i]) for i in range(aux_num)
    ]
    for suffix, out in layers:
        for loss in criterion.losses:
            l_dict = criterion.get_loss(loss, out, targets, dn_idx, norm)
            losses.update({k + suffix: v for k, v in l_dict.items()})
    return losses


class CSLASetCriterion(CSLAMixin, SetCriterion):
    """CSLA twin of detrex's generic ``SetCriterion`` (DETR-style models, unit tests)."""


class CSLADeformableCriterion(CSLAMixin, DeformableCriterion):
    """CSLA twin of Deformable-DETR's criterion; ``_enc`` (binary, all tokens) stays one-to-one."""


class CSLAHDeformableCriterion(CSLAMixin, HDeformableCriterion):
    """CSLA twin of H-Deformable-DETR's criterion.

    The model calls the criterion twice per step (one-to-one, then one-to-many with 6x repeated
    targets); the second call is recognised by its logits and left to the parent unless
    ``csla_on_one2many=True``.
    """


class CSLADINOCriterion(CSLAMixin, DINOCriterion):
    """CSLA twin of DINO's criterion (``_enc`` on top-k proposals and ``_dn`` stay detrex's)."""

    def compute_dn_loss(self, dn_metas, targets, aux_num, num_boxes):
        """Device-agnostic ``DINOCriterion.compute_dn_loss`` (same keys and values)."""
        if dn_metas and "output_known_lbs_bboxes" in dn_metas:
            out = dn_metas["output_known_lbs_bboxes"]
            return _dn_losses(
                self,
                out,
                targets,
                int(dn_metas["dn_num"]),
                int(dn_metas["single_padding"]),
                aux_num,
                num_boxes,
                out["pred_logits"].device,
            )
        return _dn_losses(self, None, targets, 0, 0, aux_num, num_boxes, _device_of(targets))


class CSLADNCriterion(CSLAMixin, DNCriterion):
    """CSLA twin of DN-DETR's criterion (``denoising_output`` losses stay detrex's)."""

    def calculate_dn_loss(self, outputs, targets, aux_num, num_boxes):
        """Device-agnostic ``DNCriterion.calculate_dn_loss`` (same keys and values)."""
        if outputs and "denoising_output" in outputs:
            out = outputs["denoising_output"]
            return _dn_losses(
                self,
                out,
                targets,
                int(outputs["denoising_groups"]),
                int(outputs["max_gt_num_per_image"]),
                aux_num,
                num_boxes,
                out["pred_logits"].device,
            )
        device = outputs["pred_logits"].device if outputs and "pred_logits" in outputs else None
        return _dn_losses(
            self, None, targets, 0, 0, aux_num, num_boxes, device or _device_of(targets)
        )


def _device_of(targets) -> torch.device:
    for t in targets:
        return t["labels"].device
    return torch.device("cpu")


#: detrex criterion class -> its CSLA twin (used by :func:`stageinteractor.detrex_ext.use_csla`).
CSLA_TWINS = {
    SetCriterion: CSLASetCriterion,
    DINOCriterion: CSLADINOCriterion,
    DNCriterion: CSLADNCriterion,
    DeformableCriterion: CSLADeformableCriterion,
    HDeformableCriterion: CSLAHDeformableCriterion,
}
