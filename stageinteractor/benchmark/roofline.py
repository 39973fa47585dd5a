"""The machine's multiply-add roofline in the same run: one n x n x n float32 matrix product
(``sgemm``), and the fraction of it that a model achieves (its fvcore multiply-adds / median
time / the sgemm's rate).

Where it is measured depends on the device (:func:`interleave_roofline`):

* CPU: timed **interleaved with the models**, iteration by iteration, so that it sees the same
  load as they do (the machine is shared, the rate moves with it);
* CUDA: measured **once, on the GPU**, before the timed sections (``iters`` products after one
  warm-up, the device synchronised around them): timing a CPU sgemm in every GPU iteration
  would put a CPU number under GPU figures and load the host the GPU run needs.
"""

import statistics
from typing import Any, Callable, Dict, List, Optional

ROOFLINE_N = 2048

__all__ = ["ROOFLINE_N", "interleave_roofline", "sgemm_fn", "measure_once", "roofline_figures"]


def interleave_roofline(device: str) -> bool:
    """True when the sgemm is timed interleaved with the models (CPU), False when it is
    measured once on the device before them (CUDA)."""
    return not str(device).startswith("cuda")


def sgemm_fn(n: int = ROOFLINE_N, device: str = "cpu") -> Callable[[], Any]:
    """One n x n x n float32 ``mm`` on ``device`` (inputs N(0, 1), fixed seed, output buffer
    preallocated): n^3 multiply-adds per call."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a, b = a.to(device), b.to(device)
    c = torch.empty(n, n, device=device)
    return lambda: torch.mm(a, b, out=c)


def measure_once(device: str, iters: int, n: int = ROOFLINE_N) -> List[float]:
    """Seconds of ``iters`` sgemms on ``device`` after one warm-up (device synchronised around
    each)."""
    from .timing import interleaved

    return interleaved({"sgemm": sgemm_fn(n, device)}, iters, 1, device, "roofline")["sgemm"]


def roofline_figures(
    sgemm_s: List[float],
    n: int,
    label: str,
    macs: Optional[int],
    ours_s: List[float],
    official_s: Optional[List[float]] = None,
) -> Dict[str, Any]:
    """The ``roofline`` entries of one timed section (``label`` = ``decoder`` or ``whole``).

    ``sgemm_macs_per_s`` = n^3 / median(sgemm_s); ``<label>_fraction`` = macs / median(ours_s)
    / that rate (None, with a ``note``, without a FLOP count); ``official_<label>_fraction`` the
    same for the authors' times (same function: same multiply-adds, counted on our model).
    """
    from .stats import spread

    rate = n**3 / statistics.median(sgemm_s)
    out: Dict[str, Any] = {"sgemm_n": n, "sgemm_s": spread(sgemm_s), "sgemm_macs_per_s": rate}
    out[f"{label}_macs"] = macs
    if not macs:
        out[f"{label}_fraction"] = None
        out["note"] = "no FLOP count (--no-flops): fractions not computed"
        return out
    out[f"{label}_fraction"] = macs / statistics.median(ours_s) / rate
    if official_s:
        out[f"official_{label}_fraction"] = macs / statistics.median(official_s) / rate
    return out
