"""Graph breaks of the decoder's inference under ``torch.compile`` (issue 21 item 3).

Counted with ``torch._dynamo.explain`` (graph capture only, no inductor) on the CPU. The
column-blocked generator GEMM (``core.gemm.wide_linear``, CPU inference with weights of
>= 8 MiB, i.e. the R50 layout) writes through a non-contiguous ``out=``, which dynamo cannot
capture: one graph break per stage (27 breaks for the R50-100q decoder, 11 for the AdaMixer
baseline). Under compilation it steps aside to ``F.linear`` (the compiled graph fuses as it
likes). The rest of the decoder (the grid cache keyed by ``id(scale)``, the ``FilterBank``
records built per stage, ``lerp(..., out=)``) is captured without a break on the torch this
was measured with (docs/BENCHMARKS.md, "Stand-in device run (issue 21)").
"""
import pytest
import torch

from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.gemm import MIN_BLOCKED_WEIGHT_BYTES, column_blocks, wide_linear

dynamo = pytest.importorskip("torch._dynamo")


def test_wide_linear_has_no_graph_break_under_compile():
    rows, dim = 36864, 256  # an R50 stage generator's width: blocked on the CPU
    assert column_blocks(rows) > 1 and rows * dim * 4 >= MIN_BLOCKED_WEIGHT_BYTES
    weight = torch.randn(dim, rows).t()  # column-major, as DecoderStage stores it
    x, bias = torch.randn(3, dim), torch.randn(rows)
    with torch.no_grad():
        ex = dynamo.explain(wide_linear)(x, weight, bias)
        ref = wide_linear(x, weight, bias)  # eager: the blocked product
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # ~20 s of graph capture per decoder on a 2-core CPU
@pytest.mark.parametrize("adamixer", [False, True], ids=["stageinteractor", "adamixer"])
def test_tiny_decoder_inference_is_one_graph(adamixer):
    torch.manual_seed(0)
    kw = dict(num_classes=3, num_queries=4, num_stages=4, query_dim=16, num_heads=2, num_groups=2,
              ffn_dim=16, first_stage_points=32, num_points=4, out_points=4)
    d = (StageInteractorDecoder.adamixer(**kw) if adamixer else StageInteractorDecoder(**kw)).eval()
    feats = [torch.randn(1, 16, 32 // s, 32 // s) for s in (4, 8, 16, 32)]
    with torch.no_grad():
        ex = dynamo.explain(d)(feats, torch.tensor([[30.0, 28.0]]))
    assert ex.graph_count == 1 and ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
