"""Core-layer test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Core tests use tiny tensors: one torch thread avoids OpenMP contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
