"""The timed calls: inference, training step, decoder alone, backbone + neck.

Each ``*_fn`` returns a callable without arguments that runs one call on a prepared batch.
Mixed precision (``amp``) is training's (:class:`stageinteractor.d2.engine.Trainer`): CUDA =
float16 autocast with a ``GradScaler`` in the training step, CPU = bfloat16 autocast without
one, so that AMP figures are those of training.
"""

import contextlib
from typing import Any, Callable, List, Optional, Tuple

__all__ = [
    "amp_dtype",
    "autocast",
    "inference_fn",
    "TrainStep",
    "train_fn",
    "decoder_fns",
]


def amp_dtype(device: str):
    """The autocast dtype of training's AMP on ``device``: float16 on CUDA, bfloat16 on CPU."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.bfloat16


def autocast(device: str, amp: bool):
    """``torch.autocast`` of training's AMP on ``device`` (a null context without ``amp``)."""
    import torch

    if not amp:
        return contextlib.nullcontext()
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=amp_dtype(device))


def inference_fn(model, batch, device: str, amp: bool) -> Callable[[], None]:
    """``model(batch)`` in eval mode under ``no_grad`` (and autocast with ``amp``)."""
    import torch

    def run():
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            model(batch)

    return run


class TrainStep:
    """One training step: forward (autocast with ``amp``), sum of the tensor losses, backward,
    AdamW step (lr 1e-6, weight decay 1e-4: the weights barely move between timed steps), built
    as the configs build it (:func:`stageinteractor.d2.engine.build_adamw`: fused where supported).

    With ``amp`` on CUDA the loss is scaled by a ``torch.amp.GradScaler("cuda")`` and the step
    goes through it (``scaler.step`` + ``scaler.update``), as in training; ``scaler`` is None
    otherwise. ``clip``: a max norm for the global L2 gradient norm clipping of training (after
    unscaling), None = no clipping. ``phase``: a callable ``phase(name)`` returning a context
    manager entered around each phase ("forward + losses", "backward", "clipping", "optimizer
    step"), e.g. ``torch.profiler.record_function``; default: no context.
    """

    PHASES = ("forward + losses", "backward", "clipping", "optimizer step")

    def __init__(self, model, batch, device: str, amp: bool, clip: Optional[float] = None):
        import torch

        self.model, self.batch, self.device, self.amp, self.clip = model, batch, device, amp, clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        from stageinteractor.d2.engine import build_adamw

        self.opt = build_adamw(self.params, lr=1e-6, weight_decay=1e-4)
        self.scaler: Optional[Any] = None
        if amp and str(device).startswith("cuda"):
            self.scaler = torch.amp.GradScaler("cuda")
        self.phase: Callable[[str], Any] = lambda name: contextlib.nullcontext()

    def __call__(self) -> None:
        import torch

        forward, backward, clipping, step = (self.phase(n) for n in self.PHASES)
        self.model.train()
        with forward:
            with autocast(self.device, self.amp):
                losses = self.model(self.batch)
            loss = sum(v for v in losses.values() if torch.is_tensor(v))
        self.opt.zero_grad(set_to_none=True)
        with backward:
            if self.scaler is None:
                loss.backward()
            else:
                self.scaler.scale(loss).backward()
        with clipping:
            if self.clip is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                               max_norm=self.clip, norm_type=2.0)
        with step:
            if self.scaler is None:
                self.opt.step()
            else:
                self.scaler.step(self.opt)
                self.scaler.update()


def train_fn(model, batch, device: str, amp: bool, clip: Optional[float] = None) -> TrainStep:
    """:class:`TrainStep` (a callable)."""
    return TrainStep(model, batch, device, amp, clip)


def decoder_fns(model, batch, device: str,
                amp: bool) -> Tuple[Optional[Callable], Optional[Callable]]:
    """(decoder + top-k on precomputed neck outputs, backbone + neck) callables under
    ``no_grad``, or (None, None) for models without ``extract_features``/``decoder.stages``."""
    import torch

    from stageinteractor.core.postprocess import topk_detections

    from .models import is_stageinteractor, normalized_images

    if not is_stageinteractor(model):
        return None, None
    model.eval()
    with torch.no_grad():
        images, sizes = normalized_images(model, batch)
        feats: List[Any] = [f.detach() for f in model.extract_features(images)]
    k = model.max_detections_per_image

    def dec():
        with torch.no_grad(), autocast(device, amp):
            out = model.decoder(feats, sizes)[-1]
            topk_detections(out["logits"].float(), out["boxes"].float(), k)

    def backbone():
        with torch.no_grad(), autocast(device, amp):
            model.extract_features(images)

    return dec, backbone
