"""Counting aten operator calls of the decoder (issue 10), per section and per operator.

A :class:`OpCounter` is a ``TorchDispatchMode``: every aten call dispatched while it is active is
counted once (views and in-place ops included, as the dispatcher sees them), attributed to the
current *section*. :func:`stage_sections` installs forward hooks that switch the section to
``"stage{s}"`` while decoder stage s runs (``"decoder"`` outside the stages: query generator,
filter-bank bookkeeping, input checks).

This is the one counter implementation of the project: the op-budget test
(``tests/core/test_decoder_opcount.py``) and ``tools/benchmark.py --count-ops`` both use it.
The count is a property of the code path, not of tensor sizes (it does not depend on B, N, D
as long as the same branches run).
"""

import collections
import contextlib
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "stage_sections", "count_decoder_inference", "count_decoder_training"]


class OpCounter(TorchDispatchMode):
    """Counts aten calls by (section, op overload packet).

    Attributes:
        section: name the next calls are attributed to (set it directly or with
            :meth:`in_section`).
        counts: ``Counter`` of ``(section, op_name)`` -> calls.
    """

    def __init__(self, section: str = "main"):
        super().__init__()
        self.section = section
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.section, str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def in_section(self, name: str) -> Iterator[None]:
        prev, self.section = self.section, name
        try:
            yield
        finally:
            self.section = prev

    # ---------------------------------------------------------------- summaries
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_section(self) -> Dict[str, int]:
        out: Dict[str, int] = collections.OrderedDict()
        for (sec, _), n in self.counts.items():
            out[sec] = out.get(sec, 0) + n
        return dict(out)

    def by_op(self) -> Dict[str, int]:
        c: collections.Counter = collections.Counter()
        for (_, op), n in self.counts.items():
            c[op] += n
        return dict(c.most_common())

    def summary(self) -> Dict[str, object]:
        """``{"total": int, "by_section": {...}, "by_op": {...}}`` (plain python, JSON-ready)."""
        return {"total": self.total, "by_section": self.by_section(), "by_op": self.by_op()}


@contextlib.contextmanager
def stage_sections(
    counter: OpCounter, stages: nn.ModuleList, outside: str = "decoder"
) -> Iterator[None]:
    """While active, calls inside ``stages[s].forward`` count under ``"stage{s}"``; after each
    stage the section returns to ``outside``."""
    handles = []
    for s, stage in enumerate(stages):
        handles.append(
            stage.register_forward_pre_hook(
                lambda m, a, s=s: setattr(counter, "section", f"stage{s}")
            )
        )
        handles.append(
            stage.register_forward_hook(lambda m, a, o: setattr(counter, "section", outside))
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _postprocess_default(outputs: List[Dict[str, Tensor]]) -> object:
    from .postprocess import topk_detections

    last = outputs[-1]
    return topk_detections(last["logits"], last["boxes"])


def count_decoder_inference(
    decoder: nn.Module,
    features: List[Tensor],
    image_sizes: Tensor,
    *,
    postprocess: Optional[Callable[[List[Dict[str, Tensor]]], object]] = None,
    warmup: bool = True,
) -> Dict[str, object]:
    """aten calls of one ``torch.no_grad()`` inference: decoder (query generator, all stages,
    input checks) + post-processing (default: :func:`~.postprocess.topk_detections` of the last
    stage). Sections: ``decoder``, ``stage0..``, ``postprocess``. Returns :meth:`OpCounter.summary`.
    """
    postprocess = postprocess or _postprocess_default
    with torch.no_grad():
        if warmup:  # lazy kernel / cache initialisation must not be counted
            postprocess(decoder(features, image_sizes))
        counter = OpCounter("decoder")
        with stage_sections(counter, decoder.stages), counter:
            out = decoder(features, image_sizes)
            with counter.in_section("postprocess"):
                postprocess(out)
    return counter.summary()


def count_decoder_training(
    decoder: nn.Module,
    criterion: Callable[..., Dict[str, Tensor]],
    features: List[Tensor],
    image_sizes: Tensor,
    targets: Dict[str, Tensor],
    *,
    warmup: bool = True,
) -> Dict[str, object]:
    """aten calls of the forward of one training step: decoder (grad enabled) + criterion +
    the sum of the losses (no backward). ``targets``: ``gt_boxes``, ``gt_classes``, ``gt_mask``
    (DESIGN.md). Sections: ``decoder``, ``stage0..``, ``criterion``."""

    def run():
        out = decoder(features, image_sizes)
        with counter.in_section("criterion"):
            losses = criterion(
                out, targets["gt_boxes"], targets["gt_classes"], targets["gt_mask"], image_sizes
            )
            return sum(losses.values())

    counter = OpCounter("decoder")
    if warmup:
        with torch.enable_grad():
            run()
    counter = OpCounter("decoder")
    with torch.enable_grad(), stage_sections(counter, decoder.stages), counter:
        run()
    return counter.summary()
