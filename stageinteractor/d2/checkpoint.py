"""ImageNet initialisation of the StageInteractor backbones (detectron2 layer).

:func:`map_imagenet_backbone_state_dict` maps an ImageNet checkpoint, in any of the layouts
below, to the key names of our backbones (:mod:`stageinteractor.d2.backbone`) with the
full-model prefix ``backbone.``. Every input key is accounted for: it is either *mapped*, or
*dropped* on purpose (with a reason), or it is *unknown* and a
:class:`UnknownCheckpointKeysError` listing all unknown keys is raised.

Supported formats (``fmt``; ``"auto"`` detects them):

``"d2"``
    detectron2's torchvision-converted ResNets (``R-50.pkl``/``R-101.pkl`` written by
    ``tools/convert-torchvision-to-d2.py``; values are numpy arrays):
    ``stem.conv1.weight``, ``stem.conv1.norm.*``, ``res{k}.{b}.conv{1,2,3}.weight``,
    ``res{k}.{b}.conv{i}.norm.*``, ``res{k}.0.shortcut.weight``, ``res{k}.0.shortcut.norm.*``.
    These are our names already. Dropped: ``stem.fc.*`` (the classifier, which that script
    renames to ``stem.fc``), ``*.num_batches_tracked``.
    (The Caffe2/MSRA ``R-50.pkl`` with ``res2_0_branch2a_w`` names is a stride-in-1x1 model
    and is *not* supported: it raises with the list of unknown keys.)
``"torchvision"``
    torchvision ``resnet50/101`` state dicts and the open-mmlab ``resnext101_32x4d``
    checkpoint (same names; mmcv ``{"state_dict": ...}`` wrappers are unwrapped), also mmdet
    DCN offsets: ``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``,
    ``layer{L}.{b}`` -> ``res{L+1}.{b}``, ``bn{i}`` -> ``conv{i}.norm``,
    ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``,
    ``conv2.conv_offset`` -> ``conv2_offset``. Dropped: ``fc.*``, ``*.num_batches_tracked``.
``"swin"``
    the official Microsoft Swin checkpoints (``swin_small_patch4_window7_224.pth``,
    ``{"model": ...}``): names are kept (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
    ``layers.{i}.downsample.*``, ``norm{i}.*`` if present). Dropped: ``head.*`` (classifier),
    ``norm.*`` (the classifier's final LayerNorm; our ``norm3`` keeps its default init as in the
    official code), ``*.attn_mask`` (recomputed for each input size).
``"swin_mmdet"``
    the mmdet/mmcv Swin layout used by the authors' fork (``patch_embed.projection``,
    ``stages.{i}.blocks.{j}.attn.w_msa.*``, ``ffn.layers.0.0`` / ``ffn.layers.1``,
    ``stages.{i}.downsample.*``, ``norm{i}``); the Unfold channel order of
    ``downsample.reduction.weight`` / ``downsample.norm.*`` is converted back to Microsoft order.

Container entries are handled too: a ``"model"`` or ``"state_dict"`` sub-dict is unwrapped
(other top-level entries such as ``meta``/``optimizer``/``__author__`` are reported as
dropped), a ``module.`` prefix on every key is removed, and a ``backbone.`` prefix on every key
is removed before mapping (so a backbone-only slice of a detector checkpoint works).

Use with detectron2:

* :class:`StageInteractorCheckpointer` (a ``DetectionCheckpointer``; or add
  :class:`ImageNetInitMixin` to any other checkpointer class) converts ImageNet checkpoints on
  the fly, so ``train.init_checkpoint = "detectron2://ImageNetPretrained/
  torchvision/R-50.pkl"`` (or a torchvision/open-mmlab/Swin ``.pth``) just works; detector
  checkpoints (keys outside the backbone) pass through untouched.
* or convert once: ``python -m stageinteractor.d2.checkpoint IN OUT.pth`` writes
  ``{"model": {backbone.*}, "__author__": ..., "matching_heuristics": False}``, loadable by the
  stock ``DetectionCheckpointer``.
"""
import argparse
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "IMAGENET_FORMATS",
    "KeyMappingReport",
    "UnknownCheckpointKeysError",
    "detect_imagenet_format",
    "map_imagenet_backbone_state_dict",
    "check_against_model",
    "maybe_convert_imagenet_checkpoint",
    "ImageNetInitMixin",
    "StageInteractorCheckpointer",
    "convert_file",
]

logger = logging.getLogger(__name__)

IMAGENET_FORMATS = ("d2", "torchvision", "swin", "swin_mmdet")

_BN = r"(weight|bias|running_mean|running_var)"
_NBT = "BN step counter (unused: our BN never updates statistics)"


class UnknownCheckpointKeysError(KeyError):
    """Raised when a checkpoint holds keys that no rule maps or drops."""

    def __init__(self, fmt: str, keys: Sequence[str]):
        self.fmt = fmt
        self.keys = list(keys)
        msg = (
            f"{len(self.keys)} checkpoint key(s) are unknown for format {fmt!r} "
            f"(neither mapped nor intentionally dropped):\n  " + "\n  ".join(self.keys)
        )
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


@dataclass
class KeyMappingReport:
    """What happened to every input key."""

    format: str
    mapped: List[Tuple[str, str]] = field(default_factory=list)  # (source key, target key)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (source key, reason)

    def summary(self) -> str:
        reasons: Dict[str, int] = {}
        for _, r in self.dropped:
            reasons[r] = reasons.get(r, 0) + 1
        lines = [f"ImageNet checkpoint format {self.format!r}: {len(self.mapped)} keys mapped, "
                 f"{len(self.dropped)} dropped"]
        lines += [f"  dropped {n} x {r}" for r, n in reasons.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Per-format rules: (regex on the source key, replacement template | None, drop reason | None).
# The first matching rule wins; a key matching no rule is unknown.
Rule = Tuple[str, Optional[str], Optional[str]]

_D2_RULES: List[Rule] = [
    (r".*\.num_batches_tracked", None, _NBT),
    (r"stem\.fc\.(weight|bias)", None, "ImageNet classifier"),
    (rf"stem\.conv1\.weight", r"stem.conv1.weight", None),
    (rf"stem\.conv1\.norm\.{_BN}", r"stem.conv1.norm.\1", None),
    (r"(res[2-5]\.\d+)\.(conv[123]|shortcut)\.weight", r"\1.\2.weight", None),
    (rf"(res[2-5]\.\d+)\.(conv[123]|shortcut)\.norm\.{_BN}", r"\1.\2.norm.\3", None),
    (r"(res[3-5]\.\d+)\.conv2_offset\.(weight|bias)", r"\1.conv2_offset.\2", None),
]


def _layer_to_res(m: "re.Match") -> str:
    return f"res{int(m.group(1)) + 1}.{m.group(2)}"


_TV_RULES: List[Rule] = [
    (r".*\.num_batches_tracked", None, _NBT),
    (r"fc\.(weight|bias)", None, "ImageNet classifier"),
    (r"conv1\.weight", r"stem.conv1.weight", None),
    (rf"bn1\.{_BN}", r"stem.conv1.norm.\1", None),
    (r"layer([1-4])\.(\d+)\.conv([123])\.weight", "L.conv\\3.weight", None),
    (rf"layer([1-4])\.(\d+)\.bn([123])\.{_BN}", "L.conv\\3.norm.\\4", None),
    (r"layer([1-4])\.(\d+)\.downsample\.0\.weight", "L.shortcut.weight", None),
    (rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}", "L.shortcut.norm.\\3", None),
    (r"layer([2-4])\.(\d+)\.conv2\.conv_offset\.(weight|bias)", "L.conv2_offset.\\3", None),
]

_SWIN_RULES: List[Rule] = [
    (r"head\.(weight|bias)", None, "ImageNet classifier"),
    (r"norm\.(weight|bias)", None, "classifier's final LayerNorm (not an output norm)"),
    (r"layers\.\d+\.blocks\.\d+\.attn_mask", None, "shift mask buffer (recomputed per input size)"),
    (r"patch_embed\.(proj|norm)\.(weight|bias)", r"patch_embed.\1.\2", None),
    (r"layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
     r"\.(weight|bias)", r"layers.\1.blocks.\2.\3.\4", None),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(relative_position_bias_table|relative_position_index)",
     r"layers.\1.blocks.\2.attn.\3", None),
    (r"layers\.(\d+)\.downsample\.reduction\.weight",
     r"layers.\1.downsample.reduction.weight", None),
    (r"layers\.(\d+)\.downsample\.norm\.(weight|bias)", r"layers.\1.downsample.norm.\2", None),
    (r"norm([0-3])\.(weight|bias)", r"norm\1.\2", None),
]

_SWIN_MMDET_RULES: List[Rule] = [
    (r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1", None),
    (r"patch_embed\.norm\.(weight|bias)", r"patch_embed.norm.\1", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)",
     r"layers.\1.blocks.\2.\3.\4", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(qkv|proj)\.(weight|bias)",
     r"layers.\1.blocks.\2.attn.\3.\4", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\."
     r"(relative_position_bias_table|relative_position_index)",
     r"layers.\1.blocks.\2.attn.\3", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)",
     r"layers.\1.blocks.\2.mlp.fc1.\3", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)",
     r"layers.\1.blocks.\2.mlp.fc2.\3", None),
    (r"stages\.(\d+)\.downsample\.reduction\.weight",
     r"layers.\1.downsample.reduction.weight", None),
    (r"stages\.(\d+)\.downsample\.norm\.(weight|bias)", r"layers.\1.downsample.norm.\2", None),
    (r"norm([0-3])\.(weight|bias)", r"norm\1.\2", None),
]

_RULES: Dict[str, List[Rule]] = {
    "d2": _D2_RULES,
    "torchvision": _TV_RULES,
    "swin": _SWIN_RULES,
    "swin_mmdet": _SWIN_MMDET_RULES,
}
_COMPILED = {f: [(re.compile(p), r, d) for p, r, d in rules] for f, rules in _RULES.items()}


def _apply_rule(fmt: str, m: "re.Match", repl: str) -> str:
    if fmt == "torchvision" and repl.startswith("L."):
        return _layer_to_res(m) + m.expand(repl[1:])
    return m.expand(repl)


def _unfold_to_microsoft(t: torch.Tensor) -> torch.Tensor:
    """Undo mmcv's Unfold channel order of patch merging ((C, 4) channel-major, kernel taps
    row-major) -> Microsoft order (4 chunks x0=(0,0), x1=(1,0), x2=(0,1), x3=(1,1), each C)."""
    if t.dim() == 2:  # reduction weight (out, 4C)
        out, inc = t.shape
        return t.reshape(out, inc // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(out, inc)
    (inc,) = t.shape  # norm weight/bias (4C,)
    return t.reshape(inc // 4, 4).t()[[0, 2, 1, 3], :].reshape(inc)


# ---------------------------------------------------------------------------------------------
def _unwrap(ckpt: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[Tuple[str, str]]]:
    """Return (flat state dict, dropped container entries)."""
    dropped: List[Tuple[str, str]] = []
    sd: Mapping[str, Any] = ckpt
    for container in ("model", "state_dict", "model_state"):
        while isinstance(sd.get(container, None), Mapping):
            dropped += [(k, "checkpoint container entry (not a weight)")
                        for k in sd if k != container]
            sd = sd[container]
    sd = dict(sd)
    for pre in ("module.", "backbone."):
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd, dropped


def detect_imagenet_format(ckpt: Mapping[str, Any]) -> Optional[str]:
    """Return one of :data:`IMAGENET_FORMATS` if ``ckpt`` looks like a backbone-only ImageNet
    checkpoint, else None (e.g. a full detector checkpoint)."""
    sd, _ = _unwrap(ckpt)
    keys = set(sd)
    if not keys:
        return None
    if "patch_embed.proj.weight" in keys:
        return "swin"
    if "patch_embed.projection.weight" in keys:
        return "swin_mmdet"
    if "stem.conv1.weight" in keys:
        return "d2"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    return None


def _to_tensor(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def map_imagenet_backbone_state_dict(
    ckpt: Mapping[str, Any],
    fmt: str = "auto",
    prefix: str = "backbone.",
) -> Tuple["OrderedDict[str, torch.Tensor]", KeyMappingReport]:
    """Map an ImageNet checkpoint to our backbone keys.

    Args:
        ckpt: a loaded checkpoint: a state dict, or a dict with a ``model`` / ``state_dict``
            entry. Values may be tensors or numpy arrays (d2 ``.pkl``); they come back as tensors.
        fmt: one of :data:`IMAGENET_FORMATS`, or ``"auto"``.
        prefix: prepended to every output key (``"backbone."`` for the full detector; ``""`` to
            load into a bare backbone).

    Returns:
        ``(mapped_state_dict, report)``.

    Raises:
        UnknownCheckpointKeysError: listing every key that is neither mapped nor dropped.
        ValueError: if the format cannot be detected or two keys map to the same target.
    """
    sd, dropped = _unwrap(ckpt)
    if fmt == "auto":
        fmt = detect_imagenet_format(sd)
        if fmt is None:
            raise ValueError(
                "cannot detect the ImageNet checkpoint format; supported: "
                f"{IMAGENET_FORMATS}. First keys: {list(sd)[:8]}"
            )
    if fmt not in _COMPILED:
        raise ValueError(f"unknown format {fmt!r}; supported: {IMAGENET_FORMATS}")
    report = KeyMappingReport(format=fmt, dropped=dropped)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unknown: List[str] = []
    for key, value in sd.items():
        for pat, repl, reason in _COMPILED[fmt]:
            m = pat.fullmatch(key)
            if m is None:
                continue
            if repl is None:
                report.dropped.append((key, reason))
            else:
                target = prefix + _apply_rule(fmt, m, repl)
                if target in out:
                    raise ValueError(f"two checkpoint keys map to {target!r}")
                value = _to_tensor(value)
                if fmt == "swin_mmdet" and ".downsample." in key:
                    value = _unfold_to_microsoft(value)
                out[target] = value
                report.mapped.append((key, target))
            break
        else:
            unknown.append(key)
    if unknown:
        raise UnknownCheckpointKeysError(fmt, unknown)
    return out, report


def check_against_model(
    mapped: Mapping[str, torch.Tensor], model: torch.nn.Module, prefix: str = "backbone."
) -> Dict[str, List[str]]:
    """Compare a mapped dict with ``model.state_dict()`` restricted to ``prefix``.

    Returns ``{"missing": [...], "unexpected": [...], "shape_mismatch": [...]}``.
    (For X101-DCN ImageNet weights the ``conv2_offset`` keys are legitimately missing: the
    offset convs stay zero-initialised.)"""
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in mapped if k not in target]
    mismatch = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in mapped
        if k in target and tuple(mapped[k].shape) != tuple(target[k].shape)
    ]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": mismatch}


# ---------------------------------------------------------------------------------------------
def maybe_convert_imagenet_checkpoint(
    checkpoint: Dict[str, Any], prefix: str = "backbone.", log: Optional[logging.Logger] = None
) -> Optional[KeyMappingReport]:
    """In-place hook for detectron2 checkpointers: if ``checkpoint["model"]`` is a
    backbone-only ImageNet checkpoint (:func:`detect_imagenet_format`), replace it by the mapped
    dict, switch off detectron2's name-matching heuristics and return the report; otherwise
    leave ``checkpoint`` untouched and return None."""
    model_sd = checkpoint.get("model", None)
    fmt = detect_imagenet_format(model_sd) if isinstance(model_sd, Mapping) else None
    if fmt is None:
        return None
    mapped, report = map_imagenet_backbone_state_dict(model_sd, fmt=fmt, prefix=prefix)
    (log or logger).info(report.summary())
    checkpoint["model"] = mapped
    checkpoint["matching_heuristics"] = False
    return report


class ImageNetInitMixin:
    """Mixin for any fvcore/detectron2 ``Checkpointer`` subclass (put it first in the bases):
    ImageNet backbone checkpoints are mapped by :func:`maybe_convert_imagenet_checkpoint`
    (prefix ``self.backbone_prefix``, default ``"backbone."``) before the usual loading; all
    other checkpoints (detector weights, resume) are loaded exactly as before. Missing
    ``neck.*``/``decoder.*`` keys are then reported by detectron2 as usual for ImageNet init."""

    backbone_prefix: str = "backbone."

    def _load_model(self, checkpoint):
        maybe_convert_imagenet_checkpoint(
            checkpoint, self.backbone_prefix, getattr(self, "logger", None)
        )
        return super()._load_model(checkpoint)


try:  # keep the key mapping importable without detectron2
    from detectron2.checkpoint import DetectionCheckpointer as _DetectionCheckpointer
except ImportError:  # pragma: no cover
    _DetectionCheckpointer = None

if _DetectionCheckpointer is not None:

    class StageInteractorCheckpointer(ImageNetInitMixin, _DetectionCheckpointer):
        """``DetectionCheckpointer`` + :class:`ImageNetInitMixin`: ``load(path)`` accepts every
        format of :data:`IMAGENET_FORMATS` (e.g. ``detectron2://ImageNetPretrained/torchvision/
        R-50.pkl``, torchvision ``resnet50-*.pth``, open-mmlab ResNeXt, official Swin).

        Args: as ``DetectionCheckpointer`` plus ``backbone_prefix="backbone."``.
        """

        def __init__(self, model, save_dir="", *, backbone_prefix="backbone.", **kwargs):
            super().__init__(model, save_dir, **kwargs)
            self.backbone_prefix = backbone_prefix


def _load_any(path: str) -> Mapping[str, Any]:
    if path.endswith(".pkl"):
        import pickle

        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def convert_file(
    src: str, dst: str, fmt: str = "auto", prefix: str = "backbone."
) -> KeyMappingReport:
    """Convert an ImageNet checkpoint file to a detectron2 ``.pth`` holding only
    ``{prefix}*`` keys (loadable by the stock ``DetectionCheckpointer``)."""
    mapped, report = map_imagenet_backbone_state_dict(_load_any(src), fmt=fmt, prefix=prefix)
    torch.save(
        {
            "model": mapped,
            "__author__": f"stageinteractor ImageNet conversion ({report.format})",
            "matching_heuristics": False,
        },
        dst,
    )
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--format", default="auto", choices=("auto",) + IMAGENET_FORMATS)
    parser.add_argument("--prefix", default="backbone.")
    args = parser.parse_args(argv)
    print(convert_file(args.src, args.dst, args.format, args.prefix).summary())


if __name__ == "__main__":
    main()
