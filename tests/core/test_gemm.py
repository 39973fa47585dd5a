"""The column-blocked generator GEMM (stageinteractor/core/gemm.py)."""
import pytest
import torch
import torch.nn.functional as F

from stageinteractor.core.gemm import COLUMN_BLOCK, column_blocks, wide_linear
from stageinteractor.core.op_count import OpCounter


@pytest.mark.parametrize("n_cols", [28080, 50016, 33584, 26544, 4096, 4099, 1000, 7 * 1536])
def test_column_blocks_is_the_closest_divisor(n_cols):
    got = column_blocks(n_cols)
    # brute force: all divisors n >= 3 with block width in [COLUMN_BLOCK/2, 2*COLUMN_BLOCK]
    ok = [n for n in range(3, n_cols + 1) if n_cols % n == 0 and COLUMN_BLOCK // 2 <= n_cols // n <= 2 * COLUMN_BLOCK]
    if not ok:
        assert got == 1
    else:
        assert n_cols % got == 0
        assert abs(n_cols // got - COLUMN_BLOCK) == min(abs(n_cols // n - COLUMN_BLOCK) for n in ok)


def _ops(fn, *args):
    """fn(*args) and its aten calls by op name (which path of wide_linear ran)."""
    with OpCounter() as ops:
        out = fn(*args)
    return out, {op.split(".")[-1]: n for op, n in ops.by_op().items()}


def _column_major(n_cols, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n_cols, generator=g).t(), torch.randn(n_cols, generator=g)  # (N, K) view, D-major


def test_wide_linear_equals_linear_in_inference():
    w, b = _column_major(28080, 128)  # 14 MiB: blocked
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ops = _ops(wide_linear, x, w, b)
        # the blocked path ran: one bmm over the column blocks, no addmm/mm
        assert ops.get("bmm") == 1 and not ops.get("addmm") and not ops.get("mm"), ops
        ref = x.double() @ w.double().t() + b.double()
        assert got.shape == (10, 28080) and got.is_contiguous()
        assert torch.allclose(got.double(), ref, rtol=0, atol=1e-4)
        assert torch.allclose(got, F.linear(x, w, b), rtol=1e-6, atol=1e-5)
        assert torch.allclose(wide_linear(x, w), F.linear(x, w), rtol=1e-6, atol=1e-5)


def test_wide_linear_falls_back_where_blocking_does_not_apply():
    w, b = _column_major(28080, 128)
    x = torch.randn(10, 128, requires_grad=True)
    out, ops = _ops(wide_linear, x, w, b)  # autograd: plain F.linear, gradients flow
    assert not ops.get("bmm"), ops
    out.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(10, -1), rtol=1e-5, atol=1e-3)
    with torch.no_grad():
        row_major = w.contiguous()  # blocks would not be views: plain F.linear
        got, ops = _ops(wide_linear, x, row_major, b)
        assert not ops.get("bmm") and torch.equal(got, F.linear(x, row_major, b))
        narrow_w, narrow_b = _column_major(1000, 128)
        assert torch.equal(wide_linear(x, narrow_w, narrow_b), F.linear(x, narrow_w, narrow_b))
        small_w, small_b = _column_major(28080, 32)  # 3.4 MiB: cache-resident, plain F.linear
        y = x[:, :32]
        assert torch.equal(wide_linear(y, small_w, small_b), F.linear(y, small_w, small_b))
