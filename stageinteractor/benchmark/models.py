"""The measured models: LazyConfig loading and building (random weights), synthetic batches,
parameter counts and the decoder perturbation.

Works for this project's configs (StageInteractor, AdaMixer) and detrex configs (their own
model; on CPU a detrex ``DINO`` is swapped for the device-agnostic DINO of
``stageinteractor.detrex_ext``). detectron2 is imported inside the functions.
"""

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "add_import_roots",
    "load_model_config",
    "build_model",
    "is_stageinteractor",
    "num_classes",
    "make_batch",
    "decoder_module",
    "stage_list",
    "normalized_images",
    "param_counts",
    "perturb_decoder",
]


def add_import_roots(config_file: str) -> None:
    """detrex configs import ``projects.<name>``: put the repository root above ``projects/``
    (and detrex's checkout) on ``sys.path``."""
    path = os.path.abspath(config_file)
    marker = os.sep + "projects" + os.sep
    roots = [path[: path.index(marker)]] if marker in path else []
    try:
        import detrex

        roots.append(os.path.dirname(os.path.dirname(os.path.abspath(detrex.__file__))))
    except ImportError:
        pass
    for root in roots:
        if os.path.isdir(os.path.join(root, "projects")) and root not in sys.path:
            sys.path.append(root)


def load_model_config(config_file: str, opts: Sequence[str],
                      device: str) -> Tuple[Any, Dict[str, Any]]:
    """Load a LazyConfig through the tools' front (:func:`stageinteractor.d2.cli.load_config`:
    strict overrides, switch check), and make ``model`` buildable on ``device`` (detrex DINO ->
    device-agnostic DINO on CPU). Returns (model config node, info dict with ``config_file``,
    ``opts``, ``device_agnostic_dino``). A missing file, a bad override or a config without
    ``model`` raises a one-line :class:`~stageinteractor.errors.ConfigError`."""
    from stageinteractor.d2.cli import load_config
    from stageinteractor.errors import ConfigError

    if os.path.isfile(config_file):
        add_import_roots(config_file)
    cfg = load_config(config_file, list(opts))
    if "model" not in cfg:
        raise ConfigError(f"config {config_file} has no top-level 'model'")
    swapped = False
    if device == "cpu":
        try:
            from stageinteractor.detrex_ext.swap import use_device_agnostic_dino

            use_device_agnostic_dino(cfg.model)
            swapped = True
        except (ImportError, ValueError):
            pass  # not a detrex DINO model
    if "device" in cfg.model:
        cfg.model.device = device
    info = {"config_file": config_file, "opts": list(opts), "device_agnostic_dino": swapped}
    return cfg.model, info


def build_model(config_file: str, opts: Sequence[str], device: str, model_cfg=None, info=None):
    """Instantiate a LazyConfig's ``model`` (random weights) on ``device``: (model, info), info
    with the model's ``class`` and ``build_s`` added. ``model_cfg``/``info``: a config already
    loaded by :func:`load_model_config`."""
    from detectron2.config import instantiate

    if model_cfg is None:
        model_cfg, info = load_model_config(config_file, opts, device)
    t0 = time.perf_counter()
    model = instantiate(model_cfg).to(device)
    info = dict(info, **{"class": type(model).__qualname__, "build_s": time.perf_counter() - t0})
    return model, info


def is_stageinteractor(model) -> bool:
    """A model of this project's meta-architecture (``extract_features``, ``decoder.stages``,
    ``criterion``): the decoder can be timed and counted on its own."""
    return all(hasattr(model, a) for a in ("extract_features", "decoder", "criterion")) and hasattr(
        model.decoder, "stages"
    )


def num_classes(model) -> int:
    """``num_classes`` of the decoder or the model (80 when neither has one)."""
    for obj in (getattr(model, "decoder", None), model):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int):
            return n
    return 80


def make_batch(model, batch: int, h: int, w: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Synthetic detectron2 batch: ``batch`` uint8 (3, h, w) images, each with 8 random
    ground-truth boxes (XYXY pixels, inside the image) of random classes < num_classes."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(8, 2, generator=g)) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes(model), (8,), generator=g)
        out.append({"image": img, "height": h, "width": w, "instances": inst})
    return out


def decoder_module(model):
    """``model.decoder``, else ``model.transformer.decoder`` (detrex), else None."""
    if hasattr(model, "decoder"):
        return model.decoder
    tr = getattr(model, "transformer", None)
    return getattr(tr, "decoder", None)


def stage_list(decoder) -> Optional[Any]:
    """The decoder's ``stages`` (ours) or ``layers`` (detrex), else None."""
    for name in ("stages", "layers"):
        if decoder is not None and hasattr(decoder, name):
            return getattr(decoder, name)
    return None


def normalized_images(model, batch):
    """(normalised padded images (B, 3, H', W'), image sizes (B, 2)) of a StageInteractor-style
    model's pre-processing."""
    images = model.preprocess_image(batch)
    return images.tensor, model._image_sizes_tensor(images)


def param_counts(model) -> Dict[str, Any]:
    """``total`` / ``trainable`` parameters, per top-level module (``modules``), the decoder's
    (``decoder``, None without one) and per decoder stage (``decoder_stages``)."""

    def count(m):
        return sum(p.numel() for p in m.parameters())

    res = {
        "total": count(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "modules": {n: count(m) for n, m in model.named_children()},
    }
    dec = decoder_module(model)
    stages = stage_list(dec)
    res["decoder"] = count(dec) if dec is not None else None
    res["decoder_stages"] = [count(s) for s in stages] if stages is not None else []
    return res


def perturb_decoder(model, scale: float, seed: int = 0) -> None:
    """``p += scale * N(0, 1)`` on every decoder parameter (the authors' reference does the same
    to its rpn_head/roi_head): random-init generators have zero weights, so without it all
    queries would sample the same points (cache-friendly, not representative of a trained
    model) and boxes would not move between stages."""
    import torch

    dec = decoder_module(model)
    if dec is None or scale == 0:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
