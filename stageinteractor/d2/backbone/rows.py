"""1x1 convolutions as matrix products over the pixel rows of channels-last maps (CPU float32).

A channels-last map (N, C, H, W) is, as a free view, the (N*H*W, C) matrix of its pixel rows; a 1x1
conv with weight (C_out, C, 1, 1) and bias is then ``rows W^T + b``. On the CPU that product runs
on oneDNN (:func:`stageinteractor.core.gemm.linear`'s kernels), ~2x the rate of the THNN
``_slow_conv2d`` that torch picks for an unstrided 1x1 conv at 1 thread and batch < 16 on the
measured AMD EPYC. :func:`rows_linear` adds, in the same oneDNN call, a ReLU or the residual add of
a ResNet block, and its backward picks the cheapest way to the weight gradient ``g^T x``:

* oneDNN's product takes its left operand row-major, so ``g^T x`` needs one transposed copy of
  ``g`` (M, C_out) or of ``x`` (M, C_in): the narrower one is copied (for R50's res3-res5 shapes
  1.3-2.4x faster than always copying ``g``);
* above :data:`CONV_WGRAD_MIN_COPY` elements for that copy (the neck's stride-4 level: 121,600
  x 256) the weight gradient is oneDNN's convolution backward-weights on the (1, C, M, 1) view
  instead, which reduces over the rows without a copy (122 vs 200 ms at that size, 1 thread).

Everything else (no oneDNN, other dtypes, autocast, tracing, tiny products) is
``gemm.linear`` + plain ops: :func:`stageinteractor.core.gemm.use_onednn` decides.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from stageinteractor.core import gemm

__all__ = ["CONV_WGRAD_MIN_COPY", "rows_linear", "weight_grad"]

#: a weight gradient whose transposed copy would exceed this many elements runs as a convolution
#: backward-weights (no copy)
CONV_WGRAD_MIN_COPY = 16 << 20


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T x`` -> (N, K) for row-major ``grad`` (M, N) and ``x`` (M, K) on oneDNN (module
    doc: the narrower operand is transposed, or a convolution backward-weights for large M)."""
    m, n = grad.shape
    k = x.shape[1]
    if m * min(n, k) >= CONV_WGRAD_MIN_COPY and grad.is_contiguous() and x.is_contiguous():
        # (1, C, M, 1) channels-last views; dilation 2 (no effect on a 1x1 kernel) keeps torch
        # from the THNN kernel it picks for unstrided undilated 1x1 convs
        g4 = grad.view(1, m, 1, n).permute(0, 3, 1, 2)
        x4 = x.view(1, m, 1, k).permute(0, 3, 1, 2)
        w4 = x.new_empty(n, k, 1, 1)
        _, gw, _ = torch.ops.aten.convolution_backward(
            g4, x4, w4, None, [1, 1], [0, 0], [2, 2], False, [0, 0], 1, [False, True, False]
        )
        return gw.view(n, k)
    if n <= k:
        return gemm.linear(grad.t(), x.t())  # copies grad^T (M x N)
    return gemm.linear(x.t(), grad.t()).t()  # copies x^T (M x K)


class _RowsLinear(torch.autograd.Function):
    """``y = x W^T + b`` (``relu``: ``relu(x W^T + b)``; ``other``: ``x W^T + b + other``) for
    rows x (M, K), W (N, K), b (N,), other (M, N), as ONE oneDNN product with the ReLU or the
    add fused (no separate pass over the (M, N) result). Backward: ``g`` (masked by ``y > 0``
    after a ReLU) gives ``dx = g W``, ``dW = g^T x`` (:func:`weight_grad`), ``db = sum_rows g``,
    ``dother = g``."""

    @staticmethod
    def forward(ctx, x, weight, bias, other, relu: bool):
        y = _forward(x, weight, bias, other, relu)
        ctx.relu = relu
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b, need_o, _ = ctx.needs_input_grad
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        grad = grad.contiguous()
        gx = gemm.linear(grad, weight.t()) if need_x else None
        gw = weight_grad(grad, x) if need_w else None
        gb = grad.sum(0) if need_b else None
        return gx, gw, gb, (grad if need_o else None), None


def _forward(x, weight, bias, other, relu):
    if other is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def rows_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
    other: Optional[Tensor] = None, relu: bool = False,
) -> Tensor:
    """``x W^T + b`` (+ ``other``) (then ReLU): x (M, K) pixel rows, weight (N, K), bias (N,),
    other (M, N) -> (M, N) contiguous. ``relu`` and ``other`` are exclusive. Fused on oneDNN
    where :func:`gemm.use_onednn` takes the product (module doc), else ``gemm.linear`` and plain
    ops; the values are the same up to float round-off."""
    if relu and other is not None:
        raise ValueError("rows_linear: relu and other are exclusive")
    odd_other = other is not None and (
        other.dtype != torch.float32 or other.shape != (x.shape[0], weight.shape[0])
    )
    if odd_other or not gemm.use_onednn(x, weight):
        y = gemm.linear(x, weight, bias)
        if other is not None:
            y = y + other
        return F.relu(y) if relu else y
    if not x.is_contiguous():
        x = x.contiguous()
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, other)
    ):
        return _RowsLinear.apply(x, weight, bias, other, relu)
    return _forward(x, weight, bias, other, relu)
