"""The training path of the Eq. 3 adapter (``_AdaptedFilter``): same forward as the inference
expression, and gradients equal to autograd's through the lerp (and to finite differences)."""
import torch

from stageinteractor.core.dynamic_mixing import _AdaptedFilter


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    Mb, C = 3, 5
    shapes = [(Mb, C, C), (Mb, C, C), (Mb, C, 1), (Mb, 1, C)]
    out = [torch.randn(s, generator=g, dtype=dtype) for s in shapes[:2]]
    out += [torch.rand(s, generator=g, dtype=dtype) for s in shapes[2:]]
    return [t.requires_grad_() for t in out]


def test_adapter_function_matches_plain_autograd():
    args = _inputs(torch.float64)
    got = _AdaptedFilter.apply(*args)
    m_cur, m_j, a, c = args
    exp = torch.lerp(m_cur, m_j, a * c)
    assert torch.equal(got, exp)  # identical forward expression
    # and the inference path (no autograd, written over the weight buffer) computes the same
    from stageinteractor.core.dynamic_mixing import _adapt_inference

    with torch.no_grad():
        assert torch.equal(_adapt_inference(*(t.detach() for t in args)), exp.detach())
    # Eq. 3 by hand: (a c^T) * M_j + (1 - a c^T) * M_cur
    w = a * c
    assert torch.allclose(got, w * m_j + (1 - w) * m_cur, atol=1e-12)
    grad = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad(got, args, grad)
    g_exp = torch.autograd.grad(exp, args, grad)
    for x, y in zip(g_got, g_exp):
        assert torch.allclose(x, y, atol=1e-12)


def test_adapter_function_gradcheck():
    assert torch.autograd.gradcheck(_AdaptedFilter.apply, _inputs(torch.float64))
