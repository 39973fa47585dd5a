"""HostSyncCounter (issue 14): each hand-made sync is counted exactly once, in its category.

Run on the CPU, so the counter is in its dry-run mode: tensors made before the counter starts
(``x`` below: "parameters") are device tensors; tensors made inside it without a device, from
numpy, or marked with ``mark_host`` are host tensors.
"""

import numpy as np
import pytest
import torch

from stageinteractor.core.op_count import SYNC_CATEGORIES, HostSyncCounter


def count(fn, *host):
    counter = HostSyncCounter("cpu")
    counter.mark_host(*host)
    with counter:
        fn()
    s = counter.summary()
    return {k: s[k] for k in SYNC_CATEGORIES + ("to_gpu_async", "device_mismatch")}


def only(**kw):
    out = dict.fromkeys(SYNC_CATEGORIES + ("to_gpu_async", "device_mismatch"), 0)
    out.update(kw)
    return out


X = torch.arange(1.0, 4.0)  # a "device" tensor: made before counting


@pytest.mark.parametrize(
    "name, fn, expected",
    [
        ("item", lambda: X.sum().item(), only(scalar=1)),
        ("bool", lambda: bool(X.any()), only(scalar=1)),
        ("if", lambda: 1 if X.sum() > 0 else 0, only(scalar=1)),
        ("float+int", lambda: (float(X.sum()), int(X.max())), only(scalar=2)),
        ("fstring", lambda: f"{X.sum():.1f}", only(scalar=1)),
        ("tolist", lambda: X.tolist(), only(to_cpu=1)),
        ("cpu", lambda: X.cpu(), only(to_cpu=1)),
        # the .cpu() result is on the host: reading it is free
        ("cpu().tolist()", lambda: X.cpu().tolist(), only(to_cpu=1)),
        ("cpu().numpy()[0]", lambda: X.cpu().numpy()[0], only(to_cpu=1)),
        ("cpu() then item", lambda: X.sum().cpu().item(), only(to_cpu=1)),
        ("host tolist", lambda: torch.zeros(3).tolist(), only()),
        ("host item", lambda: torch.arange(3).sum().item(), only()),
        ("host bool index", lambda: torch.arange(3)[torch.arange(3) > 0], only()),
        ("to own device", lambda: X.to(X.device), only()),
        ("dtype only", lambda: X.to(torch.float64), only()),
        ("host to device", lambda: torch.zeros(2).to(X.device), only(to_gpu=1)),
        ("non_blocking", lambda: torch.zeros(2).to(X.device, non_blocking=True),
         only(to_gpu_async=1)),
        ("tensor(device=)", lambda: torch.tensor([1.0, 2.0], device=X.device), only(to_gpu=1)),
        ("new_tensor", lambda: X.new_tensor([1.0, 2.0]), only(to_gpu=1)),
        ("as_tensor(list)", lambda: torch.as_tensor([1.0]), only()),
        ("from_numpy", lambda: torch.from_numpy(np.zeros(2)).to(X.device), only(to_gpu=1)),
        ("setitem host", lambda: X.clone().__setitem__(slice(0, 2), torch.zeros(2)),
         only(to_gpu=1)),
        ("copy_ host", lambda: X.clone().copy_(torch.zeros(3), non_blocking=True),
         only(to_gpu_async=1)),
        ("nonzero", lambda: torch.nonzero(X > 1), only(data_dep=1)),
        ("bool index", lambda: X[X > 1], only(data_dep=1)),
        ("masked_select", lambda: X.masked_select(X > 1), only(data_dep=1)),
        ("unique", lambda: torch.unique(X), only(data_dep=1)),
        ("repeat_interleave", lambda: X.repeat_interleave(X.long()), only(data_dep=1)),
        ("mismatch", lambda: X + torch.zeros(3), only(device_mismatch=1)),
        ("0-dim host is a scalar", lambda: X * torch.tensor(2.0), only()),
        ("backward", lambda: (X.clone().requires_grad_() * 2).sum().backward(), only()),
    ],
)
def test_counts_each_hand_made_sync(name, fn, expected):
    assert count(fn) == expected, name


def test_marked_inputs_are_host_and_copies_counted_per_call():
    batch = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "boxes": torch.zeros(2, 4)}
             for _ in range(2)]

    def step():
        for x in batch:  # 2 images + 2 box tensors, each its own blocking copy
            x["image"].to(X.device, torch.float32)
            x["boxes"].to(X.device)
        # the inputs themselves stay host tensors: a second copy counts again
        batch[0]["boxes"].to(X.device, non_blocking=True)

    assert count(step, batch) == only(to_gpu=4, to_gpu_async=1)


def test_total_sites_and_budget():
    counter = HostSyncCounter("cpu")
    with counter:
        X.sum().item()
        X.tolist()
        X[X > 1]
        torch.zeros(1).to(X.device, non_blocking=True)
    s = counter.summary()
    assert s["total"] == 3  # the non-blocking copy is not a sync
    assert s["dry_run"] is True
    line = "test_host_sync_counter.py"
    assert sorted(k.split(" ")[0] for k in s["sites"]) == [
        "data_dep", "scalar", "to_cpu", "to_gpu_async"]
    assert all(line in k for k in s["sites"]), s["sites"]
    assert counter.over_budget({"scalar": 1, "to_cpu": 1, "data_dep": 1}) == []
    over = counter.over_budget({"scalar": 0})
    assert len(over) == 1 and over[0].startswith("scalar: 1 > 0")


def _mode_stacks():
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack()), list(_get_current_function_mode_stack())


def _pop_leaked(before):
    """Undo a leak (so that one failing test does not count syncs in every later test)."""
    from torch.overrides import _pop_mode as pop_function_mode
    from torch.utils._python_dispatch import _pop_mode as pop_dispatch_mode

    while len(_mode_stacks()[0]) > len(before[0]):
        pop_dispatch_mode()
    while len(_mode_stacks()[1]) > len(before[1]):
        pop_function_mode()


def test_counter_restores_from_numpy_and_modes():
    orig = torch.from_numpy
    before = _mode_stacks()
    try:
        counter = HostSyncCounter("cpu")
        with counter:
            X.sum().item()  # counted: the counter was entered and used
            torch.from_numpy(np.zeros(1))
        assert counter.summary()["scalar"] == 1 and counter.total == 1
        assert torch.from_numpy is orig
        # no mode left behind, checked on the counter that was used: later syncs (a scalar read
        # through the dispatch mode, a copy and a host->device copy through the function mode)
        # are counted by nobody
        X.sum().item()
        X.tolist()
        torch.zeros(2).to(X.device)
        assert counter.total == 1 and counter.summary()["to_gpu_async"] == 0, counter.summary()
        assert dict(counter.counts) == {"scalar": 1}, dict(counter.counts)
        assert _mode_stacks() == before
        # a second use of the same counter adds to its counts, and leaves nothing behind either
        with counter:
            X.tolist()
        X.sum().item()
        assert dict(counter.counts) == {"scalar": 1, "to_cpu": 1}
        assert _mode_stacks() == before
        # leaving through an exception pops the modes too
        with pytest.raises(RuntimeError, match="boom"):
            with counter:
                raise RuntimeError("boom")
        assert _mode_stacks() == before and torch.from_numpy is orig
    finally:
        _pop_leaked(before)
        torch.from_numpy = orig
