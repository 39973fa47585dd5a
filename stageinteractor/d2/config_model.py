"""The model a LazyConfig builds, on the meta device: its state-dict keys and shapes, no memory.

Used to check a converted checkpoint against the model a config builds
(``tools/convert_official_checkpoint.py --config``,
:func:`stageinteractor.official.checkpoint.check_against_model`).
"""
from __future__ import annotations

import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.registry import locate

from stageinteractor.official.checkpoint import ConversionError

__all__ = ["build_config_model"]


def build_config_model(config_file: str) -> torch.nn.Module:
    """``cfg.model`` of a LazyConfig, its parts built on the meta device (shapes only: no
    memory, no init time) where their constructors allow it, else on the CPU.

    Raises:
        ConversionError: ``config_file`` does not exist.
    """
    if not os.path.isfile(config_file):
        raise ConversionError(f"{config_file}: no such config file")
    cfg = LazyConfig.load(config_file)

    def build(node):
        try:
            with torch.device("meta"):
                return instantiate(node)
        except (NotImplementedError, RuntimeError):  # computes a value at construction
            return instantiate(node)

    try:
        with torch.device("meta"):
            return instantiate(cfg.model)
    except (NotImplementedError, RuntimeError):
        pass
    target = cfg.model._target_
    target = locate(target) if isinstance(target, str) else target
    return target(**{k: build(v) for k, v in cfg.model.items() if k != "_target_"})
