"""The cross-stage bank of dynamic filters (spec §2.5(d) step 8, §7.6).

What is stored: the raw generated channel filters M of the stages since the bank (re)started,
oldest first, stacked into **one** tensor ``(B*N*G, C_in, n, C_out)`` (filter index between the
input and output channels) so that all reused filters of a stage are adapted in one batched
expression, and every filter ``channel[:, :, m]`` is a matrix with unit column stride (a valid
BLAS operand: the cascade's ``baddbmm`` takes the batched-GEMM path without copying it); and the previous stage's full spatial filter
``(B*N*G, P_out, P_in)`` (its first rows are what the next stage reuses).

Bookkeeping (released code, ``reuse_start = 2``): stages ``< reuse_start - 1`` store nothing
(their filters are never reused; the released code stores stage 0's filters and then discards
them at stage 1); stage ``reuse_start - 1`` starts the bank; later stages append, keeping only
the newest ``max_channel`` channel filters (Tab. 10's max Δγ). Bank tensors are **not**
detached: later-stage losses reach earlier stages' filter generators.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["FilterBank", "update_bank"]


class FilterBank(NamedTuple):
    """channel: (B*N*G, C_in, n, C_out) or None, oldest first (axis 2); spatial: the previous
    stage's full spatial filter (B*N*G, P_out, P_in) or None."""

    channel: Optional[Tensor] = None
    spatial: Optional[Tensor] = None

    @property
    def num_channel(self) -> int:
        return 0 if self.channel is None else self.channel.shape[2]


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
    control flow)."""
    if stage < reuse_start - 1:
        return FilterBank()
    channel = None
    if max_channel > 0:
        new = channel_filter.unsqueeze(2)
        if stage == reuse_start - 1 or max_channel == 1 or bank.channel is None:
            channel = new
        else:
            old = bank.channel
            if old.shape[2] > max_channel - 1:
                old = old[:, :, old.shape[2] - (max_channel - 1):]
            channel = torch.cat([old, new], dim=2)
    return FilterBank(channel=channel, spatial=spatial_filter if keep_spatial else None)
