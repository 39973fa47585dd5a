"""CPU matrix products of the decoder: oneDNN linear layers and the column-blocked generator GEMM.

**oneDNN** (:func:`linear`, :class:`Linear`). On AMD CPUs the float32 BLAS behind ``F.linear``
/ ``torch.mm`` (MKL) runs its AVX2 path, ~90 GFLOPS on one EPYC core, while oneDNN's AVX-512
kernels (``torch.ops.mkldnn._linear_pointwise``) reach ~190. :func:`linear` runs the forward
and every product of the backward (``dx = dy W``, ``dW = dy^T x``) on oneDNN for CPU float32
tensors of at least :data:`MIN_ONEDNN_MACS` multiply-adds (:func:`use_onednn`), and is
``F.linear`` everywhere else (CUDA, other dtypes, autocast, tracing / export / compile, small
products). Every Linear of the decoder uses it (values equal up to float round-off).

**Column blocks** (:func:`wide_linear`, the stage's fused generator, only where oneDNN is off).
Each stage's generator is a Linear with few rows (the B*N queries) and a very wide output (26k-50k
columns at R50-100q). For that shape MKL reaches only 58-72 % of its square-sgemm rate: the
output row panel it streams is far larger than the caches. Splitting the columns into blocks of
:data:`COLUMN_BLOCK`, each GEMM writing its slice of one preallocated output, brings the same
product to 76-99 % of that rate (bit-identical to ``F.linear``). The blocked product is **one**
batched GEMM: the (K, N) weight viewed as n column blocks (n, K, N/n), the input broadcast over
them (a stride-0 batch), and the result written through the (M, n, N/n) -> (n, M, N/n) view of
one (M, N) output; the bias is added afterwards in place. Used only where it helps and is safe:
CPU tensors, no autograd, not while tracing / exporting / compiling (dynamo cannot capture a
non-contiguous ``out=``), weights of at least :data:`MIN_BLOCKED_WEIGHT_BYTES` and outputs with a
divisor of N near :data:`COLUMN_BLOCK` columns (n >= 3). oneDNN's unblocked product is ~2.4x
faster still, so :func:`wide_linear` is :func:`linear` wherever :func:`use_onednn` holds.
"""
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tracing import is_tracing

__all__ = [
    "COLUMN_BLOCK",
    "MIN_BLOCKED_WEIGHT_BYTES",
    "MIN_ONEDNN_MACS",
    "Linear",
    "column_blocks",
    "linear",
    "use_onednn",
    "wide_linear",
]

# target columns per block; 1024-3072 are all within a few % of the best on the measured machine
COLUMN_BLOCK = 1536
# below this the (K, N) weight fits the last-level cache and the plain GEMM is as fast
MIN_BLOCKED_WEIGHT_BYTES = 8 << 20


@lru_cache(maxsize=None)
def column_blocks(n_cols: int, block: int = COLUMN_BLOCK) -> int:
    """Number of equal column blocks for an output of ``n_cols`` columns: the divisor n of
    ``n_cols`` whose block width ``n_cols / n`` is closest to ``block`` within [block/2, 2*block];
    1 (no blocking) when there is none or when fewer than 3 blocks would result."""
    best, best_gap = 1, None
    for n in range(3, n_cols // max(block // 2, 1) + 1):
        if n_cols % n:
            continue
        width = n_cols // n
        if block // 2 <= width <= 2 * block:
            gap = abs(width - block)
            if best_gap is None or gap < best_gap:
                best, best_gap = n, gap
    return best


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for x (M, K), weight (N, K), bias (N,) -> (M, N).

    Where :func:`use_onednn` holds this is :func:`linear` (oneDNN, training and inference: for
    the generator's shapes ~2.4x the blocked MKL product below, 14 vs 36 ms at 200 x 256 x
    28080 on one EPYC core). Otherwise on CPU without autograd (oneDNN disabled or absent): one
    ``bmm`` over :func:`column_blocks` column blocks of the weight into a preallocated (M, N)
    output, then ``+ bias`` in place."""
    if use_onednn(x, weight):
        return linear(x, weight, bias)
    n_cols, k = weight.shape
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or weight.numel() * weight.element_size() < MIN_BLOCKED_WEIGHT_BYTES
        or torch.is_grad_enabled()
        or is_tracing()  # export, and torch.compile: a non-contiguous out= breaks its graph
    ):
        return F.linear(x, weight, bias)
    n = column_blocks(n_cols)
    if n == 1 or weight.stride() != (1, n_cols):  # blocks are views of a column-major weight
        return F.linear(x, weight, bias)
    m, width = x.shape[0], n_cols // n
    out = x.new_empty(m, n_cols)
    # (n, M, K) x (n, K, N/n) -> (n, M, N/n): block b of the column-major weight is
    # weight[b*width:(b+1)*width].t() (strides (width, N, 1)); the result is written through
    # the same block view of the (M, N) output
    torch.bmm(
        x.expand(n, m, k),
        weight.as_strided((n, k, width), (width, n_cols, 1)),
        out=out.as_strided((n, m, width), (width, n_cols, 1)),
    )
    return out if bias is None else out.add_(bias)


# ---------------------------------------------------------------------------------------------
# oneDNN matrix products (CPU, float32, forward and backward)
# ---------------------------------------------------------------------------------------------
#: below this many multiply-adds (M*N*K) a product stays on F.linear: the oneDNN call costs
#: ~20 us more per product (~60 us per forward + backward). Measured crossover (EPYC, 200 x 256
#: x N): ~2M MACs at 1 thread (1.2M: 0.83-0.92x, 4.1M: 1.3x), 4-13M at 2 threads (4.1M:
#: 0.85-0.9x, 13M: 1.2-1.5x); the decoder's products below it (box delta 0.2M, class logits
#: 4.1M at R50-100q) are a few us either way
MIN_ONEDNN_MACS = 1 << 22


def _onednn_op():
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it and oneDNN is enabled
    (x86 / aarch64 builds with oneDNN; ``torch.backends.mkldnn.enabled`` respected), else None."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN ops
        return None


def _dense(t: Tensor) -> bool:
    """Whether the 2-D ``t`` is row- or column-major with no gaps (its transpose contiguous)."""
    return t.is_contiguous() or t.t().is_contiguous()


def _mm(a: Tensor, b_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``a @ b_t.T (+ bias)`` for 2-D a (M, K), b_t (N, K) -> (M, N) contiguous, through oneDNN.

    Any strides: the op copies a non-contiguous ``a`` itself (so callers pass as ``a`` the
    smaller operand of a transposed product); ``b_t`` may be row- or column-major at no cost,
    any other layout (a column slice, an expanded tensor) is copied here first -- oneDNN runs
    such a weight through a reference kernel ~1000x slower."""
    if not _dense(b_t):
        b_t = b_t.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` for 2-D x (M, K), weight (N, K), bias (N,) | None with every product of the
    forward and backward on oneDNN: ``y = x W^T + b``, ``dx = dy W``, ``dW = dy^T x``, ``db =
    sum_rows dy``. For a column-major weight (strides (1, N)) ``dW`` is computed as
    ``(x^T dy)^T`` so the gradient has the weight's own layout (no copy when it is accumulated)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = _mm(grad, weight.t()) if need_x else None
        gw = None
        if need_w:
            n = weight.shape[0]
            if weight.stride() == (1, n) and n > 1:  # column-major weight: gradient in its layout
                gw = _mm(x.t(), grad.t()).t()
            else:
                gw = _mm(grad.t(), x.t())
        gb = grad.sum(0) if (need_b and ctx.has_bias) else None
        return gx, gw, gb


def use_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` runs ``x`` (..., K) times ``weight`` (N, K) on oneDNN: CPU float32
    tensors (also no autocast), not while tracing / exporting / compiling, a product of at least
    :data:`MIN_ONEDNN_MACS` multiply-adds, and a torch with the oneDNN linear op."""
    if (
        x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or x.dim() < 2
        or x.numel() == 0
        or torch.is_autocast_enabled("cpu")
        or is_tracing()
    ):
        return False
    if (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1] < MIN_ONEDNN_MACS:
        return False
    return _onednn_op() is not None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) -> (..., N).

    On the CPU in float32 (:func:`use_onednn`) every product of the forward and of the backward
    runs on oneDNN, whose AVX-512 kernels reach ~2x the float32 rate of the BLAS (MKL) that
    ``F.linear`` uses on AMD CPUs (docs/BENCHMARKS.md); the values equal ``F.linear``'s up to
    float round-off (another summation order). Everywhere else this is ``F.linear``."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # 2-D: no view op (op-count budget)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(x2, weight, bias)
    else:
        y = _mm(x2, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, state dict and init)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
