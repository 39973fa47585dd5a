"""detrex layer: cross-stage label assignment (CSLA) criteria for detrex detectors.

Public API (imported lazily, so ``import stageinteractor.detrex_ext`` works without detrex):

* ``use_csla(cfg.model, **switches)`` -- turn a detrex DINO / DN-DETR / Deformable-DETR /
  H-Deformable-DETR (or plain ``SetCriterion``) model config into its CSLA twin.
* ``use_dca(cfg.model)`` -- dual cross-attention for DINO (paper Tab. 4).
* ``use_device_agnostic_dino(cfg.model)`` -- DINO whose denoising queries need no CUDA.
* ``CSLAMixin`` and the five twins ``CSLASetCriterion``, ``CSLADINOCriterion``,
  ``CSLADNCriterion``, ``CSLADeformableCriterion``, ``CSLAHDeformableCriterion``.
* ``DCADINOTransformerDecoder``, ``DeviceAgnosticDINO``.

Modules: ``csla_criterion`` (the mixin), ``criteria`` (the twins), ``swap`` (config swaps),
``dca`` (dual cross-attention), ``dino`` (device-agnostic DINO).
"""

import importlib

_EXPORTS = {
    "CSLAMixin": "csla_criterion",
    "CachedMatcher": "csla_criterion",
    "CSLASetCriterion": "criteria",
    "CSLADINOCriterion": "criteria",
    "CSLADNCriterion": "criteria",
    "CSLADeformableCriterion": "criteria",
    "CSLAHDeformableCriterion": "criteria",
    "CSLA_TWINS": "criteria",
    "use_csla": "swap",
    "use_dca": "swap",
    "use_device_agnostic_dino": "swap",
    "supported_criteria": "swap",
    "DCADINOTransformerDecoder": "dca",
    "DeviceAgnosticDINO": "dino",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
