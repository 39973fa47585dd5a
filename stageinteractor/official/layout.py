"""The authors' (mmdet) state-dict layout of the StageInteractor decoder, and its mapping to ours.

"Decoder" here = the official ``rpn_head`` (initial-query generator) + ``roi_head`` (the 6
``StageInteractorHead`` stages), i.e. everything our :class:`StageInteractorDecoder` holds.
Layout source: the authors' ``mmdet/models/dense_heads/query_generator.py`` and
``mmdet/models/roi_heads/bbox_heads/stageinteractor_head.py``; the keys and parameter counts
are checked in ``tests/core/test_official_layout.py``, the values in ``test_official_parity.py``.

* :func:`official_decoder_layout` lists the official keys and shapes (state-dict order) for a
  given number of queries / classes / stages.
* :func:`decoder_key_maps` gives, per official key, our key (relative to the decoder module)
  and the tensor transforms in both directions (:class:`KeyMap`), or marks the key as dropped
  (with the reason and the value written back on export). Our stages evaluate all their
  content-conditioned generators as one Linear: the official ``gen_one_d``,
  ``parameter_generator``, ``mix_bias``, ``M_score_list_mix_bias``, ``M_score_list``,
  ``S_score_list`` and ``S_score_list2`` of a stage are concatenated per channel group into
  ``stages.{s}.generator`` (:class:`FusedMap`). All other tensors keep their row/column order.
* :func:`decoder_official_to_ours` / :func:`decoder_ours_to_official` convert decoder state
  dicts (exactly invertible: dead layers come back as zeros, constant buffers regenerated).

Pure PyTorch: :mod:`stageinteractor.official.checkpoint` adds the backbone and neck and the
file handling.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "DecoderHParams",
    "KeyMap",
    "FusedMap",
    "official_decoder_layout",
    "decoder_key_maps",
    "identity",
    "decoder_official_to_ours",
    "decoder_ours_to_official",
    "OURS_CONTENT_KEY",
    "OURS_STAGES_PREFIX",
]

Shape = Tuple[int, ...]


def identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class DecoderHParams:
    """Hyper-parameters that determine the official decoder's key shapes (released values)."""

    num_queries: int = 100
    num_classes: int = 80
    num_stages: int = 6
    dim: int = 256
    ffn_dim: int = 2048
    num_heads: int = 8
    groups: int = 4  # G: channel groups of the sampler / mixer
    first_points: int = 8  # K_0 spatial point-groups at stage 0
    points: int = 4  # K_s for s >= 1
    subpoints: int = 8  # sub-points per spatial group
    out_points: int = 128  # P_out of the spatial mixing
    reuse_start: int = 2  # first stage that reuses filters

    @property
    def group_dim(self) -> int:
        return self.dim // self.groups

    def k(self, s: int) -> int:
        return self.first_points if s == 0 else self.points

    def p_in(self, s: int) -> int:
        return self.k(s) * self.subpoints

    def p_cur(self, s: int) -> int:
        """Rows of the spatial filter that stage s generates itself."""
        return self.out_points if s < self.reuse_start else self.out_points // 2

    def num_reused(self, s: int) -> int:
        """M = number of reused channel filters at stage s."""
        return max(0, s - self.reuse_start + 1)


@dataclass(frozen=True)
class KeyMap:
    """How one official key maps to our state dict.

    Attributes:
        official: the official key.
        shape: its shape in the official layout.
        ours: our key (``None`` when the key is dropped).
        to_ours / to_official: tensor transforms (re-ordering / re-shaping) between the layouts.
        reason: why a key is dropped (``ours is None``).
        fill: for a dropped key, builds the value written back on export.
        must_be_zero: a dropped key whose value must be all zeros (dead layers); a warning names
            it otherwise.
    """

    official: str
    shape: Shape
    ours: Optional[str]
    to_ours: Callable[[Tensor], Tensor] = identity
    to_official: Callable[[Tensor], Tensor] = identity
    reason: str = ""
    fill: Optional[Callable[[], Tensor]] = None
    must_be_zero: bool = False


@dataclass(frozen=True)
class FusedMap:
    """Several official tensors stored as ONE tensor of ours, concatenated per channel group.

    Each official part has ``G * r_i`` rows (g-major, r_i rows per group); ours has, for every
    group g, the parts' group-g rows one after the other (``G * sum(r_i)`` rows). Weights
    (rows, D) and biases (rows,) alike. Our mixing layer fuses all its content-conditioned
    generators (filters, dynamic biases, adapter gates) into one Linear this way.
    """

    ours: str
    officials: Tuple[str, ...]
    shapes: Tuple[Shape, ...]
    groups: int

    def fuse(self, parts: Sequence[Tensor]) -> Tensor:
        G = self.groups
        per_group = [p.reshape(G, p.shape[0] // G, *p.shape[1:]) for p in parts]
        return torch.cat(per_group, dim=1).reshape(-1, *parts[0].shape[1:]).contiguous()

    def split(self, t: Tensor) -> List[Tensor]:
        G = self.groups
        rows = [s[0] // G for s in self.shapes]
        pieces = t.reshape(G, sum(rows), *t.shape[1:]).split(rows, dim=1)
        return [p.reshape(-1, *t.shape[1:]).contiguous() for p in pieces]


def _stage_layout(hp: DecoderHParams, s: int) -> "OrderedDict[str, Shape]":
    D, F, G, Dc = hp.dim, hp.ffn_dim, hp.groups, hp.group_dim
    C = hp.num_classes
    P_in, P_cur, M = hp.p_in(s), hp.p_cur(s), hp.num_reused(s)
    gen_rows = G * (Dc * Dc + P_in * P_cur)
    wv_in = G * hp.out_points * Dc
    lay: "OrderedDict[str, Shape]" = OrderedDict()
    lay["iof_tau"] = (hp.num_heads,)
    lay["fc_cls.weight"] = (C, D)
    lay["fc_cls.bias"] = (C,)
    lay["fc_reg.weight"] = (4, D)
    lay["fc_reg.bias"] = (4,)
    lay["ffn.layers.0.0.weight"] = (F, D)
    lay["ffn.layers.0.0.bias"] = (F,)
    lay["ffn.layers.1.weight"] = (D, F)
    lay["ffn.layers.1.bias"] = (D,)
    lay["ffn_norm.weight"] = (D,)
    lay["ffn_norm.bias"] = (D,)
    for br in ("cls_fcs", "reg_fcs"):
        lay[f"{br}.0.weight"] = (D, D)
        lay[f"{br}.0.bias"] = (D,)
        lay[f"{br}.1.weight"] = (D,)
        lay[f"{br}.1.bias"] = (D,)
    dc = "dynamic_conv."
    lay[dc + "mix_bias.weight"] = (G * (Dc + hp.out_points), D)
    lay[dc + "mix_bias.bias"] = (G * (Dc + hp.out_points),)
    lay[dc + "parameter_generator.weight"] = (gen_rows, D)
    lay[dc + "parameter_generator.bias"] = (gen_rows,)
    lay[dc + "Wv.weight"] = (D, wv_in)
    lay[dc + "Wv.bias"] = (D,)
    lay[dc + "Wv_layer_norm.weight"] = (D,)
    lay[dc + "Wv_layer_norm.bias"] = (D,)
    if M > 0:
        intra = hp.subpoints * Dc
        inter = hp.k(s) * Dc
        for m in range(M):
            lay[dc + f"subbox_local_list.{m}.weight"] = (intra, intra)
            lay[dc + f"subbox_local_list.{m}.bias"] = (intra,)
        for m in range(M):
            lay[dc + f"axis_atten_list.{m}.weight"] = (inter, inter)
            lay[dc + f"axis_atten_list.{m}.bias"] = (inter,)
        for m in range(M):
            lay[dc + f"subbox_score_list.{m}.weight"] = (G * hp.k(s) * hp.subpoints, D)
            lay[dc + f"subbox_score_list.{m}.bias"] = (G * hp.k(s) * hp.subpoints,)
        lay[dc + "M_score_list.weight"] = (G * Dc * 2 * M, D)
        lay[dc + "M_score_list.bias"] = (G * Dc * 2 * M,)
        lay[dc + "M_score_list_mix_bias.weight"] = (G * Dc * M, D)
        lay[dc + "M_score_list_mix_bias.bias"] = (G * Dc * M,)
        lay[dc + "S_score_list.weight"] = (G * hp.p_cur(s), D)
        lay[dc + "S_score_list.bias"] = (G * hp.p_cur(s),)
        lay[dc + "S_score_list2.weight"] = (G * P_in, D)
        lay[dc + "S_score_list2.bias"] = (G * P_in,)
    lay["attention.attn.in_proj_weight"] = (3 * D, D)
    lay["attention.attn.in_proj_bias"] = (3 * D,)
    lay["attention.attn.out_proj.weight"] = (D, D)
    lay["attention.attn.out_proj.bias"] = (D,)
    lay["attention_norm.weight"] = (D,)
    lay["attention_norm.bias"] = (D,)
    lay["feat_extractor.gen_one_d.0.weight"] = (3 * G * hp.k(s), D)
    lay["feat_extractor.gen_one_d.0.bias"] = (3 * G * hp.k(s),)
    lay["feat_extractor.gen_double_d.0.weight"] = (3 * hp.subpoints, D)
    lay["feat_extractor.gen_double_d.0.bias"] = (3 * hp.subpoints,)
    lay["iou_snyc_statistics.running_mean"] = (1,)
    lay["iou_snyc_statistics.running_var"] = (1,)
    lay["iou_snyc_statistics.num_batches_tracked"] = ()
    return lay


def official_decoder_layout(hp: DecoderHParams = DecoderHParams()) -> "OrderedDict[str, Shape]":
    """Official ``rpn_head.*`` and ``roi_head.*`` keys -> shapes, in state-dict order."""
    out: "OrderedDict[str, Shape]" = OrderedDict()
    out["rpn_head.init_proposal_bboxes"] = (hp.num_queries, 4)
    out["rpn_head.init_content_features.weight"] = (hp.num_queries, hp.dim)
    for s in range(hp.num_stages):
        for k, shape in _stage_layout(hp, s).items():
            out[f"roi_head.bbox_head.{s}.{k}"] = shape
    return out


# --------------------------------------------------------------------------------------------
# Mapping to our decoder. Keys of ``ours`` are relative to the StageInteractorDecoder module.
# --------------------------------------------------------------------------------------------

def _const_fill(shape: Shape, value: float, dtype=torch.float32) -> Callable[[], Tensor]:
    return lambda: torch.full(shape, value, dtype=dtype)


# official generator layers of one stage, in the per-group block order of our fused
# ``generator`` of DecoderStage (core/stage.py ``generator_layout``: sampler offsets | M, S |
# b_M, b_S | beta | gates | u, v; official sources in ``stage.OFFICIAL_GENERATOR_SOURCES``)
_FUSED_GENERATOR_PARTS = (
    "feat_extractor.gen_one_d.0",
    "dynamic_conv.parameter_generator",
    "dynamic_conv.mix_bias",
    "dynamic_conv.M_score_list_mix_bias",
    "dynamic_conv.M_score_list",
    "dynamic_conv.S_score_list",
    "dynamic_conv.S_score_list2",
)
_FUSED_GENERATOR_OURS = "generator"


def decoder_key_maps(hp: DecoderHParams = DecoderHParams()) -> List[Union[KeyMap, FusedMap]]:
    """How every official decoder key maps to ours: a :class:`KeyMap` per one-to-one (or
    dropped) key and a :class:`FusedMap` per fused tensor of ours (listed at its first part)."""
    layout = official_decoder_layout(hp)
    maps: List[Union[KeyMap, FusedMap]] = []
    fused_done = set()
    for key, shape in layout.items():
        fused = _fused_generator(key, layout, hp)
        if fused is None:
            maps.append(_map_one(key, shape, hp))
        elif fused.ours not in fused_done:
            fused_done.add(fused.ours)
            maps.append(fused)
    return maps


def _fused_generator(key: str, layout: Dict[str, Shape], hp: DecoderHParams) -> Optional[FusedMap]:
    if not key.startswith("roi_head.bbox_head."):
        return None
    _, s, rest = _split_stage(key)
    base, _, leaf = rest.rpartition(".")
    if base not in _FUSED_GENERATOR_PARTS:
        return None
    head = f"roi_head.bbox_head.{s}."
    officials = tuple(f"{head}{p}.{leaf}" for p in _FUSED_GENERATOR_PARTS if f"{head}{p}.{leaf}" in layout)
    return FusedMap(
        ours=f"{OURS_STAGES_PREFIX}.{s}.{_FUSED_GENERATOR_OURS}.{leaf}",
        officials=officials,
        shapes=tuple(layout[k] for k in officials),
        groups=hp.groups,
    )


def _map_one(key: str, shape: Shape, hp: DecoderHParams) -> KeyMap:
    if key == "rpn_head.init_proposal_bboxes":
        return KeyMap(
            key, shape, None,
            reason="constant full-image boxes (0.5, 0.5, 1, 1); regenerated by our query generator",
            fill=lambda: torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(*shape).clone(),
        )
    if key == "rpn_head.init_content_features.weight":
        return KeyMap(key, shape, OURS_CONTENT_KEY)
    prefix, s, rest = _split_stage(key)
    if rest.startswith("iou_snyc_statistics."):
        leaf = rest.rsplit(".", 1)[1]
        fill = {
            "running_mean": _const_fill(shape, 0.5),
            "running_var": _const_fill(shape, 0.0),
            "num_batches_tracked": _const_fill(shape, 0, torch.int64),
        }[leaf]
        return KeyMap(key, shape, None, reason="unused SyncBN statistics buffer (never read)", fill=fill)
    if ".subbox_score_list." in rest:
        return KeyMap(
            key, shape, None,
            reason="dead layer (softmax over an axis of size 1: identically 1, zero gradient)",
            fill=_const_fill(shape, 0.0), must_be_zero=True,
        )
    ours = _stage_rename(s, rest)
    return KeyMap(key, shape, ours)


def _split_stage(key: str) -> Tuple[str, int, str]:
    head = "roi_head.bbox_head."
    if not key.startswith(head):
        raise KeyError(f"not an official decoder key: {key!r}")
    s_str, rest = key[len(head):].split(".", 1)
    return head, int(s_str), rest


# Our names: StageInteractorDecoder holds ``query_generator`` and ``stages.{s}`` (DecoderStage).
OURS_CONTENT_KEY = "query_generator.content.weight"
OURS_STAGES_PREFIX = "stages"

# official (relative to ``roi_head.bbox_head.{s}.``) -> ours (relative to ``stages.{s}.``);
# longest prefix first. Every tensor keeps its layout (same rows/columns order), see the
# layouts of core/dynamic_mixing.py, core/sampler.py, core/attention.py.
_STAGE_RENAMES: Dict[str, str] = {
    "iof_tau": "attention.iof_tau",
    "fc_cls.": "cls_logits.",
    "fc_reg.": "reg_delta.",
    "ffn.layers.0.0.": "ffn_fc1.",
    "ffn.layers.1.": "ffn_fc2.",
    "ffn_norm.": "ffn_norm.",
    "cls_fcs.0.": "cls_fc.",
    "cls_fcs.1.": "cls_norm.",
    "reg_fcs.0.": "reg_fc.",
    "reg_fcs.1.": "reg_norm.",
    "dynamic_conv.Wv_layer_norm.": "mixing.out_norm.",
    "dynamic_conv.Wv.": "mixing.out_proj.",
    "attention.attn.in_proj_weight": "attention.in_proj_weight",
    "attention.attn.in_proj_bias": "attention.in_proj_bias",
    "attention.attn.out_proj.": "attention.out_proj.",
    "attention_norm.": "attention_norm.",
    "feat_extractor.gen_double_d.0.": "sampler.gen_double_d.",
}
_STAGE_LIST_RENAMES = [
    (re.compile(r"^dynamic_conv\.subbox_local_list\.(\d+)\.(weight|bias)$"), r"mixing.static.\1.intra.\2"),
    (re.compile(r"^dynamic_conv\.axis_atten_list\.(\d+)\.(weight|bias)$"), r"mixing.static.\1.inter.\2"),
]


def _stage_rename(s: int, rest: str) -> str:
    for pat, repl in _STAGE_LIST_RENAMES:
        if pat.match(rest):
            return f"{OURS_STAGES_PREFIX}.{s}." + pat.sub(repl, rest)
    for old in sorted(_STAGE_RENAMES, key=len, reverse=True):
        if rest.startswith(old):
            return f"{OURS_STAGES_PREFIX}.{s}." + _STAGE_RENAMES[old] + rest[len(old):]
    raise KeyError(f"no mapping for official decoder key suffix {rest!r} (stage {s})")


# --------------------------------------------------------------------------------------------
# Decoder-only conversion (official/checkpoint.py adds backbone, neck and file handling)
# --------------------------------------------------------------------------------------------

def decoder_official_to_ours(
    sd: Dict[str, Tensor], hp: DecoderHParams = DecoderHParams()
) -> Tuple["OrderedDict[str, Tensor]", Dict[str, str]]:
    """Official ``rpn_head.*``/``roi_head.*`` tensors -> our decoder state dict.

    Returns ``(state dict relative to the decoder module, {dropped official key: reason})``.
    Raises KeyError naming the first missing/unknown key and ValueError on a shape mismatch.
    """
    layout = official_decoder_layout(hp)
    for k, v in sd.items():
        if k not in layout:
            raise KeyError(f"unknown official decoder key {k!r} (shape {list(v.shape)})")
    for k, shape in layout.items():
        if k not in sd:
            raise KeyError(f"missing official decoder key {k!r} (expected shape {list(shape)})")
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"shape mismatch for {k!r}: found {list(sd[k].shape)}, expected {list(shape)}")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    dropped: Dict[str, str] = {}
    for m in decoder_key_maps(hp):
        if isinstance(m, FusedMap):
            out[m.ours] = m.fuse([sd[k] for k in m.officials])
        elif m.ours is None:
            dropped[m.official] = m.reason
        else:
            out[m.ours] = m.to_ours(sd[m.official]).contiguous()
    return out, dropped


def decoder_ours_to_official(
    sd: Dict[str, Tensor], hp: DecoderHParams = DecoderHParams()
) -> "OrderedDict[str, Tensor]":
    """Our decoder state dict -> official layout (dead layers zero, constant buffers
    regenerated), in the official state-dict order."""
    values: Dict[str, Tensor] = {}
    for m in decoder_key_maps(hp):
        ours = m.ours
        if ours is not None and ours not in sd:
            raise KeyError(f"missing decoder key {ours!r}")
        if isinstance(m, FusedMap):
            values.update(zip(m.officials, m.split(sd[ours])))
        elif ours is None:
            values[m.official] = m.fill()
        else:
            values[m.official] = m.to_official(sd[ours]).contiguous()
    return OrderedDict((k, values[k]) for k in official_decoder_layout(hp))
