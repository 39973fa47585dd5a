"""Host syncs of one training step and one inference of a detectron2-style model (issue 14).

:func:`count_host_syncs` runs a model through

* one **training step** of this project's :class:`~stageinteractor.d2.engine.Trainer` (the code
  path of ``tools/train_net.py``: forward, losses, backward, gradient clipping, AdamW step and
  the metrics written to the event storage), and
* one **inference** (``model.eval()``, ``no_grad``, ``model(batch)``: pre-processing, backbone,
  neck, decoder, top-k, ``Instances`` in original-image pixels),

each after one uncounted warm-up call, under :class:`stageinteractor.core.op_count.HostSyncCounter`.
The batch (the data loader's output) is marked as host memory. On the CPU this is the
counter's deterministic dry run; on a GPU it counts the real copies (and, with
``cuda_sync_debug=True``, PyTorch's sync-debug warnings as a cross-check).
"""

import itertools
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from detectron2.utils.events import EventStorage

from ..core.op_count import HostSyncCounter
from .engine import Trainer

__all__ = ["count_training_step", "count_inference", "count_host_syncs"]

#: gradient clipping of the configs (``configs/common/train.py``: global L2 norm, max 1.0):
#: part of the counted step, as the trainer logs the total norm.
DEFAULT_CLIP = {"max_norm": 1.0, "norm_type": 2.0}


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _host_optimizer_state(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """The optimizer's ``step`` counters, which PyTorch keeps in host memory unless the
    optimizer is ``capturable`` or ``fused`` (made in the warm-up step, before counting)."""
    out = []
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                out.append(step)
    return out


def count_training_step(
    model: nn.Module,
    batch: List[Dict[str, Any]],
    *,
    clip_grad: Optional[Dict[str, Any]] = DEFAULT_CLIP,
    amp: bool = False,
    warmup: int = 1,
    cuda_sync_debug: bool = False,
) -> Dict[str, Any]:
    """Host syncs of one ``Trainer.run_step`` on ``batch`` (AdamW, lr 1e-8: the weights barely
    move). Returns :meth:`HostSyncCounter.summary`."""
    device = _device(model)
    was_training = model.training  # (detectron2's trainer switches the model to train mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-8, weight_decay=1e-4)
    # with AMP the GradScaler runs on every device (on the CPU: the CUDA step's code path, so
    # that its per-step found-inf read is counted in the dry run too)
    trainer = Trainer(model, itertools.repeat(batch), optimizer, device=device.type, amp=amp,
                      clip_grad=clip_grad, seed=None, grad_scaler=amp or None)
    model.train()
    try:
        with EventStorage(0) as storage:
            for _ in range(warmup):
                trainer.run_step()
                storage.step()
            counter = HostSyncCounter(device, cuda_sync_debug=cuda_sync_debug)
            counter.mark_host(batch, _host_optimizer_state(optimizer))
            with counter:
                trainer.run_step()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return counter.summary()


def count_inference(
    model: nn.Module,
    batch: List[Dict[str, Any]],
    *,
    warmup: int = 1,
    cuda_sync_debug: bool = False,
) -> Dict[str, Any]:
    """Host syncs of one ``model(batch)`` in eval mode under ``no_grad``, up to the returned
    ``Instances`` (no read of them). Returns :meth:`HostSyncCounter.summary`."""
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(batch)
            counter = HostSyncCounter(device, cuda_sync_debug=cuda_sync_debug)
            counter.mark_host(batch)
            with counter:
                model(batch)
    finally:
        model.train(was_training)
    return counter.summary()


def count_host_syncs(model: nn.Module, batch: List[Dict[str, Any]], **kwargs) -> Dict[str, Any]:
    """``{"train_step": ..., "inference": ...}`` (:func:`count_training_step` with ``kwargs``,
    then :func:`count_inference`)."""
    debug = kwargs.get("cuda_sync_debug", False)
    return {
        "train_step": count_training_step(model, batch, **kwargs),
        "inference": count_inference(model, batch, cuda_sync_debug=debug),
    }
