"""The whole model on the accelerator, in float32 and with AMP (issue 14, issue 21; ``gpu``
tests, ``accel`` fixture).

On every device, stand-ins included (issue 21): inference of the whole model (pre-processing,
backbone, neck, decoder, top-k, ``Instances``) with every output on the device and no host
read (the stand-in's independent probe and the project's counter); the training step up to the
matcher (the matcher's inputs all on the device, float32), and on ``meta`` the backward of the
decoder's outputs into every parameter that gets a gradient on the CPU. The matcher itself
solves on the host (scipy), where a stand-in has no values: that is where it stops.

Values (real CUDA only; skipped on a stand-in): for the demo config and the R50-100q config (at a small image size): two training steps of
this project's Trainer (the ``tools/train_net.py`` step: forward, losses, backward, clipping,
optimizer, metrics) and one inference, in float32 and with AMP (CUDA: float16 autocast +
GradScaler; the CPU dry run uses the Trainer's CPU AMP, bfloat16). Checks: finite losses,
every output on the model's device with the expected dtype, finite updated weights, and
AMP close to float32 (same weights and inputs): last-stage logits within 0.1 + 5 % (half
precision keeps ~3 significant digits; six stages of sampling compound it), boxes within
2 % of the image size, and the losses within 5 %.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

from stageinteractor.d2.engine import Trainer
from stageinteractor.d2.sync_count import count_inference

pytestmark = pytest.mark.gpu
NAMES = [pytest.param("demo"), pytest.param("r50_100q", marks=pytest.mark.slow)]

REPO = Path(__file__).resolve().parents[2]
MAX_AMP_STEPS = 24  # the GradScaler halves 2^16 at most 22 times before float16's range fits
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


class _AtMatcher(Exception):
    """Raised by the stand-in matcher: the training step got this far on the device."""


def _model_on(accel, bench, name):
    config, (h, w) = CONFIGS[name]
    torch.manual_seed(0)
    model, _ = bench.build_model(config, [], "cpu")
    batch = bench.make_batch(model, 2, h, w)  # the data loader's host tensors
    return copy.deepcopy(model), accel.to(model), batch


def _fake_preprocessed(accel, cpu_model, batch):
    """fake_cuda only: the pre-processing on the CPU, its result on the stand-in.
    detectron2's ``ImageList.from_tensors`` reads the values of a CPU tensor (the padded size),
    which FakeTensorMode cannot provide (its CPU tensors have no values either); ``meta``
    covers the pre-processing on the device."""
    images = cpu_model.preprocess_image(batch)
    sizes = cpu_model._image_sizes_tensor(images)
    return ImageList(accel.to(images.tensor), images.image_sizes), accel.to(sizes)


@pytest.mark.parametrize("name", NAMES)
def test_inference_on_accel_has_device_outputs_and_no_host_read(bench, accel, host_probe, name):
    cpu_model, model, batch = _model_on(accel, bench, name)
    model.eval()
    cpu_model.eval()
    with torch.no_grad():
        if accel.kind == "fake_cuda":
            images, sizes = _fake_preprocessed(accel, cpu_model, batch)
            with accel.run(host_probe):
                det = model.inference_tensors(images.tensor, sizes)
                out = model.postprocess(*det, batch, images.image_sizes)
        else:
            with accel.run(host_probe):
                out = model(batch)
    assert host_probe.total == 0, host_probe.sites
    assert len(out) == 2
    for r in out:
        inst = r["instances"]
        assert inst.pred_boxes.tensor.device.type == accel.device.type
        assert inst.pred_boxes.tensor.dtype == torch.float32
        assert inst.scores.device.type == accel.device.type
        assert inst.pred_classes.dtype == torch.int64
        assert len(inst) == model.max_detections_per_image


@pytest.mark.parametrize("name", NAMES)
def test_training_step_up_to_the_matcher_on_accel(bench, accel, monkeypatch, name):
    cpu_model, model, batch = _model_on(accel, bench, name)
    seen = {}

    def matcher(logits, boxes, gt_boxes, gt_classes, gt_mask, image_sizes):
        seen.update(logits=logits, boxes=boxes, gt_boxes=gt_boxes, gt_classes=gt_classes,
                    gt_mask=gt_mask, image_sizes=image_sizes)
        raise _AtMatcher

    monkeypatch.setattr(model.criterion.matcher, "forward", matcher)
    model.train()
    with EventStorage(0), pytest.raises(_AtMatcher):
        if accel.kind == "fake_cuda":
            images, sizes = _fake_preprocessed(accel, cpu_model, batch)
            with accel.run():
                model.forward_train(batch, images, sizes)
        else:
            with accel.run():
                model(batch)
    dtypes = {"gt_classes": torch.int64, "gt_mask": torch.bool}
    for k, t in seen.items():
        assert t.device.type == accel.device.type, (k, t.device)
        assert t.dtype == dtypes.get(k, torch.float32), (k, t.dtype)
    assert seen["boxes"].shape[:2] == seen["logits"].shape[:2]
    if not accel.backward:
        return  # fake_cuda: no backward without a CUDA context
    # meta: the decoder's outputs back into the model; the CPU's set of parameters with grads
    with accel.run():
        images = model.preprocess_image(batch)
        outs = model.run_decoder(images.tensor, model._image_sizes_tensor(images))
        sum(o["logits"].sum() + o["boxes"].sum() for o in outs).backward()
    cpu_model.train()
    images = cpu_model.preprocess_image(batch)
    outs = cpu_model.run_decoder(images.tensor, cpu_model._image_sizes_tensor(images))
    sum(o["logits"].sum() + o["boxes"].sum() for o in outs).backward()
    want = {n for n, p in cpu_model.named_parameters() if p.grad is not None}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == want and len(got) > 0
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.device.type == accel.device.type and p.grad.shape == p.shape, n


@pytest.mark.parametrize("name", NAMES)
def test_train_step_and_inference_with_and_without_amp(bench, accel, name):
    accel.require_values()
    accel_device = accel.device
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

    # --- trainer steps, float32 (2) then AMP (GradScaler on CUDA) until the scaler has
    # really stepped twice: at its initial scale 2^16 the first steps may overflow and be
    # skipped (each skip halves the scale), so two steps could leave the weights untouched
    for amp_on in (False, True):
        model.load_state_dict(state)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        tr = Trainer(model, iter([batch] * MAX_AMP_STEPS), opt, device=accel_device.type,
                     amp=amp_on, clip_grad={"max_norm": 1.0, "norm_type": 2}, seed=0)
        assert (tr.grad_scaler is not None) == (amp_on and accel_device.type == "cuda")
        stepped = 0
        with EventStorage(0) as storage:
            for _ in range(MAX_AMP_STEPS if tr.grad_scaler is not None else 2):
                scale = tr.grad_scaler.get_scale() if tr.grad_scaler is not None else None
                tr.run_step()
                storage.step()
                skipped = scale is not None and tr.grad_scaler.get_scale() < scale
                stepped += not skipped
                if stepped == 2:
                    break
            latest = {k: v for k, (v, _) in storage.latest().items()}
        assert stepped == 2, f"the GradScaler skipped every step but {stepped} of {MAX_AMP_STEPS}"
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


BUDGETS = {"train_step": {"scalar": 0, "to_cpu": 2, "to_gpu": 0, "data_dep": 0},
           "train_step_amp": {"scalar": 1, "to_cpu": 2, "to_gpu": 0, "data_dep": 0},
           "inference": {"scalar": 0, "to_cpu": 0, "to_gpu": 0, "data_dep": 0}}


@pytest.mark.standins("meta")  # the whole inference on the device (see _fake_preprocessed)
def test_host_syncs_on_accel_within_budget(bench, accel):
    """The host-sync budget (tests/d2/test_host_sync_budget.py) counted on the device, not in
    the counter's CPU dry run. On CUDA: a training step (float32 and AMP) and an inference,
    with PyTorch's own sync-debug count (``torch.cuda.set_sync_debug_mode``) as a cross-check:
    every synchronising CUDA call it reports is one the counter counted. On a stand-in: the
    inference (the training step needs the matcher's host values)."""
    from stageinteractor.d2.sync_count import count_training_step

    _, model, batch = _model_on(accel, bench, "demo")
    res = {}
    with accel.run():
        res["inference"] = count_inference(model, batch, cuda_sync_debug=accel.real)
    if accel.real:
        res["train_step"] = count_training_step(model, batch, cuda_sync_debug=True)
        res["train_step_amp"] = count_training_step(model, batch, amp=True, cuda_sync_debug=True)
    for what, c in res.items():
        assert all(c[k] <= v for k, v in BUDGETS[what].items()), (what, c["sites"])
        assert not c["dry_run"]
        if accel.real:
            assert c["cuda_sync_warnings"] == c["total"], (what, c["cuda_sync_warnings"],
                                                           c["sites"])
