"""The whole model on the accelerator, in float32 and with AMP (issue 14, ``gpu`` tests).

For the demo config and the R50-100q config (at a small image size): two training steps of
this project's Trainer (the ``tools/train_net.py`` step: forward, losses, backward, clipping,
optimizer, metrics) and one inference, in float32 and with AMP (CUDA: float16 autocast +
GradScaler; the CPU dry run uses the Trainer's CPU AMP, bfloat16). Checks: finite losses,
every output on the model's device with the expected dtype, finite updated weights, and
AMP close to float32 (same weights and inputs): last-stage logits within 0.1 + 5 % (half
precision keeps ~3 significant digits; six stages of sampling compound it), boxes within
2 % of the image size, and the losses within 5 %.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from detectron2.utils.events import EventStorage

from stageinteractor.d2.engine import Trainer

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "demo": (str(REPO / "configs/demo/stageinteractor_demo.py"), (128, 160)),
    "r50_100q": (str(REPO / "configs/stageinteractor/stageinteractor_r50_100q_1x.py"),
                 (256, 320)),
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", REPO / "tools/benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _amp_ctx(device):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@pytest.mark.parametrize(
    "name", [pytest.param("demo"), pytest.param("r50_100q", marks=pytest.mark.slow)]
)
def test_train_step_and_inference_with_and_without_amp(bench, accel_device, name):
    config, (h, w) = CONFIGS[name]
    torch.manual_seed(0)
    model, _ = bench.build_model(config, [], str(accel_device))
    batch = bench.make_batch(model, 2, h, w)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # --- float32 vs AMP forward, same weights: decoder outputs and losses
    model.train()
    images = model.preprocess_image(batch)
    sizes = model._image_sizes_tensor(images)
    with torch.no_grad():
        ref = model.run_decoder(images.tensor, sizes)[-1]
        with _amp_ctx(accel_device):
            amp = model.run_decoder(images.tensor, sizes)[-1]
    for k in ("logits", "boxes"):
        assert amp[k].device.type == accel_device.type
        assert torch.isfinite(amp[k].float()).all(), k
    torch.testing.assert_close(amp["logits"].float(), ref["logits"], atol=0.1, rtol=0.05)
    torch.testing.assert_close(amp["boxes"].float(), ref["boxes"], atol=0.02 * max(h, w),
                               rtol=0)
    with EventStorage(0):
        torch.manual_seed(0)
        loss_ref = {k: float(v.detach()) for k, v in model(batch).items()}
        torch.manual_seed(0)
        with _amp_ctx(accel_device):
            loss_amp = model(batch)
    for k, v in loss_amp.items():
        assert v.dtype == torch.float32 and v.device.type == accel_device.type, k
        assert float(v.detach()) == pytest.approx(loss_ref[k], rel=0.05, abs=1e-3), k

    # --- two trainer steps each, float32 then AMP (GradScaler on CUDA)
    for amp_on in (False, True):
        model.load_state_dict(state)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        tr = Trainer(model, [batch] * 2, opt, device=accel_device.type, amp=amp_on,
                     clip_grad={"max_norm": 1.0, "norm_type": 2}, seed=0)
        assert (tr.grad_scaler is not None) == (amp_on and accel_device.type == "cuda")
        with EventStorage(0) as storage:
            for _ in range(2):
                tr.run_step()
                storage.step()
            latest = {k: v for k, (v, _) in storage.latest().items()}
        assert all(torch.isfinite(torch.tensor(latest[k])) for k in latest if "loss" in k)
        assert all(torch.isfinite(p).all() for p in params)
        moved = sum(float((p.detach() - state[n]).abs().sum())
                    for n, p in model.named_parameters() if p.requires_grad)
        assert moved > 0

    # --- inference: Instances on the model's device, in original-image pixels
    model.eval()
    with torch.no_grad():
        for amp_on in (False, True):
            ctx = _amp_ctx(accel_device) if amp_on else torch.autocast(accel_device.type,
                                                                       enabled=False)
            with ctx:
                out = model(batch)
            assert len(out) == 2
            for r in out:
                inst = r["instances"]
                assert inst.pred_boxes.tensor.device.type == accel_device.type
                assert torch.isfinite(inst.scores.float()).all()
                assert len(inst) == model.max_detections_per_image


def test_host_syncs_on_accel_within_budget(bench, accel_device):
    """The host-sync budget (tests/d2/test_host_sync_budget.py) on the real device, and
    PyTorch's own sync-debug count (``torch.cuda.set_sync_debug_mode``) as a cross-check:
    every synchronising CUDA call it reports is one the counter counted."""
    from stageinteractor.d2.sync_count import count_host_syncs

    config, (h, w) = CONFIGS["demo"]
    torch.manual_seed(0)
    model, _ = bench.build_model(config, [], str(accel_device))
    res = count_host_syncs(model, bench.make_batch(model, 2, h, w), cuda_sync_debug=True)
    budgets = {"train_step": {"scalar": 0, "to_cpu": 3, "to_gpu": 0, "data_dep": 0},
               "inference": {"scalar": 0, "to_cpu": 1, "to_gpu": 0, "data_dep": 0}}
    for what, budget in budgets.items():
        c = res[what]
        assert all(c[k] <= v for k, v in budget.items()), (what, c["sites"])
        assert c["dry_run"] == (accel_device.type == "cpu")
        if accel_device.type == "cuda":
            assert c["cuda_sync_warnings"] == c["total"], (what, c["cuda_sync_warnings"],
                                                           c["sites"])
