"""rows_linear / weight_grad (1x1 convs over pixel rows, oneDNN with fused ReLU / residual add)
against float64 brute force: ``x @ W.T + b (+ other)``, ReLU, and the hand-written gradients."""
import pytest
import torch

pytest.importorskip("detectron2")

from stageinteractor.d2.backbone import rows as rows_mod  # noqa: E402
from stageinteractor.d2.backbone.rows import rows_linear, weight_grad  # noqa: E402

TOL = 1e-5  # relative to max |x|


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("n,k", [(48, 24), (24, 48), (32, 32)])
@pytest.mark.parametrize("conv", [False, True])
def test_weight_grad_all_routes(monkeypatch, n, k, conv):
    """g^T x by the transposed-g, transposed-x and convolution backward-weights routes."""
    g = torch.Generator().manual_seed(n * k)
    grad, x = torch.randn(700, n, generator=g), torch.randn(700, k, generator=g)
    if conv:
        monkeypatch.setattr(rows_mod, "CONV_WGRAD_MIN_COPY", 1)
    out = weight_grad(grad, x)
    assert out.shape == (n, k)
    assert _rel(out, grad.double().t() @ x.double()) < TOL


@pytest.mark.parametrize("mode", ["plain", "relu", "add"])
@pytest.mark.parametrize("conv_wgrad", [False, True])
def test_rows_linear_forward_backward_float64(monkeypatch, mode, conv_wgrad):
    if conv_wgrad:
        monkeypatch.setattr(rows_mod, "CONV_WGRAD_MIN_COPY", 1)
    g = torch.Generator().manual_seed(0)
    m, k, n = 900, 40, 72
    x = torch.randn(m, k, generator=g).requires_grad_(True)
    w = torch.randn(n, k, generator=g).requires_grad_(True)
    b = torch.randn(n, generator=g).requires_grad_(True)
    other = torch.randn(m, n, generator=g).requires_grad_(True) if mode == "add" else None
    assert rows_mod.gemm.use_onednn(x, w)
    y = rows_linear(x, w, b, other=other, relu=mode == "relu")
    proj = torch.randn(m, n, generator=g, dtype=torch.float64)
    (y * proj.float()).sum().backward()

    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    o64 = other.detach().double().requires_grad_(True) if other is not None else None
    ref = x64 @ w64.t() + b64
    if o64 is not None:
        ref = ref + o64
    if mode == "relu":
        ref = ref.clamp_min(0)
    (ref * proj).sum().backward()
    assert y.shape == (m, n) and y.is_contiguous()
    assert _rel(y, ref) < TOL
    for t, r in ((x, x64), (w, w64), (b, b64), (other, o64)):
        if t is not None:
            assert _rel(t.grad, r.grad) < TOL
    with torch.no_grad():  # the graph-free route gives the same values
        assert torch.equal(rows_linear(x, w, b, other=other, relu=mode == "relu"), y.detach())


def test_rows_linear_falls_back_off_onednn():
    f64 = torch.float64
    x, w, b = torch.randn(50, 8, dtype=f64), torch.randn(6, 8, dtype=f64), torch.randn(6, dtype=f64)
    torch.testing.assert_close(rows_linear(x, w, b, relu=True), (x @ w.t() + b).clamp_min(0))
    other = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(rows_linear(x, w, b, other=other), x @ w.t() + b + other)
    with pytest.raises(ValueError):
        rows_linear(x, w, b, other=other, relu=True)
