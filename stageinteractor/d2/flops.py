"""FLOP counting with fvcore, including the batched matrix products of dynamic mixing.

fvcore traces the model with ``torch.jit`` and counts each traced aten op with a handle; ops
without a handle count 0 (that is how AdaMixer's published FLOPs missed its ``bmm``-based
dynamic mixing). :func:`flop_analysis` returns an ``fvcore.nn.FlopCountAnalysis`` with handles
for every matrix-product op the decoders here (and detrex's models) issue:

=======================================  =====================================================
op                                        FLOPs (1 FLOP = 1 multiply-add, fvcore convention)
=======================================  =====================================================
``linear`` / ``addmm`` / ``mm``           prod(input) * out_features     (fvcore's own)
``bmm``                                   n * c * t * d                  (fvcore's own)
``baddbmm``                               n * c * t * d  (the added bias is not counted)
``matmul``                                prod(broadcast batch) * m * k * n (any ranks)
``einsum``                                fvcore's own
``scaled_dot_product_attention``          prod(batch) * L * S * (E + E_v)  (QK^T and AV)
=======================================  =====================================================

fvcore also counts, with its own handles, convolutions, norms (batch/group/layer), ``grid_sampler``
and upsampling; other element-wise ops count 0. :data:`MATRIX_PRODUCT_OPS` lists the
matrix-product ops, e.g. to compare ``by_operator()`` with a hand count.
"""

from typing import Any, List, Optional, Sequence

import numpy as np
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["flop_analysis", "matrix_product_flops", "MATRIX_PRODUCT_OPS", "EXTRA_HANDLES"]

MATRIX_PRODUCT_OPS = (
    "linear",
    "addmm",
    "mm",
    "bmm",
    "baddbmm",
    "matmul",
    "einsum",
    "scaled_dot_product_attention",
)


def _prod(xs: Sequence[int]) -> int:
    return int(np.prod(list(xs), dtype=np.int64)) if len(xs) else 1


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(bias, b1 (n, c, t), b2 (n, t, d))`` -> n*c*t*d."""
    n, c, t = get_shape(inputs[1])
    d = get_shape(inputs[2])[-1]
    return n * c * t * d


def matmul_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``matmul`` with numpy broadcasting and 1-D operands: prod(batch) * m * k * n."""
    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    a = [1] + list(a) if len(a) == 1 else list(a)
    b = list(b) + [1] if len(b) == 1 else list(b)
    if a[-1] != b[-2]:
        raise ValueError(f"matmul flop handle: inner dimensions differ, shapes {a} and {b}")
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return _prod(batch) * a[-2] * a[-1] * b[-1]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev))``:
    the two products QK^T (L*S*E) and attn@V (L*S*Ev) per batch entry."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = np.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2]))
    L, E = q[-2], q[-1]
    S, Ev = k[-2], v[-1]
    return _prod(batch) * L * S * (E + Ev)


EXTRA_HANDLES = {
    "aten::baddbmm": baddbmm_flop_jit,
    "aten::matmul": matmul_flop_jit,
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
}


def flop_analysis(
    model: nn.Module, inputs: Any, *, detectron2_inputs: bool = False
) -> FlopCountAnalysis:
    """fvcore ``FlopCountAnalysis`` with :data:`EXTRA_HANDLES` (warnings silenced; the ops
    without a handle are in ``unsupported_ops()``).

    Args:
        model: module to trace; ``inputs``: its positional inputs (a tuple of tensors / lists
            of tensors), or, with ``detectron2_inputs=True``, a detectron2 ``List[dict]`` batch
            (detectron2's ``FlopCountAnalysis`` wrapper flattens it and the outputs; module
            names then start with ``model.``).
    """
    if detectron2_inputs:
        from detectron2.utils.analysis import FlopCountAnalysis as D2FlopCountAnalysis

        analysis = D2FlopCountAnalysis(model, inputs)
    else:
        analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def matrix_product_flops(analysis: FlopCountAnalysis, module: Optional[str] = None) -> int:
    """Sum of :data:`MATRIX_PRODUCT_OPS` FLOPs (whole model or one module name)."""
    if module is None:
        per_op = analysis.by_operator()
    else:
        per_op = analysis.by_module_and_operator().get(module, {})
    return int(sum(v for k, v in per_op.items() if k in MATRIX_PRODUCT_OPS))
