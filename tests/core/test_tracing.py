"""is_exporting() / is_tracing(): what each reports in eager mode, under TorchScript tracing and
under torch.compile (the one place where the two answers differ)."""
import warnings

import torch

from stageinteractor.core.tracing import is_exporting, is_tracing


def _flags(x: torch.Tensor) -> torch.Tensor:
    # the flags become constants of the captured graph: 10 * tracing + exporting
    return x + 10 * int(is_tracing()) + int(is_exporting())


def test_eager_is_neither():
    assert is_exporting() is False
    assert is_tracing() is False
    assert _flags(torch.zeros(1)).item() == 0


def test_torchscript_trace_is_both():
    x = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_flags, x, check_trace=False)
    assert traced(x).item() == 11


def test_torch_compile_is_tracing_not_exporting():
    compiled = torch.compile(_flags, backend="eager", fullgraph=True)
    assert compiled(torch.zeros(1)).item() == 10
    assert is_tracing() is False  # and nothing leaks out of the compiled call
