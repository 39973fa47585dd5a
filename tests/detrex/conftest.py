"""detrex-layer tests: one intra-op thread (the tensors are tiny; extra threads only spin on a
shared CPU and multiply the wall time)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
