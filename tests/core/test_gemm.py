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


# ---- oneDNN linear (forward and backward on oneDNN for CPU float32) ----
from stageinteractor.core.gemm import Linear, linear, use_onednn  # noqa: E402


def _float64_reference(x, w, b, g):
    """Gradients of sum(g * (x w^T + b)) by hand in float64: dx = g w, dw = g^T x, db = sum g."""
    x, w, b, g = (t.detach().double() for t in (x, w, b, g))
    return x @ w.t() + b, g @ w, g.t() @ x, g.sum(0)


@pytest.mark.skipif(not use_onednn(torch.zeros(64, 64), torch.zeros(64, 64)), reason="torch without oneDNN")
@pytest.mark.parametrize("layout", ["row_major", "column_major"])
def test_onednn_linear_forward_and_gradients_equal_float64(layout):
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(2, 100, 256, generator=g0)
    w = torch.randn(3000, 256, generator=g0) / 16
    if layout == "column_major":
        w = w.t().contiguous().t()
    b = torch.randn(3000, generator=g0)
    g = torch.randn(2, 100, 3000, generator=g0)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with OpCounter() as ops:
        y = linear(x, w, b)
        y.backward(g)
    by_op = ops.by_op()
    assert by_op.get("mkldnn._linear_pointwise") == 3  # forward, grad-input, grad-weight
    assert "aten.mm" not in by_op and "aten.addmm" not in by_op
    y64, gx, gw, gb = _float64_reference(x.reshape(200, 256), w, b, g.reshape(200, 3000))
    assert torch.allclose(y.reshape(200, 3000).double(), y64, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x.grad.reshape(200, 256).double(), gx, rtol=1e-5, atol=1e-3)
    assert torch.allclose(w.grad.double(), gw, rtol=1e-5, atol=1e-3)
    assert torch.allclose(b.grad.double(), gb, rtol=1e-5, atol=1e-4)
    assert w.grad.stride() == w.stride()  # the gradient keeps the weight's layout


def test_linear_falls_back_to_f_linear():
    w = torch.randn(512, 256)
    x = torch.randn(64, 256)
    assert not use_onednn(x, torch.randn(4, 2))  # tiny product
    assert not use_onednn(x.double(), w.double())
    assert not use_onednn(torch.randn(64, 256, device="meta"), w.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, w)
        assert linear(x, w).dtype == torch.bfloat16  # autocast decides, as for F.linear
    m = Linear(256, 512)
    assert set(m.state_dict()) == {"weight", "bias"}
