"""The pieces every worker that runs the authors' code shares: their environment's imports, their
R50-100q detector, ``img_metas``, and the JSON-line serve loop.

Used by :mod:`.reference_worker` (inference timing), :mod:`.train_worker` (training-step
timing) and :mod:`.gradient_worker` (the gradient parity fixture), which run in the **authors'
Python environment** (their mmdet 2.12 fork, mmcv 1.x; ``scripts/build_official_env.py``
builds one). Imports only the standard library at the top (torch, numpy, mmcv and mmdet inside
the functions), so it imports in either environment; nothing of detectron2 / detrex.

Line protocol of the timing workers (stdin -> stdout, one JSON object per line; everything else
goes to stderr, :func:`protocol_stdout`): a ready line at start-up; each timed command ->
``{"wall_s", "cpu_s"}`` (wall clock and this process's CPU time around the call only); other
commands -> their own answer; ``quit`` -> ``{"bye": true}`` and exit; an unknown command or a
failing call -> ``{"error": "..."}`` and the worker stays up (:func:`serve`).
"""
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

__all__ = ["BUILD_HINT", "CONFIG", "DECODER_HEADS", "authors_import_error", "import_authors",
           "import_training_parts", "load_authors_config", "build_authors_detector",
           "perturb_heads", "image_meta", "reply", "protocol_stdout", "serve"]

BUILD_HINT = "python scripts/build_official_env.py VENV builds it (docs/OFFICIAL.md)"
#: their R50, 100-query config, relative to their repository
CONFIG = "configs/stageinteractor/stageinteractor_r50_1x_coco.py"
#: the detector's decoder: query generator and stages
DECODER_HEADS = ("rpn_head", "roi_head")


def authors_import_error(e: ImportError) -> SystemExit:
    """The one-line exit for a missing package of the authors' environment."""
    who = os.path.basename(sys.argv[0]) or "this worker"
    return SystemExit(f"{who}: run it with the Python of the authors' environment "
                      f"({BUILD_HINT}): {e}")


def import_authors(repo: str):
    """``(mmcv.Config, mmdet.models.build_detector)`` of the authors' repository ``repo`` (put
    first on ``sys.path``). Raises :func:`authors_import_error`'s SystemExit without them."""
    repo = os.path.abspath(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:  # the authors' environment only (not installed by this project's set-up step)
        from mmcv import Config
        from mmdet.models import build_detector
    except ImportError as e:
        raise authors_import_error(e) from None
    return Config, build_detector


def import_training_parts():
    """``(build_optimizer, OptimizerHook, StepLrUpdaterHook)`` of their mmcv.runner."""
    try:  # the authors' environment only
        from mmcv.runner import build_optimizer
        from mmcv.runner.hooks import OptimizerHook
        from mmcv.runner.hooks.lr_updater import StepLrUpdaterHook
    except ImportError as e:
        raise authors_import_error(e) from None
    return build_optimizer, OptimizerHook, StepLrUpdaterHook


def load_authors_config(repo: str):
    """Their :data:`CONFIG` (mmcv ``Config``) with ``model.pretrained = None``."""
    Config, _ = import_authors(repo)
    cwd = os.getcwd()
    os.chdir(repo)  # the config's _base_ paths are relative to the repository
    try:
        cfg = Config.fromfile(CONFIG)
    finally:
        os.chdir(cwd)
    cfg.model.pretrained = None
    return cfg


def build_authors_detector(repo: str):
    """``(detector, cfg)``: their :data:`CONFIG` built by ``build_detector`` (with the
    config's top-level ``train_cfg`` / ``test_cfg`` when it has them), weights not initialised."""
    cfg = load_authors_config(repo)
    _, build_detector = import_authors(repo)
    kw = {k: cfg.get(k) for k in ("train_cfg", "test_cfg") if cfg.get(k) is not None}
    return build_detector(cfg.model, **kw), cfg


def perturb_heads(model, seed: int, scale: float = 0.02) -> None:
    """``p += scale * N(0, 1)`` on every parameter of :data:`DECODER_HEADS`, drawn from
    ``torch.manual_seed(seed)`` in parameter order (queries, sampling points and boxes then
    differ between queries; ``tools/benchmark.py`` perturbs our decoder the same way)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name in DECODER_HEADS:
            for p in getattr(model, name).parameters():
                p.add_(scale * torch.randn_like(p))


def image_meta(h: int, w: int, pad_hw: Optional[Tuple[int, int]] = None) -> dict:
    """mmdet's ``img_meta`` of one h x w image (scale 1, no flip) in a batch padded to
    ``pad_hw`` (default: the image's own size)."""
    import numpy as np

    H, W = (h, w) if pad_hw is None else pad_hw
    return dict(img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(H, W, 3),
                batch_input_shape=(H, W), scale_factor=np.ones(4, dtype=np.float32), flip=False)


def reply(out, obj) -> None:
    """One protocol line."""
    out.write(json.dumps(obj) + "\n")
    out.flush()


def protocol_stdout():
    """The real stdout, kept for the protocol; ``sys.stdout`` becomes stderr (prints and logs
    of the authors' code), warnings and log records below ERROR are silenced."""
    out = sys.stdout
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    return out


def serve(out, ready: dict, timed: Dict[str, Callable[[], object]],
          other: Optional[Dict[str, Callable[[], dict]]] = None,
          context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
          lines: Optional[Sequence[str]] = None) -> None:
    """Answer ``ready``, then each line of ``lines`` (default stdin) until ``quit``: a
    ``timed`` command -> ``{"wall_s", "cpu_s"}`` of the call (run inside ``context()``, which
    is entered outside the timer), an ``other`` command -> its dict, errors -> ``{"error"}``."""
    other = other or {}
    reply(out, ready)
    for line in sys.stdin if lines is None else lines:
        cmd = line.strip()
        if not cmd:
            continue
        try:
            if cmd == "quit":
                reply(out, {"bye": True})
                return
            if cmd in timed:
                with context():
                    c0, t0 = time.process_time(), time.perf_counter()
                    timed[cmd]()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                reply(out, {"wall_s": wall, "cpu_s": cpu})
            elif cmd in other:
                reply(out, other[cmd]())
            else:
                reply(out, {"error": f"unknown command {cmd!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the client, worker stays up
            reply(out, {"error": f"{type(e).__name__}: {e}"})
