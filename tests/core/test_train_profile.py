"""The training-step profile (stageinteractor.benchmark.train_profile) and TrainStep's phases,
against hand-computed answers on a toy model."""
import contextlib

import torch

from stageinteractor.benchmark.steps import TrainStep
from stageinteractor.benchmark.train_profile import group_self_times, profile_train_step


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))

    def forward(self, batch):
        return {"loss_a": (self.w * batch).sum(), "note": "not a tensor"}


def test_group_self_times_sums_listed_ops_only():
    groups = {"g1": ("a", "b"), "g2": ("c",), "g3": ("zzz",)}
    got = group_self_times({"a": 1.5, "b": 0.25, "c": 2.0, "d": 9.0}, groups)
    assert got == [("g1", 1.75), ("g2", 2.0), ("g3", 0.0)]


def test_train_step_enters_each_phase_in_order_and_steps_like_clipped_adamw():
    model = _Toy()
    step = TrainStep(model, torch.tensor([1.0, 1.0]), "cpu", amp=False, clip=1.0)
    seen = []

    @contextlib.contextmanager
    def phase(name):
        seen.append(name)
        yield

    step.phase = phase
    step()
    assert seen == ["forward + losses", "backward", "clipping", "optimizer step"]
    # gradient (1, 1), norm sqrt(2) clipped to 1 -> (1/sqrt2, 1/sqrt2); AdamW's first step moves
    # each weight by lr * sign(grad) (m/sqrt(v) = 1) after decay w * (1 - lr * wd)
    lr, wd = 1e-6, 1e-4
    want = torch.tensor([3.0, -4.0]) * (1 - lr * wd) - lr
    assert torch.allclose(model.w.detach(), want, rtol=0, atol=1e-9)


def test_profile_reports_phases_groups_and_restores_the_step():
    step = TrainStep(_Toy(), torch.tensor([1.0, 2.0]), "cpu", amp=False, clip=1.0)
    res = profile_train_step(step, rows=5)
    assert [n for n, _ in res["phases"]] == list(TrainStep.PHASES)
    assert all(s >= 0 for _, s in res["phases"]) and res["plain_s"] > 0
    assert len(res["top"]) <= 5 and not any(op.startswith("PHASE") for op, _, _ in res["top"])
    assert isinstance(step.phase("x"), contextlib.nullcontext)  # profiler hook removed
    step()  # still runs
