"""What only a CUDA machine would run, checked on the CPU by faking its environment
(issue 21 items 4 and 8): the GradScaler across the torch versions pyproject.toml allows, DDP of
a CPU model under the NCCL process group that detectron2's ``launch`` picks on a GPU machine,
and the train loader's pinned batches."""
import pytest
import torch
import torch.distributed as dist

from detectron2.structures import Boxes, Instances

from stageinteractor.d2 import engine
from stageinteractor.d2.data import loader as loader_mod
from stageinteractor.d2.engine import Trainer, make_grad_scaler


# ------------------------------------------------------------------------------ GradScaler
def test_grad_scaler_on_this_torch():
    assert isinstance(make_grad_scaler("cpu"), torch.amp.GradScaler)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Trainer(model, [], opt, device="cpu", amp=True).grad_scaler is None
    assert Trainer(model, [], opt, device="cpu", amp=False, grad_scaler=True).grad_scaler is None
    assert isinstance(Trainer(model, [], opt, device="cpu", amp=True, grad_scaler=True).grad_scaler,
                      torch.amp.GradScaler)


def test_grad_scaler_falls_back_to_torch_cuda_amp_before_torch_2_3(monkeypatch):
    """torch < 2.3 has no ``torch.amp.GradScaler``: the trainer takes ``torch.cuda.amp``'s."""
    made = []

    class OldCudaScaler:
        def __init__(self, *args, **kwargs):
            made.append((args, kwargs))

    monkeypatch.delattr(torch.amp, "GradScaler")
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", OldCudaScaler)
    assert isinstance(make_grad_scaler("cuda"), OldCudaScaler) and made == [((), {})]
    model = torch.nn.Linear(2, 2)
    tr = Trainer(model, [], torch.optim.SGD(model.parameters(), lr=0.1), device="cuda", amp=True)
    assert isinstance(tr.grad_scaler, OldCudaScaler)
    with pytest.raises(RuntimeError, match="torch >= 2.3"):
        make_grad_scaler("cpu")


# ------------------------------------------------------------------------------ DDP backend
@pytest.fixture
def two_processes(monkeypatch):
    """create_ddp_model's view of a 2-process run: DDP and the process-group calls recorded."""
    seen = {"ddp": [], "groups": []}

    class RecordingDDP:
        def __init__(self, module, **kwargs):
            seen["ddp"].append(kwargs)

    monkeypatch.setattr(engine.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.comm, "get_local_rank", lambda: 0)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    monkeypatch.setattr(dist, "new_group",
                        lambda **kwargs: seen["groups"].append(kwargs) or "gloo-group")
    return seen


def test_cpu_model_under_nccl_all_reduces_over_gloo(two_processes, monkeypatch):
    """``--num-gpus N train.device=cpu`` on a GPU machine: detectron2 starts NCCL (CUDA is
    available), which cannot reduce CPU tensors; DDP gets a gloo group instead."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    engine.create_ddp_model(torch.nn.Linear(2, 2))
    assert two_processes["ddp"] == [{"process_group": "gloo-group"}]
    assert two_processes["groups"] == [{"backend": "gloo"}]


def test_cpu_model_under_gloo_and_cuda_model_keep_the_default_group(two_processes, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    engine.create_ddp_model(torch.nn.Linear(2, 2))
    assert two_processes["ddp"] == [{"process_group": None}] and two_processes["groups"] == []


# ------------------------------------------------------------------------------ pinned batches
def _dataset(n=4):
    return [{"file_name": f"{i}.jpg", "height": 8, "width": 10, "image_id": i} for i in range(n)]


def _mapper(d):
    inst = Instances((8, 10))
    inst.gt_boxes = Boxes(torch.tensor([[1.0, 1.0, 4.0, 5.0]]))
    inst.gt_classes = torch.tensor([0])
    return dict(d, image=torch.zeros(3, 8, 10, dtype=torch.uint8), instances=inst)


def test_loader_pins_every_tensor_of_a_batch_when_cuda_is_there(monkeypatch):
    pinned = []

    def fake_pin(self):  # a CPU-only torch cannot pin: record the call, mark the tensor
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(loader_mod.torch.cuda, "is_available", lambda: True)
    ld = loader_mod.ResumableTrainLoader(dataset=_dataset(), mapper=_mapper, total_batch_size=2,
                                         seed=0)
    assert ld.pin_memory
    batch = next(iter(ld))
    tensors = [t for d in batch for t in (d["image"], d["instances"].gt_boxes.tensor,
                                           d["instances"].gt_classes)]
    assert len(pinned) == len(tensors) == 6
    assert all(any(t is p for p in pinned) for t in tensors)
    # without CUDA (or pin_memory=False) nothing is pinned
    monkeypatch.setattr(loader_mod.torch.cuda, "is_available", lambda: False)
    pinned.clear()
    next(iter(loader_mod.ResumableTrainLoader(dataset=_dataset(), mapper=_mapper,
                                              total_batch_size=2, seed=0)))
    assert pinned == []
