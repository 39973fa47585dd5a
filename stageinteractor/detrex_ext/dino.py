"""A device-agnostic twin of detrex's ``DINO`` model (denoising queries without ``.cuda()``).

detrex's ``DINO.prepare_for_cdn`` creates its tensors with hard-coded ``.cuda()``, so DINO cannot
train on a CPU. :class:`DeviceAgnosticDINO` overrides only that method: every tensor is created on
the device of the ground-truth labels, and the random draws are made in the same order with the
same shapes as detrex's, so on CUDA the two models consume the RNG identically and produce the
same denoising queries. Parameters, buffers and state-dict keys are the parent's.
"""

from typing import Dict, List, Optional, Tuple

import torch

from detrex.utils import inverse_sigmoid
from projects.dino.modeling import DINO

__all__ = ["DeviceAgnosticDINO"]


class DeviceAgnosticDINO(DINO):
    """detrex ``DINO`` whose contrastive denoising (CDN) preparation runs on any device."""

    def prepare_for_cdn(
        self,
        targets: List[Dict[str, torch.Tensor]],
        dn_number: int,
        label_noise_ratio: float,
        box_noise_scale: float,
        num_queries: int,
        num_classes: int,
        hidden_dim: int,
        label_enc: torch.nn.Module,
    ) -> Tuple[
        Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[dict]
    ]:
        """Noised label/box queries, the (T, T) attention mask and ``dn_meta``.

        Returns ``(input_query_label (B, P, C), input_query_bbox (B, P, 4) in logit space,
        attn_mask (P + num_queries, P + num_queries) bool, {"single_padding", "dn_num"})`` with
        ``P = 2 * max_gt * groups``, or four Nones when there is nothing to denoise.
        """
        if dn_number <= 0:
            return None, None, None, None
        num_gts = [int(len(t["labels"])) for t in targets]
        max_gt = max(num_gts, default=0)
        if max_gt == 0:
            return None, None, None, None
        device = targets[0]["labels"].device
        # Each group holds a positive and a negative copy of every ground truth.
        groups = max((2 * dn_number) // (2 * max_gt), 1)
        copies = 2 * groups

        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        batch_idx = torch.cat(
            [torch.full_like(t["labels"].long(), b) for b, t in enumerate(targets)]
        )
        num_total = len(boxes)
        noisy_labels = labels.repeat(copies)
        query_bid = batch_idx.repeat(copies)
        clean_boxes = boxes.repeat(copies, 1)
        noisy_boxes = clean_boxes.clone()

        if label_noise_ratio > 0:
            draw = torch.rand_like(noisy_labels.float())
            flip = torch.nonzero(draw < label_noise_ratio * 0.5).view(-1)
            noisy_labels = noisy_labels.clone()
            noisy_labels.scatter_(0, flip, torch.randint_like(flip, 0, num_classes))

        if box_noise_scale > 0:
            # Copy 2g holds positives, copy 2g+1 negatives (pushed by an extra +1 of the half-size).
            pos = torch.arange(num_total, device=device).repeat(groups) + (
                torch.arange(groups, device=device) * num_total * 2
            ).repeat_interleave(num_total)
            neg = pos + num_total
            half_wh = clean_boxes[:, 2:] / 2
            xyxy = torch.cat([clean_boxes[:, :2] - half_wh, clean_boxes[:, :2] + half_wh], dim=1)
            spread = torch.cat([half_wh, half_wh], dim=1)
            sign = torch.randint_like(clean_boxes, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
            magnitude = torch.rand_like(clean_boxes)
            magnitude[neg] += 1.0
            magnitude *= sign
            xyxy = (xyxy + magnitude * spread * box_noise_scale).clamp(min=0.0, max=1.0)
            noisy_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)

        label_embed = label_enc(noisy_labels.long())
        bbox_embed = inverse_sigmoid(noisy_boxes)

        pad_size = max_gt * copies
        batch = len(targets)
        input_query_label = torch.zeros(batch, pad_size, hidden_dim, device=device)
        input_query_bbox = torch.zeros(batch, pad_size, 4, device=device)
        slot_in_copy = torch.cat([torch.arange(n, device=device) for n in num_gts]).long()
        slots = torch.cat([slot_in_copy + max_gt * c for c in range(copies)])
        input_query_label[(query_bid.long(), slots)] = label_embed
        input_query_bbox[(query_bid.long(), slots)] = bbox_embed

        # True = may not attend. Matching queries never see denoising queries; each denoising
        # group (2 * max_gt queries) sees only itself among the denoising queries.
        total = pad_size + num_queries
        attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        attn_mask[pad_size:, :pad_size] = True
        group_size = 2 * max_gt
        for g in range(groups):
            lo, hi = g * group_size, (g + 1) * group_size
            attn_mask[lo:hi, :lo] = True
            attn_mask[lo:hi, hi:pad_size] = True

        dn_meta = {"single_padding": group_size, "dn_num": groups}
        return input_query_label, input_query_bbox, attn_mask, dn_meta
