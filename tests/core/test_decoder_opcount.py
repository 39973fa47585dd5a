"""Issue 10: aten operator budget of one batch-1 no_grad inference.

Counted with a TorchDispatchMode: query generator + 6 stages + postprocess (top-k), released
configuration. The optional input checks (``check_inputs=True``, the default: finiteness of
features and sizes, one sum per tensor) are not part of that scope; they are counted
separately and must stay small. The count does not depend on the tensor sizes, so small
dimensions are used. The authors' code issues 3,053 operators for the same work.
"""
import collections

import torch

from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.op_count import count_decoder_inference

BUDGET = 1000


def _count(decoder, feats, sizes):
    # the project's one counter (stageinteractor/core/op_count.py); warm-up run not counted
    return collections.Counter(count_decoder_inference(decoder, feats, sizes)["by_op"])


def _inputs(dim):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, dim, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)], torch.tensor([[60, 50]])


CHECKS_BUDGET = 15


def test_inference_op_budget():
    torch.manual_seed(0)
    d = StageInteractorDecoder(query_dim=64, ffn_dim=128, num_queries=10, num_classes=5, check_inputs=False).eval()
    counts = _count(d, *_inputs(64))
    total = sum(counts.values())
    assert total <= BUDGET, (
        f"{total} aten ops > budget {BUDGET} (torch {torch.__version__}); "
        f"top ops: {counts.most_common(12)}"
    )
    d.check_inputs = True
    checks = sum(_count(d, *_inputs(64)).values()) - total
    assert 0 < checks <= CHECKS_BUDGET, f"input checks cost {checks} aten ops (torch {torch.__version__})"


def test_adamixer_baseline_within_budget():
    torch.manual_seed(0)
    d = StageInteractorDecoder.adamixer(
        query_dim=64, ffn_dim=128, num_queries=10, num_classes=5, check_inputs=False
    ).eval()
    total = sum(_count(d, *_inputs(64)).values())
    assert total <= BUDGET, f"{total} aten ops > budget {BUDGET} (torch {torch.__version__})"
