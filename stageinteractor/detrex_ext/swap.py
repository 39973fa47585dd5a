"""One-line config swaps on detrex model configs (LazyConfig nodes), edited in place.

* :func:`use_csla` -- replace ``model.criterion._target_`` with its CSLA twin and set the ``csla_*``
  switches. The node keeps its matcher, the expanded ``weight_dict`` (aux ``_i``, ``_enc``, ``_dn``
  keys) and every other field, so the CSLA run differs from detrex's config in the classification
  targets only.
* :func:`use_dca` -- dual cross-attention for DINO: swap the decoder ``_target_`` to
  :class:`~stageinteractor.detrex_ext.dca.DCADINOTransformerDecoder` (same arguments).
* :func:`use_device_agnostic_dino` -- swap detrex ``DINO`` for
  :class:`~stageinteractor.detrex_ext.dino.DeviceAgnosticDINO` (CPU-capable denoising queries;
  identical computation on CUDA).
"""

from typing import Any, Optional, Sequence

__all__ = ["use_csla", "use_dca", "use_device_agnostic_dino", "supported_criteria"]


def _resolve(target: Any) -> Any:
    """A ``_target_`` value as a Python object (LazyConfig stores classes or dotted strings)."""
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        return locate(target)
    return target


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def supported_criteria() -> list:
    """Qualified names of the detrex criterion classes :func:`use_csla` can swap."""
    from .criteria import CSLA_TWINS

    return [_qualname(c) for c in CSLA_TWINS]


def use_csla(
    model_cfg: Any,
    *,
    enabled: bool = True,
    scope: Sequence[Optional[int]] = (-1, None),
    iou_threshold: float = 0.5,
    cls_norm: str = "max_positives",
    on_one2many: bool = False,
) -> Any:
    """Turn a detrex model config into its CSLA twin (in place; also returned).

    Args:
        model_cfg: a detrex ``model`` LazyConfig node with a ``criterion`` node whose ``_target_``
            is one of :func:`supported_criteria` (or already a CSLA twin: switches are updated).
        enabled, scope, iou_threshold, cls_norm, on_one2many: the ``csla_*`` switches of
            :class:`~stageinteractor.detrex_ext.csla_criterion.CSLAMixin`.

    Raises:
        ValueError: no ``criterion`` node, or an unsupported criterion class (named, with the
            supported ones listed).
    """
    from .criteria import CSLA_TWINS
    from .csla_criterion import CLS_NORMS

    crit = model_cfg.get("criterion", None) if hasattr(model_cfg, "get") else None
    if crit is None or "_target_" not in crit:
        raise ValueError("use_csla: model config has no 'criterion' node with a '_target_'")
    if cls_norm not in CLS_NORMS:
        raise ValueError(f"use_csla: cls_norm must be one of {CLS_NORMS}, got {cls_norm!r}")
    target = _resolve(crit._target_)
    twins = set(CSLA_TWINS.values())
    if target in CSLA_TWINS:
        crit._target_ = CSLA_TWINS[target]
    elif target not in twins:
        raise ValueError(
            f"use_csla: unsupported criterion {_qualname(target)!r} (model.criterion._target_); "
            f"supported: {supported_criteria()}"
        )
    crit.csla_enabled = bool(enabled)
    crit.csla_scope = list(scope)
    crit.csla_iou_threshold = float(iou_threshold)
    crit.csla_cls_norm = cls_norm
    crit.csla_on_one2many = bool(on_one2many)
    return model_cfg


def use_dca(model_cfg: Any, *, num_cross_attn: int = 2) -> Any:
    """Dual cross-attention for a detrex DINO model config (in place; also returned)."""
    from projects.dino.modeling import DINOTransformerDecoder

    from .dca import DCADINOTransformerDecoder

    try:
        dec = model_cfg.transformer.decoder
    except (AttributeError, KeyError):
        dec = None
    if dec is None or "_target_" not in dec:
        raise ValueError(
            "use_dca: model config has no 'transformer.decoder' node with a '_target_'"
        )
    target = _resolve(dec._target_)
    if target not in (DINOTransformerDecoder, DCADINOTransformerDecoder):
        raise ValueError(
            f"use_dca: unsupported decoder {_qualname(target)!r} "
            "(model.transformer.decoder._target_);"
            f" supported: {[_qualname(DINOTransformerDecoder)]}"
        )
    dec._target_ = DCADINOTransformerDecoder
    dec.num_cross_attn = int(num_cross_attn)
    return model_cfg


def use_device_agnostic_dino(model_cfg: Any) -> Any:
    """Swap detrex ``DINO`` for :class:`DeviceAgnosticDINO` (in place; also returned)."""
    from projects.dino.modeling import DINO

    from .dino import DeviceAgnosticDINO

    target = _resolve(model_cfg._target_) if "_target_" in model_cfg else None
    if target not in (DINO, DeviceAgnosticDINO):
        raise ValueError(
            f"use_device_agnostic_dino: model._target_ is {_qualname(target)!r}, expected "
            f"{_qualname(DINO)!r}"
        )
    model_cfg._target_ = DeviceAgnosticDINO
    return model_cfg
