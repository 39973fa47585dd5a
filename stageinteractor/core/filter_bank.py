"""The cross-stage bank of dynamic filters (spec §2.5(d) step 8, §7.6).

What is stored: the raw generated channel filters M of the stages since the bank (re)started,
oldest first, as a **tuple** of the stages' own ``(B*N*G, C_in, C_out)`` tensors (no copy: each is
the view of its stage's generator output that the stage itself multiplied with, so every filter
has unit column stride, a valid BLAS operand for the cascade's ``baddbmm``); and the previous
stage's full spatial filter ``(B*N*G, P_out, P_in)`` (its first rows are what the next stage
reuses).

Why a tuple and not one stacked tensor: the cascade applies the reused filters one after the
other, so nothing needs them stacked. Stacking would copy the bank at every stage (1 + 2 + ... +
n filters of ``B*N*G*C*C`` floats) and, in training, autograd would keep each stage's copy for
the backward pass of the adapter (about 60 MiB at R50-100q, batch 1); the tuple adds no aten
call and no memory. :attr:`FilterBank.channel` still gives the stacked
``(B*N*G, C_in, n, C_out)`` view of the bank for inspection (it copies; not used by the model).

Bookkeeping (released code, ``reuse_start = 2``): stages ``< reuse_start - 1`` store nothing
(their filters are never reused; the released code stores stage 0's filters and then discards
them at stage 1); stage ``reuse_start - 1`` starts the bank; later stages append, keeping only
the newest ``max_channel`` channel filters (Tab. 10's max Δγ). Bank tensors are **not**
detached: later-stage losses reach earlier stages' filter generators.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["FilterBank", "update_bank"]


class FilterBank:
    """Immutable record of the reusable filters.

    Args (keyword-only):
        filters: tuple of n channel filters, each (B*N*G, C_in, C_out), oldest first.
        channel: alternatively the n filters stacked as (B*N*G, C_in, n, C_out) (unbound into
            ``filters`` as views; give at most one of ``filters`` / ``channel``).
        spatial: the previous stage's full spatial filter (B*N*G, P_out, P_in) or None.
    """

    __slots__ = ("filters", "spatial")

    def __init__(
        self,
        *,
        filters: Tuple[Tensor, ...] = (),
        channel: Optional[Tensor] = None,
        spatial: Optional[Tensor] = None,
    ):
        if channel is not None:
            if filters:
                raise ValueError("FilterBank: give either filters or channel, not both")
            if channel.dim() != 4:
                raise ValueError(
                    f"FilterBank: channel must be (B*N*G, C_in, n, C_out), got shape {tuple(channel.shape)}"
                )
            filters = channel.unbind(2)
        self.filters: Tuple[Tensor, ...] = tuple(filters)
        self.spatial = spatial

    @property
    def num_channel(self) -> int:
        return len(self.filters)

    @property
    def channel(self) -> Optional[Tensor]:
        """The filters stacked as (B*N*G, C_in, n, C_out) (a copy, for inspection), or None."""
        return torch.stack(self.filters, dim=2) if self.filters else None


def update_bank(
    bank: FilterBank,
    channel_filter: Tensor,
    spatial_filter: Tensor,
    *,
    stage: int,
    reuse_start: int,
    max_channel: int,
    keep_spatial: bool,
) -> FilterBank:
    """Return the bank after ``stage`` (0-based) generated ``channel_filter`` (B*N*G, C, C) and
    used ``spatial_filter`` (B*N*G, P_out, P_in). Pure bookkeeping on Python ints (no data-dependent
    control flow, no aten call)."""
    if stage < reuse_start - 1:
        return FilterBank()
    filters: Tuple[Tensor, ...] = ()
    if max_channel > 0:
        if stage == reuse_start - 1 or max_channel == 1:
            filters = (channel_filter,)
        else:
            filters = (bank.filters + (channel_filter,))[-max_channel:]
    return FilterBank(filters=filters, spatial=spatial_filter if keep_spatial else None)
