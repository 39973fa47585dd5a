"""The decoder's CPU matrix products (stageinteractor/core/gemm.py): the oneDNN linear and the
column-blocked generator GEMM (the latter runs only where oneDNN is off)."""
import copy

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


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # mkldnn.flags() also sets its TF32 flag
def test_wide_linear_equals_linear_in_inference():
    w, b = _column_major(28080, 128)  # 14 MiB: blocked
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # the MKL fallback
        got, ops = _ops(wide_linear, x, w, b)
        # the blocked path ran: one bmm over the column blocks, no addmm/mm
        assert ops.get("bmm") == 1 and not ops.get("addmm") and not ops.get("mm"), ops
        ref = x.double() @ w.double().t() + b.double()
        assert got.shape == (10, 28080) and got.is_contiguous()
        assert torch.allclose(got.double(), ref, rtol=0, atol=1e-4)
        assert torch.allclose(got, F.linear(x, w, b), rtol=1e-6, atol=1e-5)
        assert torch.allclose(wide_linear(x, w), F.linear(x, w), rtol=1e-6, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # mkldnn.flags() also sets its TF32 flag
def test_wide_linear_falls_back_where_blocking_does_not_apply():
    w, b = _column_major(28080, 128)
    x = torch.randn(10, 128, requires_grad=True)
    out, ops = _ops(wide_linear, x, w, b)  # autograd: plain F.linear, gradients flow
    assert not ops.get("bmm"), ops
    out.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(10, -1), rtol=1e-5, atol=1e-3)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        row_major = w.contiguous()  # blocks would not be views: plain F.linear
        got, ops = _ops(wide_linear, x, row_major, b)
        assert not ops.get("bmm") and torch.equal(got, F.linear(x, row_major, b))
        narrow_w, narrow_b = _column_major(1000, 128)
        assert torch.equal(wide_linear(x, narrow_w, narrow_b), F.linear(x, narrow_w, narrow_b))
        small_w, small_b = _column_major(28080, 32)  # 3.4 MiB: cache-resident, plain F.linear
        y = x[:, :32]
        assert torch.equal(wide_linear(y, small_w, small_b), F.linear(y, small_w, small_b))


# ---- oneDNN linear (forward and backward on oneDNN for CPU float32) ----
from stageinteractor.core.gemm import Linear, _onednn_op, linear, use_onednn  # noqa: E402


def _float64_reference(x, w, b, g):
    """Gradients of sum(g * (x w^T + b)) by hand in float64: dx = g w, dw = g^T x, db = sum g."""
    x, w, b, g = (t.detach().double() for t in (x, w, b, g))
    return x @ w.t() + b, g @ w, g.t() @ x, g.sum(0)


@pytest.mark.skipif(_onednn_op() is None, reason="torch without oneDNN")
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


needs_onednn = pytest.mark.skipif(_onednn_op() is None, reason="torch without oneDNN")


def _pointwise_calls(fn):
    with OpCounter() as ops:
        out = fn()
    by_op = ops.by_op()
    return out, by_op.get("mkldnn._linear_pointwise", 0), by_op


@needs_onednn
def test_wide_linear_runs_onednn_where_available():
    w, b = _column_major(28080, 128)
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, calls, by_op = _pointwise_calls(lambda: wide_linear(x, w, b))
    assert calls == 1 and "aten.bmm" not in by_op, by_op
    ref = x.double() @ w.double().t() + b.double()
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-4)


@needs_onednn
def test_onednn_3d_input_without_bias_and_frozen_weight():
    g0 = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 300, generator=g0, requires_grad=True)
    w = torch.randn(500, 300, generator=g0) / 16  # does not require grad
    g = torch.randn(3, 40, 500, generator=g0)
    y, calls, by_op = _pointwise_calls(lambda: linear(x, w))
    assert y.shape == (3, 40, 500) and calls == 1
    _, calls, by_op = _pointwise_calls(lambda: y.backward(g))
    assert calls == 1 and "aten.mm" not in by_op  # grad-input only: no weight gradient product
    ref_y = x.detach().double() @ w.double().t()
    assert torch.allclose(y.double(), ref_y, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x.grad.double(), g.double() @ w.double(), rtol=1e-5, atol=1e-3)
    assert w.grad is None


@needs_onednn
def test_onednn_no_grad_records_no_graph():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(512, 256, requires_grad=True)
    with torch.no_grad():
        y, calls, _ = _pointwise_calls(lambda: linear(x, w))
    assert calls == 1 and not y.requires_grad and y.grad_fn is None
    assert torch.allclose(y.double(), x.detach().double() @ w.detach().double().t(), rtol=1e-5, atol=1e-3)


@needs_onednn
def test_onednn_expanded_gradient_and_strided_weight():
    """y.sum() hands backward a stride-0 gradient; a column slice of a column-major tensor is a
    weight in neither layout (copied before oneDNN, which would run it through a slow kernel)."""
    g0 = torch.Generator().manual_seed(3)
    base = torch.randn(256, 2 * 700, generator=g0).t()  # (1400, 256), strides (1, 1400)
    w = base[:700].detach().requires_grad_()  # (700, 256) view, strides (1, 1400)
    w_leaf = base[:700].clone().requires_grad_()
    x = torch.randn(100, 256, generator=g0, requires_grad=True)
    b = torch.randn(700, generator=g0, requires_grad=True)
    y = linear(x, w_leaf, b)
    y.sum().backward()
    x64, w64 = x.detach().double(), w.detach().double()
    assert torch.allclose(y.double(), x64 @ w64.t() + b.detach().double(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(x.grad.double(), w64.sum(0).expand(100, -1), rtol=1e-5, atol=1e-3)
    assert torch.allclose(w_leaf.grad.double(), x64.sum(0).expand(700, -1), rtol=1e-5, atol=1e-3)
    assert torch.allclose(b.grad, torch.full((700,), 100.0))
    with torch.no_grad():
        got = linear(x, w, b)  # the strided view itself
    assert torch.allclose(got.double(), x64 @ w64.t() + b.detach().double(), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_two_threads_equal_float64():
    g0 = torch.Generator().manual_seed(4)
    x = torch.randn(200, 512, generator=g0, requires_grad=True)
    w = (torch.randn(512, 384, generator=g0) / 16).t().requires_grad_()
    g = torch.randn(200, 384, generator=g0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = linear(x, w)
        y.backward(g)
    finally:
        torch.set_num_threads(threads)
    x64, w64, g64 = x.detach().double(), w.detach().double(), g.double()
    assert torch.allclose(y.double(), x64 @ w64.t(), rtol=1e-5, atol=1e-3)
    assert torch.allclose(x.grad.double(), g64 @ w64, rtol=1e-5, atol=1e-3)
    assert torch.allclose(w.grad.double(), g64.t() @ x64, rtol=1e-5, atol=1e-3)


@needs_onednn
def test_min_onednn_macs_threshold():
    from stageinteractor.core import gemm

    k = 64
    rows = gemm.MIN_ONEDNN_MACS // (k * k)
    w = torch.randn(k, k)
    assert use_onednn(torch.randn(rows, k), w)
    assert not use_onednn(torch.randn(rows - 1, k), w)
    _, calls, by_op = _pointwise_calls(lambda: linear(torch.randn(rows - 1, k), w))
    assert calls == 0 and by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) == 1


@needs_onednn
def test_decoder_linears_run_onednn_and_match_float64(monkeypatch):
    """Every Linear of the decoder goes through gemm (no aten mm/addmm left in forward or
    backward at a threshold of 0); float32 outputs and gradients match the same decoder in
    float64 (where gemm is F.linear)."""
    from stageinteractor.core import gemm

    from decoder_helpers import small

    d = small(num_stages=3, subpoint_offsets="per_group")  # no sampler-owned Linear
    g0 = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g0) * 0.05)
    assert all(isinstance(m, Linear) for m in d.modules() if isinstance(m, torch.nn.Linear))
    feats = [torch.randn(2, 32, 64 // s, 64 // s, generator=g0) for s in (4, 8, 16, 32)]
    sizes = torch.tensor([[64, 64], [40, 56]])
    d64 = copy.deepcopy(d).double()
    monkeypatch.setattr(gemm, "MIN_ONEDNN_MACS", 0)

    def loss(model, dtype):
        out = model([f.to(dtype) for f in feats], sizes)
        return sum(o["logits"].sum() + o["boxes"].sum() * 1e-3 for o in out)

    with OpCounter() as ops:
        l32 = loss(d, torch.float32)
        l32.backward()
    by_op = ops.by_op()
    assert "aten.mm" not in by_op and "aten.addmm" not in by_op and "aten.linear" not in by_op, by_op
    # per stage 7 Linears + in_proj in forward, + grad products; 3 stages, 2 reuse-static layers
    assert by_op["mkldnn._linear_pointwise"] >= 3 * 8 * 2
    l64 = loss(d64, torch.float64)
    l64.backward()
    assert torch.allclose(l32.double(), l64, rtol=1e-4, atol=1e-3)
    for (name, p32), p64 in zip(d.named_parameters(), d64.parameters()):
        if p64.grad is None:
            continue
        err = (p32.grad.double() - p64.grad).abs().max()
        assert err <= 1e-3 * (1 + p64.grad.abs().max()), (name, float(err))
