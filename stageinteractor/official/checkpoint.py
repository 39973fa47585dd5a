"""Convert the authors' (mmdet 2.12 fork) StageInteractor checkpoints to our layout and back.

Official layout: :func:`official_layout` (generated; the authors' parameter counts per backbone
are checked in ``tests/d2/test_official_checkpoint.py``). A checkpoint is a
``torch.save`` dict ``{"meta", "state_dict", "optimizer"}`` (or a bare state dict) with keys
``backbone.*`` (R50 / R101 / X101-DCN / Swin-S), ``neck.*`` (ChannelMapping), ``rpn_head.*``
(initial queries) and ``roi_head.bbox_head.{s}.*`` (the decoder stages).

Our model (:class:`stageinteractor.d2.meta_arch.StageInteractor`) holds ``backbone.``,
``neck.`` and ``decoder.``. The decoder part of the mapping lives in the core
(:mod:`stageinteractor.official.layout`); this module adds

* the backbone and neck layouts and renames (incl. the Swin patch-merging re-ordering);
* :func:`convert_official_to_ours` / :func:`convert_ours_to_official` on state dicts, which
  check every key against the generated official layout;
* file handling with one clear :class:`ConversionError` per bad input (not a checkpoint,
  truncated file, another detector) and an atomic writer.

The CLI is ``tools/convert_official_checkpoint.py``. Nothing here uses detectron2: the tool
builds a LazyConfig's model (:func:`stageinteractor.d2.config_model.build_config_model`) to
check a converted state dict against it (:func:`check_against_model`).
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from stageinteractor.official.layout import (
    OURS_CONTENT_KEY,
    OURS_STAGES_PREFIX,
    DecoderHParams,
    FusedMap,
    KeyMap,
    decoder_key_maps,
    official_decoder_layout,
)

__all__ = [
    "BACKBONES",
    "ConversionError",
    "ConversionReport",
    "official_backbone_layout",
    "official_neck_layout",
    "official_layout",
    "key_maps",
    "detect_backbone",
    "load_checkpoint_file",
    "extract_official_state_dict",
    "convert_official_to_ours",
    "convert_ours_to_official",
    "check_against_model",
    "save_atomically",
]

BACKBONES = ("r50", "r101", "x101_dcn", "swin_s")
_RESNET_BLOCKS = {"r50": (3, 4, 6, 3), "r101": (3, 4, 23, 3), "x101_dcn": (3, 4, 23, 3)}
_SWIN_DEPTHS, _SWIN_HEADS, _SWIN_EMBED, _SWIN_WINDOW = (2, 2, 18, 2), (3, 6, 12, 24), 96, 7
_SWIN_UNFOLD_PERM = [0, 2, 1, 3]  # Microsoft 2x2 chunk m  <->  nn.Unfold kernel position p

Shape = Tuple[int, ...]


class ConversionError(Exception):
    """A checkpoint cannot be converted; the message names the file/key, found and expected."""


@dataclass
class ConversionReport:
    """What a conversion did: ``mapped`` official->ours pairs, ``dropped`` key->reason,
    ``warnings`` (e.g. non-zero dead layers), ``backbone``, ``num_queries`` and ``num_classes``."""

    backbone: str = ""
    num_queries: int = 0
    num_classes: int = 0
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    ignored_top_level: List[str] = field(default_factory=list)

    def summary(self) -> str:
        n_ours = len({o for _, o in self.mapped})
        fused: Dict[str, int] = {}
        for _, o in self.mapped:
            fused[o] = fused.get(o, 0) + 1
        n_fused_src = sum(c for c in fused.values() if c > 1)
        n_fused_dst = sum(1 for c in fused.values() if c > 1)
        lines = [
            f"backbone: {self.backbone}, queries: {self.num_queries}, classes: {self.num_classes}",
            f"mapped: {len(self.mapped)} keys -> {n_ours} keys of ours ({n_fused_src} official generator "
            f"tensors fused into {n_fused_dst} per-stage 'generator' tensors)",
            f"dropped: {len(self.dropped)} keys",
        ]
        by_reason: Dict[str, List[str]] = {}
        for k, why in self.dropped.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            lines.append(f"  {len(keys):4d} x {why} (e.g. {keys[0]})")
        n_dead = sum(1 for k in self.dropped if ".subbox_score_list." in k)
        if n_dead and not any("dead layer" in w for w in self.warnings):
            lines.append(f"dead subbox_score tensors: {n_dead}, all zero (checked)")
        if self.ignored_top_level:
            lines.append("not converted (training state / metadata): " + ", ".join(self.ignored_top_level))
        for w in self.warnings:
            lines.append("WARNING: " + w)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Official layouts (spec §4, §5, §8)
# --------------------------------------------------------------------------------------------

def _bn_layout(prefix: str, c: int) -> "OrderedDict[str, Shape]":
    return OrderedDict(
        (f"{prefix}.{n}", (c,) if n != "num_batches_tracked" else ())
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    )


def _resnet_layout(kind: str) -> "OrderedDict[str, Shape]":
    lay: "OrderedDict[str, Shape]" = OrderedDict()
    lay["backbone.conv1.weight"] = (64, 3, 7, 7)
    lay.update(_bn_layout("backbone.bn1", 64))
    groups, base = (32, 4) if kind == "x101_dcn" else (1, 64)
    c_in = 64
    for L, n_blocks in enumerate(_RESNET_BLOCKS[kind], start=1):
        planes = 64 * 2 ** (L - 1)
        w = planes * base // 64 * groups
        out = planes * 4
        dcn = kind == "x101_dcn" and L >= 2
        for b in range(n_blocks):
            p = f"backbone.layer{L}.{b}"
            lay[f"{p}.conv1.weight"] = (w, c_in, 1, 1)
            lay.update(_bn_layout(f"{p}.bn1", w))
            lay[f"{p}.conv2.weight"] = (w, w // groups, 3, 3)
            if dcn:
                lay[f"{p}.conv2.conv_offset.weight"] = (18, w, 3, 3)
                lay[f"{p}.conv2.conv_offset.bias"] = (18,)
            lay.update(_bn_layout(f"{p}.bn2", w))
            lay[f"{p}.conv3.weight"] = (out, w, 1, 1)
            lay.update(_bn_layout(f"{p}.bn3", out))
            if b == 0:
                lay[f"{p}.downsample.0.weight"] = (out, c_in, 1, 1)
                lay.update(_bn_layout(f"{p}.downsample.1", out))
            c_in = out
    return lay


def _swin_layout() -> "OrderedDict[str, Shape]":
    lay: "OrderedDict[str, Shape]" = OrderedDict()
    C0, ws = _SWIN_EMBED, _SWIN_WINDOW
    lay["backbone.patch_embed.projection.weight"] = (C0, 3, 4, 4)
    lay["backbone.patch_embed.projection.bias"] = (C0,)
    lay["backbone.patch_embed.norm.weight"] = (C0,)
    lay["backbone.patch_embed.norm.bias"] = (C0,)
    for i, (depth, heads) in enumerate(zip(_SWIN_DEPTHS, _SWIN_HEADS)):
        C = C0 * 2 ** i
        for j in range(depth):
            p = f"backbone.stages.{i}.blocks.{j}"
            lay[f"{p}.norm1.weight"] = (C,)
            lay[f"{p}.norm1.bias"] = (C,)
            lay[f"{p}.attn.w_msa.relative_position_bias_table"] = ((2 * ws - 1) ** 2, heads)
            lay[f"{p}.attn.w_msa.relative_position_index"] = (ws * ws, ws * ws)
            lay[f"{p}.attn.w_msa.qkv.weight"] = (3 * C, C)
            lay[f"{p}.attn.w_msa.qkv.bias"] = (3 * C,)
            lay[f"{p}.attn.w_msa.proj.weight"] = (C, C)
            lay[f"{p}.attn.w_msa.proj.bias"] = (C,)
            lay[f"{p}.norm2.weight"] = (C,)
            lay[f"{p}.norm2.bias"] = (C,)
            lay[f"{p}.ffn.layers.0.0.weight"] = (4 * C, C)
            lay[f"{p}.ffn.layers.0.0.bias"] = (4 * C,)
            lay[f"{p}.ffn.layers.1.weight"] = (C, 4 * C)
            lay[f"{p}.ffn.layers.1.bias"] = (C,)
        if i < len(_SWIN_DEPTHS) - 1:
            lay[f"backbone.stages.{i}.downsample.norm.weight"] = (4 * C,)
            lay[f"backbone.stages.{i}.downsample.norm.bias"] = (4 * C,)
            lay[f"backbone.stages.{i}.downsample.reduction.weight"] = (2 * C, 4 * C)
    for i in range(len(_SWIN_DEPTHS)):
        lay[f"backbone.norm{i}.weight"] = (C0 * 2 ** i,)
        lay[f"backbone.norm{i}.bias"] = (C0 * 2 ** i,)
    return lay


def official_backbone_layout(kind: str) -> "OrderedDict[str, Shape]":
    """Official ``backbone.*`` keys -> shapes for ``kind`` in :data:`BACKBONES`."""
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; expected one of {BACKBONES}")
    return _swin_layout() if kind == "swin_s" else _resnet_layout(kind)


def _neck_in_channels(kind: str) -> Tuple[int, ...]:
    return (96, 192, 384, 768) if kind == "swin_s" else (256, 512, 1024, 2048)


def official_neck_layout(in_channels: Tuple[int, ...], out_channels: int = 256) -> "OrderedDict[str, Shape]":
    lay: "OrderedDict[str, Shape]" = OrderedDict()
    for l, c in enumerate(in_channels):
        lay[f"neck.lateral_convs.{l}.conv.weight"] = (out_channels, c, 1, 1)
        lay[f"neck.lateral_convs.{l}.conv.bias"] = (out_channels,)
    lay["neck.gn_out.weight"] = (out_channels,)
    lay["neck.gn_out.bias"] = (out_channels,)
    return lay


def official_layout(kind: str, num_queries: int, hp: Optional[DecoderHParams] = None) -> "OrderedDict[str, Shape]":
    """The whole official detector's state-dict keys -> shapes."""
    hp = hp or DecoderHParams(num_queries=num_queries)
    lay = official_backbone_layout(kind)
    lay.update(official_neck_layout(_neck_in_channels(kind)))
    lay.update(official_decoder_layout(hp))
    return lay


# --------------------------------------------------------------------------------------------
# Key maps (official -> ours)
# --------------------------------------------------------------------------------------------

_RESNET_RULES = [
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(r"^bn1\.(.+)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv2\.conv_offset\.(.+)$"), r"res{L}.\2.conv2_offset.\3"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), r"res{L}.\2.conv\3.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$"), r"res{L}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"), r"res{L}.\2.shortcut.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(.+)$"), r"res{L}.\2.shortcut.norm.\3"),
]

_SWIN_RENAMES = [
    ("patch_embed.projection.", "patch_embed.proj."),
    ("attn.w_msa.", "attn."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
]


def _resnet_rename(rest: str) -> str:
    for pat, repl in _RESNET_RULES:
        m = pat.match(rest)
        if m:
            if "{L}" in repl:
                repl = repl.replace("{L}", str(int(m.group(1)) + 1))
            return pat.sub(repl, rest)
    raise KeyError(rest)


def _swin_rename(rest: str) -> str:
    if rest.startswith("stages."):
        rest = "layers." + rest[len("stages."):]
    for old, new in _SWIN_RENAMES:
        rest = rest.replace(old, new)
    return rest


def _unfold_to_ms(t: Tensor) -> Tensor:
    """Patch-merging columns (last dim 4C) from nn.Unfold order (c*4 + p) to Microsoft (m*C + c)."""
    lead, n = t.shape[:-1], t.shape[-1]
    c = n // 4
    return t.reshape(*lead, c, 4)[..., _SWIN_UNFOLD_PERM].transpose(-1, -2).reshape(*lead, n).contiguous()


def _ms_to_unfold(t: Tensor) -> Tensor:
    lead, n = t.shape[:-1], t.shape[-1]
    c = n // 4
    return t.reshape(*lead, 4, c).transpose(-1, -2)[..., _SWIN_UNFOLD_PERM].reshape(*lead, n).contiguous()


def _zero_counter(shape: Shape):
    return lambda: torch.zeros(shape, dtype=torch.int64)


def _backbone_map(kind: str, key: str, shape: Shape) -> KeyMap:
    rest = key[len("backbone."):]
    if rest.endswith("num_batches_tracked"):
        return KeyMap(key, shape, None, reason="BN step counter (our EvalBatchNorm2d has none; BN stats are frozen)",
                      fill=_zero_counter(shape))
    if kind == "swin_s":
        ours = "backbone." + _swin_rename(rest)
        if ".downsample." in rest:
            return KeyMap(key, shape, ours, to_ours=_unfold_to_ms, to_official=_ms_to_unfold)
        return KeyMap(key, shape, ours)
    return KeyMap(key, shape, "backbone." + _resnet_rename(rest))


def _neck_map(key: str, shape: Shape) -> KeyMap:
    return KeyMap(key, shape, key.replace(".conv.", ".", 1) if ".lateral_convs." in key else key)


def key_maps(kind: str, num_queries: int, hp: Optional[DecoderHParams] = None) -> List[Union[KeyMap, FusedMap]]:
    """How every official key of the whole detector maps to ours (full model keys with the
    ``backbone.``, ``neck.``, ``decoder.`` prefixes): one-to-one :class:`KeyMap` s (or dropped
    keys) and :class:`FusedMap` s (several official tensors -> one of ours)."""
    hp = hp or DecoderHParams(num_queries=num_queries)
    maps: List[Union[KeyMap, FusedMap]] = [_backbone_map(kind, k, s) for k, s in official_backbone_layout(kind).items()]
    maps += [_neck_map(k, s) for k, s in official_neck_layout(_neck_in_channels(kind)).items()]
    for m in decoder_key_maps(hp):
        if isinstance(m, FusedMap):
            m = FusedMap("decoder." + m.ours, m.officials, m.shapes, m.groups)
        elif m.ours is not None:
            m = KeyMap(m.official, m.shape, "decoder." + m.ours, m.to_ours, m.to_official,
                       m.reason, m.fill, m.must_be_zero)
        maps.append(m)
    return maps


# --------------------------------------------------------------------------------------------
# Detection of the checkpoint kind
# --------------------------------------------------------------------------------------------

def detect_backbone(sd: Mapping[str, Tensor], source: str = "checkpoint") -> str:
    """``"r50" | "r101" | "x101_dcn" | "swin_s"`` from the backbone keys of an official state dict."""
    if "backbone.patch_embed.projection.weight" in sd:
        return "swin_s"
    if "backbone.conv1.weight" not in sd:
        raise ConversionError(
            f"{source}: no recognised backbone: expected 'backbone.conv1.weight' (ResNet/ResNeXt) or "
            f"'backbone.patch_embed.projection.weight' (Swin-S)"
        )
    if any(".conv_offset." in k for k in sd if k.startswith("backbone.")):
        return "x101_dcn"
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.layer3.")})
    return "r101" if n_blocks > 6 else "r50"


_STAGEINTERACTOR_MARKERS = ("rpn_head.init_content_features.weight", "roi_head.bbox_head.0.iof_tau")


def _describe_other(sd: Mapping[str, object], meta: Optional[Mapping]) -> str:
    keys = list(sd.keys())
    if any(k.startswith("decoder.") for k in keys):
        return "it is already in this project's layout ('decoder.*' keys); use --reverse to export it"
    guess = None
    if isinstance(meta, Mapping) and isinstance(meta.get("config"), str):
        m = re.search(r"model\s*=\s*dict\(\s*type\s*=\s*['\"](\w+)['\"]", meta["config"])
        if m:
            guess = m.group(1)
    if guess is None:
        if any(".sampling_n_mixing." in k or "adaptive_mixing" in k for k in keys):
            guess = "AdaMixer"
        elif any(k.startswith("roi_head.bbox_head.") for k in keys):
            guess = "another mmdet two-stage/query detector"
        elif any(k.startswith("bbox_head.") for k in keys):
            guess = "an mmdet one-stage/DETR-style detector"
    what = f" (looks like {guess})" if guess else ""
    return (f"not a StageInteractor checkpoint{what}: expected keys "
            f"{list(_STAGEINTERACTOR_MARKERS)}; first keys found: {keys[:3]}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def load_checkpoint_file(path: str) -> object:
    """``torch.load`` a file with one clear :class:`ConversionError` for each failure kind."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    is_zip = head[:4] == b"PK\x03\x04"
    is_legacy = head[:2] == b"\x80\x02"
    if not (is_zip or is_legacy):
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                              f"nor a legacy pickle; first bytes {head!r})")
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise ConversionError(f"{path}: corrupt checkpoint (CRC error in member {bad!r})")
        except zipfile.BadZipFile as e:
            raise ConversionError(f"{path}: truncated or corrupt checkpoint (zip archive unreadable: {e})") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - retried below for non-tensor meta objects
            if "weights_only" not in str(e) and "Weights only" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        raise ConversionError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None


def extract_official_state_dict(obj: object, source: str = "checkpoint") -> Tuple[Dict[str, Tensor], List[str], Optional[Mapping]]:
    """The ``state_dict`` of an mmdet checkpoint object -> (state dict, ignored top-level keys, meta).

    Accepts ``{"state_dict": ..., "meta": ..., "optimizer": ...}`` or a bare state dict; strips a
    leading ``module.``. Raises :class:`ConversionError` for anything that is not one.
    """
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: not a checkpoint (the file holds a {type(obj).__name__}, expected a dict)")
    ignored: List[str] = []
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else None
    if "state_dict" in obj:
        sd = obj["state_dict"]
        ignored = [k for k in obj if k != "state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
        ignored = [k for k in obj if k != "model"]
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not sd:
        raise ConversionError(f"{source}: not a checkpoint (no state dict found)")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(f"{source}: not a checkpoint: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    return sd, ignored, meta


def save_atomically(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` (no partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_convert_", suffix=".pth", dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> Shape:
    return tuple(int(s) for s in t.shape)


def convert_official_to_ours(
    sd: Mapping[str, Tensor], *, source: str = "checkpoint", meta: Optional[Mapping] = None,
    hp: Optional[DecoderHParams] = None,
) -> Tuple["OrderedDict[str, Tensor]", ConversionReport]:
    """Map an official state dict to our model's state dict.

    Every key must be in the official layout of the detected backbone / number of queries with
    its exact shape; the first violation raises :class:`ConversionError` naming the key, the
    shape found and the shape expected.
    """
    if not all(m in sd for m in _STAGEINTERACTOR_MARKERS):
        raise ConversionError(f"{source}: " + _describe_other(sd, meta))
    kind = detect_backbone(sd, source)
    hp = hp or _hparams(sd, "rpn_head.init_content_features.weight", "roi_head.bbox_head.0.fc_cls.weight")
    num_queries = hp.num_queries
    layout = official_layout(kind, num_queries, hp)
    for k, v in sd.items():
        if k not in layout:
            raise ConversionError(
                f"{source}: unknown key {k!r} (shape {list(_shape(v))}); it is not in the official "
                f"StageInteractor {kind} layout with {num_queries} queries, {hp.num_classes} classes "
                f"(expected shape: none)")
        if _shape(v) != layout[k]:
            raise ConversionError(f"{source}: shape mismatch for {k!r}: found {list(_shape(v))}, expected {list(layout[k])}")
    for k, shape in layout.items():
        if k not in sd:
            raise ConversionError(f"{source}: missing key {k!r} (found: none, expected shape {list(shape)})")

    report = ConversionReport(backbone=kind, num_queries=num_queries, num_classes=hp.num_classes)
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    nonzero_dead: List[str] = []
    for m in key_maps(kind, num_queries, hp):
        if isinstance(m, FusedMap):
            out[m.ours] = m.fuse([sd[k].detach() for k in m.officials])
            report.mapped.extend((k, m.ours) for k in m.officials)
            continue
        v = sd[m.official]
        if m.ours is None:
            report.dropped[m.official] = m.reason
            if m.must_be_zero and bool((v != 0).any()):
                nonzero_dead.append(m.official)
            continue
        out[m.ours] = m.to_ours(v.detach()).contiguous()
        report.mapped.append((m.official, m.ours))
    if nonzero_dead:
        report.warnings.append(
            f"{len(nonzero_dead)} dead layer tensors are not zero (dropped anyway; they cannot change "
            f"any output): {nonzero_dead}")
    return out, report


def convert_ours_to_official(
    sd: Mapping[str, Tensor], *, source: str = "checkpoint", hp: Optional[DecoderHParams] = None,
) -> "OrderedDict[str, Tensor]":
    """Our model's state dict -> official layout (dead layers and constant buffers regenerated)."""
    if "decoder." + OURS_CONTENT_KEY not in sd:
        raise ConversionError(f"{source}: not a checkpoint of this project's StageInteractor model "
                              f"(missing 'decoder.{OURS_CONTENT_KEY}'; first keys: {list(sd)[:3]})")
    kind = _detect_our_backbone(sd, source)
    hp = hp or _hparams(sd, "decoder." + OURS_CONTENT_KEY, "decoder." + _ours_cls_key())
    num_queries = hp.num_queries
    maps = key_maps(kind, num_queries, hp)
    expected_ours = {m.ours for m in maps if m.ours is not None}
    for k, v in sd.items():
        if k not in expected_ours:
            raise ConversionError(f"{source}: unknown key {k!r} (shape {list(_shape(v))}) for a {kind} "
                                  f"model with {num_queries} queries, {hp.num_classes} classes "
                                  f"(expected shape: none)")
    values: Dict[str, Tensor] = {}
    for m in maps:
        if m.ours is None:
            values[m.official] = m.fill()
            continue
        if m.ours not in sd:
            officials = m.officials if isinstance(m, FusedMap) else (m.official,)
            raise ConversionError(f"{source}: missing key {m.ours!r} (found: none; it holds official "
                                  f"{list(officials)})")
        if isinstance(m, FusedMap):
            want = (sum(s[0] for s in m.shapes),) + tuple(m.shapes[0][1:])
            if _shape(sd[m.ours]) != want:
                raise ConversionError(f"{source}: shape mismatch for {m.ours!r}: found {list(_shape(sd[m.ours]))}, "
                                      f"expected {list(want)}")
            values.update(zip(m.officials, m.split(sd[m.ours].detach())))
            continue
        v = m.to_official(sd[m.ours].detach()).contiguous()
        if _shape(v) != m.shape:
            raise ConversionError(f"{source}: shape mismatch for {m.ours!r}: found {list(_shape(sd[m.ours]))}, "
                                  f"expected the shape that maps to {m.official!r} {list(m.shape)}")
        values[m.official] = v
    return OrderedDict((k, values[k]) for k in official_layout(kind, num_queries, hp))


def _ours_cls_key() -> str:
    return f"{OURS_STAGES_PREFIX}.0.cls_logits.weight"


def _hparams(sd: Mapping[str, Tensor], queries_key: str, classes_key: str) -> DecoderHParams:
    """The released decoder's hyper-parameters with the number of queries and of classes read
    from the state dict (rows of the content embedding / of the first classifier; 80 classes
    when the classifier is missing, which the key check then names)."""
    cls = sd.get(classes_key)
    return DecoderHParams(num_queries=int(sd[queries_key].shape[0]),
                          num_classes=int(cls.shape[0]) if cls is not None and cls.dim() == 2 else 80)


def _detect_our_backbone(sd: Mapping[str, Tensor], source: str) -> str:
    if "backbone.patch_embed.proj.weight" in sd:
        return "swin_s"
    if "backbone.stem.conv1.weight" not in sd:
        raise ConversionError(f"{source}: no recognised backbone (expected 'backbone.stem.conv1.weight' "
                              f"or 'backbone.patch_embed.proj.weight')")
    if any(k.endswith("conv2_offset.weight") for k in sd):
        return "x101_dcn"
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.res4.")})
    return "r101" if n_blocks > 6 else "r50"


def check_against_model(sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], source: str = "converted") -> None:
    """Every key of the model present with the same shape, and no extra key; else ConversionError."""
    for k, v in sd.items():
        if k not in model_sd:
            raise ConversionError(f"{source}: key {k!r} (shape {list(_shape(v))}) is not in the model "
                                  f"built from the config (expected shape: none)")
        if _shape(v) != _shape(model_sd[k]):
            raise ConversionError(f"{source}: shape mismatch for {k!r}: found {list(_shape(v))}, the model "
                                  f"expects {list(_shape(model_sd[k]))}")
    for k, v in model_sd.items():
        if k not in sd:
            raise ConversionError(f"{source}: the model built from the config needs {k!r} (shape "
                                  f"{list(_shape(v))}) but the converted checkpoint has none")
