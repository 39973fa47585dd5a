"""Counts of one call, independent of timing: fvcore FLOPs (multiply-adds), aten calls of the
decoder (``stageinteractor.core.op_count``) and host syncs (``stageinteractor.d2.sync_count``).
"""

from typing import Any, Dict, Optional

from .log import log
from .models import decoder_module, is_stageinteractor, make_batch, normalized_images, stage_list

__all__ = ["count_flops", "count_ops", "count_syncs"]


def _inference_module(model):
    """Backbone + neck + decoder + top-k as one module; every stage's outputs are returned so
    that the trace keeps the heads of all stages (the eager model computes them)."""
    from torch import nn

    from stageinteractor.core.postprocess import topk_detections

    class _Inference(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, images, sizes):
            outs = self.model.decoder(self.model.extract_features(images), sizes)
            det = topk_detections(
                outs[-1]["logits"], outs[-1]["boxes"], self.model.max_detections_per_image
            )
            return tuple(o[k] for o in outs for k in ("logits", "boxes")) + (
                det["scores"],
                det["boxes"],
            )

    return _Inference(model)


def count_flops(model, h: int, w: int) -> Dict[str, Any]:
    """fvcore multiply-adds (incl. batched matrix products, ``stageinteractor.d2.flops``) of a
    batch-1 inference at (h, w): ``total``, ``by_operator``, ``matrix_products``, per top-level
    module (``modules``), ``unsupported_ops``, and ``decoder`` / ``decoder_stages``."""
    import torch

    from stageinteractor.d2.flops import flop_analysis, matrix_product_flops

    batch = make_batch(model, 1, h, w)
    model.eval()
    with torch.no_grad():
        if is_stageinteractor(model):
            analysis = flop_analysis(_inference_module(model), normalized_images(model, batch))
        else:
            analysis = flop_analysis(model, batch, detectron2_inputs=True)
    by_module = {
        k[len("model.") :] if k.startswith("model.") else k: int(v)
        for k, v in analysis.by_module().items()
    }
    res = {
        "total": int(analysis.total()),
        "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
        "matrix_products": matrix_product_flops(analysis),
        "modules": {n: by_module.get(n, 0) for n, _ in model.named_children()},
        "unsupported_ops": dict(analysis.unsupported_ops()),
    }
    dec = decoder_module(model)
    stages = stage_list(dec)
    dec_name = next((n for n, m in model.named_modules() if m is dec), None)
    if dec_name is not None:
        res["decoder"] = by_module.get(dec_name, 0)
        sname = "stages" if hasattr(dec, "stages") else "layers"
        res["decoder_stages"] = [
            by_module.get(f"{dec_name}.{sname}.{i}", 0) for i in range(len(stages or []))
        ]
    return res


def count_ops(model, h: int, w: int) -> Dict[str, Any]:
    """aten calls of one batch-1 ``no_grad`` decoder inference (+ top-k; ``inference``) and of
    the forward of one training step (decoder + criterion; ``train_forward``), each an
    ``OpCounter.summary()``, and ``csla_enabled`` (the criterion's assigner switch)."""
    import torch

    from stageinteractor.core.op_count import count_decoder_inference, count_decoder_training
    from stageinteractor.core.postprocess import topk_detections

    batch = make_batch(model, 1, h, w)
    with torch.no_grad():
        model.eval()
        images, sizes = normalized_images(model, batch)
        feats = [f.detach() for f in model.extract_features(images)]
    k = model.max_detections_per_image
    inf = count_decoder_inference(
        model.decoder,
        feats,
        sizes,
        postprocess=lambda outs: topk_detections(outs[-1]["logits"], outs[-1]["boxes"], k),
    )
    model.train()
    gt_boxes, gt_classes, gt_mask = model.prepare_targets(batch)
    targets = {"gt_boxes": gt_boxes, "gt_classes": gt_classes, "gt_mask": gt_mask}
    tr = count_decoder_training(model.decoder, model.criterion, feats, sizes, targets)
    model.zero_grad(set_to_none=True)
    model.eval()
    assigner = getattr(model.criterion, "assigner", None)
    return {
        "inference": inf,
        "train_forward": tr,
        "csla_enabled": getattr(assigner, "enabled", None) if assigner is not None else None,
    }


def count_syncs(model, batch_size: int, h: int, w: int) -> Optional[Dict[str, Any]]:
    """Host syncs of one training step and one inference at ``batch_size`` x h x w
    (``{"train_step": ..., "inference": ...}``); None (logged) when the model cannot run them."""
    from stageinteractor.d2.sync_count import count_host_syncs

    log(f"counting host syncs (batch {batch_size}, {h}x{w})")
    try:
        return count_host_syncs(model, make_batch(model, batch_size, h, w))
    except Exception as e:  # noqa: BLE001 - e.g. a detrex model that needs more queries
        log(f"host-sync count failed: {type(e).__name__}: {e}")
        return None
