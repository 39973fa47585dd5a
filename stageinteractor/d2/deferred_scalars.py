"""Event-storage scalars that stay on the device until the trainer's one copy per step.

``storage.put_scalar(name, tensor)`` calls ``float(tensor)``: on a GPU, one host sync per
scalar. :func:`put_device_scalars` instead

* inside :func:`deferring` (the :class:`~stageinteractor.d2.engine.Trainer` wraps each step
  in it) queues the device tensor; the trainer takes the queue with :func:`take_pending` and
  copies it to the host **together with the losses and the gradient norm** (one transfer per
  step);
* outside it (another trainer, a test, a tool) writes at once, with one copy per call.
"""

import contextlib
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.utils.events import get_event_storage, has_event_storage

__all__ = ["put_device_scalars", "deferring", "take_pending", "write_scalars"]

_pending: List[Tuple[List[str], Tensor, bool]] = []
_depth = [0]


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """While active, :func:`put_device_scalars` queues instead of writing."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            _pending.clear()  # whatever the trainer did not take is dropped with the step


def put_device_scalars(names: Sequence[str], values: Tensor, smoothing_hint: bool = False) -> None:
    """Log ``values[i]`` as ``names[i]`` (``values``: (len(names),) tensor, any device) to the
    current event storage; no-op without one."""
    if not has_event_storage():
        return
    values = values.detach().reshape(-1)
    if _depth[0]:
        _pending.append((list(names), values, smoothing_hint))
    else:
        write_scalars(list(names), values.cpu().tolist(), smoothing_hint)


def take_pending() -> List[Tuple[List[str], Tensor, bool]]:
    """The queued ``(names, values, smoothing_hint)`` entries, removing them from the queue."""
    out = list(_pending)
    _pending.clear()
    return out


def write_scalars(names: Sequence[str], values: Sequence[float], smoothing_hint: bool) -> None:
    """Put python floats into the current event storage."""
    if names:
        get_event_storage().put_scalars(
            **{n: float(v) for n, v in zip(names, values)}, smoothing_hint=smoothing_hint
        )
