"""Host-sync budget of a training step and an inference (issue 14).

Counted with ``stageinteractor.d2.sync_count`` (the CPU dry run of
``stageinteractor.core.op_count.HostSyncCounter``): deterministic, so the numbers are held as a
budget, as with the operator count. The syncs that are left are the ones the code needs:

* training: ``to_cpu`` 2 = the matcher (all stages' and images' costs in one copy: scipy solves
  on the host) and the trainer's metrics (losses, diagnostics and gradient norm in one copy);
  with AMP the GradScaler adds one ``scalar`` (its found-inf read in ``step``);
* inference: none. The decoder's input check is a device-side assert (issue 21; it was one
  ``to_cpu`` in training and in inference).

Host->device copies are all ``non_blocking`` (``to_gpu`` 0): images (one per image), the
packed targets (one), image sizes, matches, the decoder's padded size and the sampler's grid
scales, the CSLA stage tables, the output rescaling factors. Before issue 14: demo training step
36 (6 scalar, 16 to-CPU, 12 to-GPU, 2 data-dependent), inference 8 (1 to-CPU, 7 to-GPU);
R50-100q 42 / 8.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from detectron2.utils.events import EventStorage

from stageinteractor.d2.engine import Trainer
from stageinteractor.d2.sync_count import count_host_syncs, count_inference, count_training_step

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo/stageinteractor_demo.py")
R50 = str(REPO / "configs/stageinteractor/stageinteractor_r50_100q_1x.py")

TRAIN_BUDGET = {"scalar": 0, "to_cpu": 2, "to_gpu": 0, "data_dep": 0, "device_mismatch": 0}
INFERENCE_BUDGET = {"scalar": 0, "to_cpu": 0, "to_gpu": 0, "data_dep": 0, "device_mismatch": 0}
TRAIN_SITES = {"stageinteractor/core/matcher.py", "stageinteractor/d2/engine.py"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_sync", REPO / "tools/benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check(summary, budget):
    over = {k: summary[k] for k, v in budget.items() if summary[k] > v}
    assert not over, f"over budget {over}; sites: {summary['sites']}"


def _files(summary, category):
    return {s.split(" ")[1].rsplit(":", 1)[0] for s in summary["sites"] if s.startswith(category)}


def _counts(bench, config, opts=(), batch=2, size=(128, 160)):
    torch.manual_seed(0)
    model, _ = bench.build_model(config, list(opts), "cpu")
    return count_host_syncs(model, bench.make_batch(model, batch, *size))


def test_demo_config_within_budget(bench):
    res = _counts(bench, DEMO)
    tr, inf = res["train_step"], res["inference"]
    _check(tr, TRAIN_BUDGET)
    _check(inf, INFERENCE_BUDGET)
    assert tr["total"] == 2 and inf["total"] == 0  # tighten the budget if this goes down
    assert _files(tr, "to_cpu") == TRAIN_SITES
    assert _files(inf, "to_cpu") == set()
    # the copies that remain are asynchronous: 2 images + targets + sizes + matches + pad +
    # grid scales + CSLA tables (training); 2 images + sizes + pad + grid scales + 2 rescales
    assert tr["to_gpu_async"] == 8 and inf["to_gpu_async"] == 7
    assert tr["dry_run"] and inf["dry_run"]


def test_budget_does_not_grow_with_batch_or_csla_off(bench):
    """The count is per step, not per image: batch 3 and CSLA off give the same syncs."""
    res = _counts(bench, DEMO, ["model.criterion.assigner.enabled=False"], batch=3,
                  size=(96, 128))
    _check(res["train_step"], TRAIN_BUDGET)
    _check(res["inference"], INFERENCE_BUDGET)
    assert res["train_step"]["total"] == 2 and res["inference"]["total"] == 0


@pytest.mark.slow
def test_amp_step_counts_the_grad_scaler_read(bench):
    """With AMP the trainer's GradScaler reads its found-inf flag on the host once per step
    (``GradScaler.step``); the dry run takes the GradScaler's path too, so it is counted."""
    torch.manual_seed(0)
    model, _ = bench.build_model(DEMO, [], "cpu")
    tr = count_training_step(model, bench.make_batch(model, 2, 128, 160), amp=True)
    _check(tr, dict(TRAIN_BUDGET, scalar=1))
    assert tr["scalar"] == 1 and tr["to_cpu"] == 2
    assert _files(tr, "scalar") == {"stageinteractor/d2/engine.py"}


def test_r50_100q_within_budget(bench):
    res = _counts(bench, R50, batch=2, size=(128, 160))
    _check(res["train_step"], TRAIN_BUDGET)
    _check(res["inference"], INFERENCE_BUDGET)
    assert res["train_step"]["total"] == 2 and res["inference"]["total"] == 0


def test_trainer_logs_losses_stats_and_grad_norm_from_one_copy(bench):
    """The trainer's single copy writes the same numbers as reading them one by one."""
    torch.manual_seed(0)
    model, _ = bench.build_model(DEMO, ["model.decoder.num_queries=10",
                                        "model.max_detections_per_image=10"], "cpu")
    batch = bench.make_batch(model, 2, 96, 128)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    tr = Trainer(model, [batch] * 2, opt, clip_grad={"max_norm": 1.0, "norm_type": 2}, seed=0)
    with EventStorage(0) as storage:
        tr.run_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    stats = model.criterion.last_stats
    # lr 0: the weights did not move, so a forward gives the logged losses again
    model.train()
    torch.manual_seed(0)
    with EventStorage(1):
        losses = model(batch)
    for k, v in losses.items():
        assert latest[k] == pytest.approx(float(v.detach()), rel=1e-6), k
    assert latest["total_loss"] == pytest.approx(sum(float(v.detach()) for v in losses.values()),
                                                 rel=1e-6)
    for k in stats:
        assert latest["diag/" + k] == pytest.approx(stats[k], abs=1e-6), k
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert latest["grad_norm"] > 0
    assert len(grads) > 0


def test_lazy_stats_read_once(bench):
    """Diagnostics are device tensors until read; the first read is the only copy."""
    torch.manual_seed(0)
    model, _ = bench.build_model(DEMO, [], "cpu")
    batch = bench.make_batch(model, 2, 96, 128)
    model.train()
    model(batch)
    from stageinteractor.core.op_count import HostSyncCounter

    counter = HostSyncCounter("cpu")
    with counter:
        stats = model.criterion.last_stats
        names = list(stats)  # keys: free
        first = stats[names[0]]
        rest = [stats[n] for n in names]
    assert counter.summary()["to_cpu"] == 1 and counter.total == 1
    assert rest[0] == first and all(isinstance(v, float) for v in rest)
    assert stats["num_pos_s0"] == 16.0  # 8 boxes per image, 2 images, all matched (N >= G)


def test_inference_and_training_helpers_restore_mode(bench):
    model, _ = bench.build_model(DEMO, [], "cpu")
    batch = bench.make_batch(model, 1, 96, 128)
    model.eval()
    count_training_step(model, batch)
    assert not model.training
    model.train()
    count_inference(model, batch)
    assert model.training
