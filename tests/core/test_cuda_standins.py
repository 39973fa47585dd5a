"""The ``accel`` devices catch what they are for (issue 21): planted placement, device-branch
and host-sync bugs fail on every device the ``gpu`` tests run on, stand-ins included."""
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu


class _MixesCpuTensor(nn.Module):
    """A forward that creates a tensor without ``device=``: a CPU tensor mixed in."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + torch.ones(4, 4)


class _ReadsOnHost(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if float(y.abs().max()) > 1e9:  # a host read (sync) in the forward
            raise ValueError("too large")
        return y


def test_a_cpu_tensor_mixed_in_raises(accel):
    m = accel.build(_MixesCpuTensor)
    x = accel.to(torch.randn(4, 4))
    with pytest.raises((RuntimeError, ValueError)), accel.run():  # FakeTensorDeviceMismatchError
        m(x)                                                      # is a RuntimeError


def test_built_on_the_device_and_cuda_branches_taken(accel):
    m = accel.build(nn.Linear, 4, 4)
    assert m.weight.device.type == accel.device.type
    with accel.run():
        y = m(accel.to(torch.randn(2, 4)))
    assert y.is_cuda == (accel.device.type == "cuda")


def test_a_host_read_is_seen(accel, host_probe):
    m = accel.build(_ReadsOnHost)
    x = accel.to(torch.randn(4, 4))
    if accel.real:
        with accel.run(host_probe):
            m(x)
    else:  # meta: no data to read; fake_cuda: DataDependentOutputException
        with pytest.raises(Exception), accel.run(host_probe):
            m(x)
    assert host_probe.scalar_reads == 1


def test_inputs_moved_by_accel_are_their_own_leaves(accel):
    cpu = torch.randn(3, requires_grad=True)
    dev = accel.to(cpu).requires_grad_(True)
    assert dev.is_leaf and dev is not cpu and dev.device.type == accel.device.type
