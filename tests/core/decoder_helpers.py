"""Shared by the core decoder tests: a small decoder with the released stage structure."""
import torch

from stageinteractor.core.decoder import StageInteractorDecoder

SMALL = dict(query_dim=32, num_heads=4, num_groups=4, ffn_dim=64, num_queries=6, num_classes=5, out_points=16)


def small(**kw) -> StageInteractorDecoder:
    """A seeded small decoder; keyword arguments override :data:`SMALL` and the switches."""
    torch.manual_seed(0)
    return StageInteractorDecoder(**{**SMALL, **kw})
