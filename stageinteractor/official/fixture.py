"""Rebuild the inputs of the official-decoder parity fixture from its formula.

The fixture (``tests/fixtures/official_decoder_parity``, README there) stores what the
authors' code computed for a decoder whose every weight and every input feature map is given by a
deterministic formula of the tensor's *name* (the official ``state_dict`` key, or
``feat{l}`` for feature map l). This module regenerates those tensors, so that any fixture
produced the same way (another frequency ``A``, other image sizes, ground truths, queries)
can drive the same parity harness.

Formula (fixture README §2), for a tensor ``name`` with shape S and flat row-major index i::

    c     = crc32(name)                 # unsigned 32-bit
    phase = (c % 10007) / 1000
    k     = i + 1 + (c % 1000003)       # int64
    h     = (k * k) % 1000003           # int64, exact
    base  = sin(A * h + phase)          # float64, reshaped to S

Per-key rules (README §3) are applied in float64 in the order written and the result is
cast to float32 once. The rule constants are inputs (:class:`FixtureRules`); their defaults
are the ones of the released fixture and :meth:`FixtureRules.from_expected` reads them back
from an ``expected.pt`` dict.

Pure numpy/torch: no detectron2 import.
"""
from __future__ import annotations

import os
import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "find_parity_fixture",
    "FixtureRules",
    "OfficialFixture",
    "formula_base",
    "formula_tensor",
    "official_decoder_state_dict",
    "fixture_features",
    "load_fixture",
]

_MOD = 1000003


def formula_base(name: str, shape: Sequence[int], A: float) -> np.ndarray:
    """The float64 ``base`` array of the fixture formula for tensor ``name`` of ``shape``."""
    c = zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF
    phase = (c % 10007) / 1000.0
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    k = np.arange(n, dtype=np.int64) + 1 + (c % _MOD)
    h = (k * k) % _MOD
    base = np.sin(A * h.astype(np.float64) + phase)
    return base.reshape(tuple(int(s) for s in shape))


def formula_tensor(name: str, shape: Sequence[int], A: float) -> torch.Tensor:
    """``formula_base`` cast once to float32 (the fixture's feature maps use this)."""
    return torch.from_numpy(formula_base(name, shape, A).astype(np.float32))


@dataclass(frozen=True)
class FixtureRules:
    """The special per-key rules of the fixture (README §3), as data.

    ``mult``: key suffix -> multiplier (for ``ndim >= 2`` keys applied to
    ``base / sqrt(fan_in)``; for ``ffn_norm.weight`` applied to ``1 + 0.1 * base``).
    ``add``: key suffix -> additive constant on ``0.1 * base`` (the focal prior).
    ``gen_one_d_z_offset``: added to the dz entries (flat index % 3 == 2) of
    ``gen_one_d.0.bias``. ``fc_reg_row_gain`` / ``fc_reg_bias_offset``: the fc_reg rule.
    """

    A: float = 0.37
    mult: Mapping[str, float] = field(
        default_factory=lambda: {
            "dynamic_conv.Wv.weight": 0.1,
            "feat_extractor.gen_double_d.0.weight": 0.1,
            "feat_extractor.gen_one_d.0.weight": 0.1,
            "ffn_norm.weight": 8.0,
        }
    )
    add: Mapping[str, float] = field(default_factory=lambda: {"fc_cls.bias": -4.59511985013459})
    gen_one_d_z_offset: float = -3.0
    fc_reg_row_gain: Tuple[float, ...] = (0.2, 0.2, 0.3, 1.4)
    fc_reg_bias_offset: Tuple[float, ...] = (0.0, 0.0, -0.4, 0.0)

    @classmethod
    def from_expected(cls, expected: Mapping[str, object]) -> "FixtureRules":
        """Read the rules from the ``meta/*`` entries of a fixture's ``expected.pt`` dict."""
        reg = json.loads(str(expected["meta/fc_reg_rule_json"]))
        return cls(
            A=float(expected["meta/A"]),
            mult={k: float(v) for k, v in json.loads(str(expected["meta/per_key_mult_json"])).items()},
            add={k: float(v) for k, v in json.loads(str(expected["meta/per_key_add_json"])).items()},
            gen_one_d_z_offset=float(expected["meta/gen_one_d_z_offset"]),
            fc_reg_row_gain=tuple(float(v) for v in reg["row_gain"]),
            fc_reg_bias_offset=tuple(float(v) for v in reg["bias_offset"]),
        )

    def _suffix_value(self, table: Mapping[str, float], key: str) -> Optional[float]:
        for suffix, value in table.items():
            if key.endswith(suffix):
                return value
        return None


def _param_value(key: str, shape: Tuple[int, ...], rules: FixtureRules) -> np.ndarray:
    """float64 value of one decoder parameter (README §3, first matching rule wins)."""
    if "subbox_score_list" in key:
        return np.zeros(shape, dtype=np.float64)
    base = formula_base(key, shape, rules.A)
    if key.endswith("init_content_features.weight"):
        return base
    if key.endswith(".iof_tau"):
        return 1.0 + base
    if key.endswith("fc_reg.weight"):
        gain = np.asarray(rules.fc_reg_row_gain, dtype=np.float64)[:, None]
        return (base / math.sqrt(shape[1])) * gain
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        value = base / math.sqrt(fan_in)
        mult = rules._suffix_value(rules.mult, key)
        return value * mult if mult is not None else value
    # 1-D parameters
    if key.endswith("fc_reg.bias"):
        gain = np.asarray(rules.fc_reg_row_gain, dtype=np.float64)
        offset = np.asarray(rules.fc_reg_bias_offset, dtype=np.float64)
        return (0.1 * base) * gain + offset
    add = rules._suffix_value(rules.add, key)
    if add is not None:
        return 0.1 * base + add
    if key.endswith("gen_one_d.0.bias"):
        value = 0.1 * base
        value[2::3] = value[2::3] + rules.gen_one_d_z_offset
        return value
    if key.endswith(".weight"):
        value = 1.0 + 0.1 * base
        mult = rules._suffix_value(rules.mult, key)
        return value * mult if mult is not None else value
    if key.endswith("bias"):
        return 0.1 * base
    raise KeyError(f"fixture formula: no rule for parameter {key!r} with shape {shape}")


def _buffer_value(key: str, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """Official buffer values (README §4), or None when ``key`` is not a buffer."""
    if key.endswith("init_proposal_bboxes"):
        row = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float32)
        return row.expand(*shape).clone()
    if key.endswith("iou_snyc_statistics.running_mean"):
        return torch.full(shape, 0.5, dtype=torch.float32)
    if key.endswith("iou_snyc_statistics.running_var"):
        return torch.zeros(shape, dtype=torch.float32)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    return None


def official_decoder_state_dict(
    keys: Sequence[Tuple[str, Sequence[int]]], rules: FixtureRules
) -> "OrderedDict[str, torch.Tensor]":
    """The authors'-layout decoder state dict (``rpn_head.*`` + ``roi_head.*``) of a fixture.

    Args:
        keys: ``[(official key, shape), ...]`` in state-dict order (``keys.json``).
        rules: the formula constants.
    Returns:
        OrderedDict key -> float32 tensor (int64 for ``num_batches_tracked``).
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, shape in keys:
        shape = tuple(int(s) for s in shape)
        buf = _buffer_value(key, shape)
        if buf is not None:
            out[key] = buf
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(_param_value(key, shape, rules)).astype(np.float32))
    return out


def fixture_features(shapes: Sequence[Sequence[int]], A: float) -> List[torch.Tensor]:
    """The fixture's feature maps: tensor ``feat{l}`` of ``shapes[l]``, formula ``base``."""
    return [formula_tensor(f"feat{l}", shape, A) for l, shape in enumerate(shapes)]


@dataclass
class OfficialFixture:
    """Everything a parity test needs from one fixture directory.

    Attributes:
        expected: the flat ``expected.pt`` dict.
        keys: ``[(official key, shape)]`` of the decoder in state-dict order.
        rules: formula constants (read from ``expected``).
        feature_shapes: ``[(B, C, H_l, W_l)]`` per level.
        strides: feature strides.
        image_sizes: LongTensor (B, 2) of unpadded (h, w).
        batch_input_shape: (H, W) of the padded input.
        gt_boxes: (B, G, 4) float32 xyxy, padded; gt_classes: (B, G) long; gt_mask: (B, G) bool.
        num_stages: number of decoder stages present in ``expected``.
    """

    expected: Dict[str, object]
    keys: List[Tuple[str, Tuple[int, ...]]]
    rules: FixtureRules
    feature_shapes: List[Tuple[int, ...]]
    strides: List[int]
    image_sizes: torch.Tensor
    batch_input_shape: Tuple[int, int]
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor
    gt_mask: torch.Tensor
    num_stages: int

    def official_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return official_decoder_state_dict(self.keys, self.rules)

    def features(self) -> List[torch.Tensor]:
        return fixture_features(self.feature_shapes, self.rules.A)


def _pad_gts(expected: Mapping[str, object], batch: int):
    boxes = [expected[f"inputs/gt_bboxes/{b}"] for b in range(batch)]
    labels = [expected[f"inputs/gt_labels/{b}"] for b in range(batch)]
    g = max([int(x.shape[0]) for x in boxes] + [0])
    gt_boxes = torch.zeros(batch, g, 4, dtype=torch.float32)
    gt_classes = torch.zeros(batch, g, dtype=torch.long)
    gt_mask = torch.zeros(batch, g, dtype=torch.bool)
    for b in range(batch):
        n = int(boxes[b].shape[0])
        gt_boxes[b, :n] = boxes[b].float()
        gt_classes[b, :n] = labels[b].long()
        gt_mask[b, :n] = True
    return gt_boxes, gt_classes, gt_mask


def find_parity_fixture(repo_root: "str | Path | None" = None) -> Optional[Path]:
    """The folder of the official decoder parity fixture (holding ``expected.pt``), or None.

    ``$STAGEINTERACTOR_PARITY_FIXTURE`` when set (another fixture made the same way), else
    ``<repo>/tests/fixtures/official_decoder_parity`` (in the repository: a clone finds it)."""
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("STAGEINTERACTOR_PARITY_FIXTURE", ""),
                  str(root / "tests" / "fixtures" / "official_decoder_parity")]
    for c in candidates:
        if c and (Path(c) / "expected.pt").is_file():
            return Path(c)
    return None


def load_fixture(directory: "str | Path") -> OfficialFixture:
    """Load ``expected.pt`` and ``keys.json`` of a fixture directory.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    directory = Path(directory)
    exp_path, keys_path = directory / "expected.pt", directory / "keys.json"
    for p in (exp_path, keys_path):
        if not p.is_file():
            raise FileNotFoundError(f"official fixture: {p} not found")
    expected = torch.load(exp_path, map_location="cpu", weights_only=True)
    keys = [(str(k), tuple(int(s) for s in shape)) for k, shape in json.loads(keys_path.read_text())]
    levels = sorted(int(k[len("inputs/feat"):-len("/shape")]) for k in expected
                    if k.startswith("inputs/feat") and k.endswith("/shape"))
    feature_shapes = [tuple(int(s) for s in expected[f"inputs/feat{l}/shape"].tolist()) for l in levels]
    batch = feature_shapes[0][0]
    gt_boxes, gt_classes, gt_mask = _pad_gts(expected, batch)
    num_stages = len({k.split("/")[1] for k in expected if k.startswith("eval/stage")})
    return OfficialFixture(
        expected=expected,
        keys=keys,
        rules=FixtureRules.from_expected(expected),
        feature_shapes=feature_shapes,
        strides=[int(s) for s in expected["meta/featmap_strides"].tolist()],
        image_sizes=expected["meta/img_shapes"].long().clone(),
        batch_input_shape=tuple(int(s) for s in expected["meta/batch_input_shape"].tolist()),
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        gt_mask=gt_mask,
        num_stages=num_stages,
    )
