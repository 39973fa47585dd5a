"""The official-gradient parity fixture: its summary formula, its contents, and its loader.

``tests/fixtures/official_gradient_parity/expected.pt`` holds what the authors' code computed
for one training step of the forward parity fixture's decoder (same formula weights, inputs
and ground truths; ``tests/fixtures/official_decoder_parity``): the gradient of their total
training loss with respect to every decoder parameter and the four input maps, in float32 and
in float64, and one clipped AdamW step with their optimizer settings. A gradient is stored as
a small summary, never in full; ``tools/make_official_gradient_fixture.py`` (running
:mod:`stageinteractor.official.gradient_worker` in the authors' environment) writes it, and
``tests/core/test_official_gradient_parity.py`` compares ours with it.

Summary of a tensor ``g`` named ``name`` (an official key, or ``feat{l}`` for input map l),
n = numel, all in float64 of the stored values (README §2)::

    norm   = ||g||_2
    probe  = sum_i g[i] * p[i],  p = formula_base("grad_probe/" + name, shape, A)
    pos    = positions(name, n): min(n, 32) distinct flat indices (formula below)
    values = g.flatten()[pos]

    c = crc32("grad_pos/" + name);  k = j + 1 + (c % 1000003), j = 0, 1, ...
    h = (k * k) % 1000003;          candidate j = (h * n) // 1000003
    pos = the first min(n, 32) distinct candidates, in order of j

Pure numpy/torch (runs in both environments): no detectron2, scipy or mmdet import.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from stageinteractor.official.fixture import formula_base

__all__ = [
    "NUM_POSITIONS",
    "FORMAT_VERSION",
    "positions",
    "probe",
    "summarize",
    "GradientFixture",
    "find_gradient_fixture",
    "load_gradient_fixture",
    "feature_name",
    "record_summaries",
]

NUM_POSITIONS = 32
FORMAT_VERSION = 1
_MOD = 1000003


def feature_name(level: int) -> str:
    """The name of input map ``level`` in the fixture (the forward fixture's formula name)."""
    return f"feat{level}"


def positions(name: str, n: int, count: int = NUM_POSITIONS) -> np.ndarray:
    """``min(n, count)`` distinct flat indices of tensor ``name`` with ``n`` entries (int64)."""
    want = min(int(n), int(count))
    c = zlib.crc32(("grad_pos/" + name).encode("utf-8")) & 0xFFFFFFFF
    out: List[int] = []
    seen = set()
    start = 0
    while len(out) < want:
        k = np.arange(start, start + 4 * want + 16, dtype=np.int64) + 1 + (c % _MOD)
        cand = ((k * k) % _MOD) * int(n) // _MOD
        for j in cand.tolist():
            if j not in seen:
                seen.add(j)
                out.append(j)
                if len(out) == want:
                    break
        start += 4 * want + 16
        if start > 64 * _MOD:  # cannot happen for n <= 1000003 distinct h values; guard anyway
            raise RuntimeError(f"positions({name!r}, {n}): not enough distinct candidates")
    return np.asarray(out, dtype=np.int64)


def probe(name: str, shape: Sequence[int], A: float) -> np.ndarray:
    """The float64 probe of tensor ``name`` (the forward fixture's formula, another name)."""
    return formula_base("grad_probe/" + name, tuple(int(s) for s in shape), A)


def summarize(name: str, g: torch.Tensor, A: float) -> Dict[str, object]:
    """``{"norm", "probe", "pos", "values"}`` of tensor ``g`` (any float dtype), in float64,
    plus ``probe_rms`` (the probe's root mean square; not stored).

    ``values`` keep the tensor's dtype (float32 values are stored exactly)."""
    flat = g.detach().reshape(-1)
    a = flat.double().cpu().numpy()
    pos = positions(name, a.size)
    p = probe(name, g.shape, A).reshape(-1)
    return {
        "norm": float(np.linalg.norm(a)),
        "probe": float(np.dot(a, p)),
        "probe_rms": float(np.linalg.norm(p) / np.sqrt(max(p.size, 1))),
        "pos": torch.from_numpy(pos),
        "values": flat[torch.from_numpy(pos)].clone(),
    }


@dataclass
class GradientFixture:
    """The loaded fixture (README §4 lists every key).

    Attributes:
        expected: the flat ``expected.pt`` dict.
        names: official parameter keys with a gradient in the authors' code, then ``feat{l}``.
        zero_grad: official keys whose gradient is identically zero (dead layers).
        A: the probe formula's frequency.
        lr: learning rate of the recorded AdamW step; betas, eps, weight_decay: AdamW settings;
        max_norm: global-norm clipping threshold.
    """

    expected: Dict[str, object]
    names: List[str]
    zero_grad: List[str]
    A: float
    lr: float
    betas: Tuple[float, float]
    eps: float
    weight_decay: float
    max_norm: float

    def summary(self, precision: str, name: str) -> Dict[str, object]:
        """The stored summary of ``name`` for ``precision`` "32" or "64"."""
        e, p = self.expected, f"grad{precision}/{name}"
        return {"norm": e[f"{p}/norm"], "probe": e[f"{p}/probe"], "pos": e[f"pos/{name}"],
                "values": e[f"{p}/values"]}

    def floor(self, name: str) -> float:
        """The authors' own ``||g32 - g64||_2`` of ``name`` (their float32 round-off)."""
        return float(self.expected[f"floor/{name}"])

    def floor_values(self, name: str) -> torch.Tensor:
        """|g32 - g64| of the authors at the stored positions (float64)."""
        e = self.expected
        return (e[f"grad32/{name}/values"].double() - e[f"grad64/{name}/values"]).abs()


def find_gradient_fixture(repo_root: "str | Path | None" = None) -> Optional[Path]:
    """``$STAGEINTERACTOR_GRADIENT_FIXTURE`` or ``<repo>/tests/fixtures/official_gradient_parity``
    (whichever holds an ``expected.pt``), or None."""
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[2]
    for c in (os.environ.get("STAGEINTERACTOR_GRADIENT_FIXTURE", ""),
              str(root / "tests" / "fixtures" / "official_gradient_parity")):
        if c and (Path(c) / "expected.pt").is_file():
            return Path(c)
    return None


def load_gradient_fixture(directory: "str | Path") -> GradientFixture:
    """Load ``expected.pt`` of a gradient fixture directory.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: on an unknown format version.
    """
    path = Path(directory) / "expected.pt"
    if not path.is_file():
        raise FileNotFoundError(f"official gradient fixture: {path} not found")
    e = torch.load(path, map_location="cpu", weights_only=True)
    if int(e["meta/format_version"]) != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {e['meta/format_version']}, "
                         f"expected {FORMAT_VERSION}")
    opt = json.loads(str(e["meta/optimizer_json"]))
    return GradientFixture(
        expected=e,
        names=list(json.loads(str(e["meta/names_json"]))),
        zero_grad=list(json.loads(str(e["meta/zero_grad_json"]))),
        A=float(e["meta/A"]),
        lr=float(opt["lr"]),
        betas=tuple(float(b) for b in opt["betas"]),
        eps=float(opt["eps"]),
        weight_decay=float(opt["weight_decay"]),
        max_norm=float(opt["max_norm"]),
    )


def record_summaries(out: Dict[str, object], precision: str, grads: Mapping[str, torch.Tensor],
                     A: float) -> None:
    """Write ``grad{precision}/{name}/norm|probe|values`` (and ``pos/{name}``) into ``out``."""
    for name, g in grads.items():
        s = summarize(name, g, A)
        out[f"pos/{name}"] = s["pos"]
        for field in ("norm", "probe", "values"):
            out[f"grad{precision}/{name}/{field}"] = s[field]
