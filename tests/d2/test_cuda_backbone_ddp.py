"""Backbones and neck on the accelerator, and two NCCL processes (issue 14, issue 21; ``gpu``
tests, ``accel`` fixture).

* On every device, stand-ins included: R50, X101-DCN (torchvision's ``deform_conv2d``, which
  has separate CPU and CUDA kernels) and Swin-S with the ChannelMapping neck: every map on the
  device with the shape, stride and dtype of ``output_shape()``; on ``meta`` also the backward
  into the input and every trainable parameter (the deformable convolutions' offsets included).
  Built on the CPU and moved (Swin's initialisation reads CPU tensor values, which the stand-ins
  do not have).
* Values (real CUDA only; skipped on a stand-in, never compared with itself): the X101-DCN
  forward (random weights, non-zero offsets: the offset convolutions are perturbed away from
  their zero init) in float32 on the accelerator against a **float64** CPU run: every output map
  within 1e-3 of its own scale (max |x|) over 101 layers, TF32 off.
* ``tools/train_net.py --num-gpus 2`` on the demo config with ``train.device=cuda``: two NCCL
  processes train 4 iterations and end with identical parameters (the tool checks and logs it;
  a DDP "unused parameters" error would fail the run). Needs two GPUs; no stand-in runs NCCL.
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stageinteractor.d2.backbone import build_resnext101_32x4d_dcn
from stageinteractor.d2.backbone.resnet import build_resnet50
from stageinteractor.d2.backbone.swin import build_swin_small
from stageinteractor.d2.neck import ChannelMapping

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
BACKBONES = {"r50": build_resnet50, "x101_dcn": build_resnext101_32x4d_dcn,
             "swin_s": build_swin_small}
NAMES = [pytest.param("r50"), pytest.param("x101_dcn", marks=pytest.mark.slow),
         pytest.param("swin_s", marks=pytest.mark.slow)]


def _x101_dcn():
    torch.manual_seed(0)
    model = build_resnext101_32x4d_dcn().eval()
    with torch.no_grad():
        n_offset = 0
        for name, p in model.named_parameters():
            if "offset" in name:  # zero-initialised: make the offsets matter
                p.add_(torch.randn_like(p) * 0.01)
                n_offset += 1
    assert n_offset > 0
    return model


@pytest.mark.parametrize("name", NAMES)
def test_backbone_and_neck_on_accel(accel, name):
    torch.manual_seed(0)
    backbone = _x101_dcn() if name == "x101_dcn" else BACKBONES[name]()
    spec = backbone.output_shape()
    neck = ChannelMapping(spec)
    backbone, neck = accel.to(backbone), accel.to(neck)
    x = accel.to(torch.randn(1, 3, 64, 96)).requires_grad_(accel.backward)
    with accel.run(), torch.set_grad_enabled(accel.backward):
        feats = backbone(x)
        maps = list(neck(feats))
    assert set(feats) == set(spec)
    for k, s in spec.items():
        want = (1, s.channels, math.ceil(64 / s.stride), math.ceil(96 / s.stride))
        assert feats[k].device.type == accel.device.type and feats[k].dtype == torch.float32, k
        assert tuple(feats[k].shape) == want, (k, tuple(feats[k].shape), want)
    assert len(maps) == 4
    for m, s in zip(maps, neck.output_shape()):
        assert m.device.type == accel.device.type and m.shape[1] == s.channels == 256
    if not accel.backward:
        return
    with accel.run():
        sum(m.sum() for m in maps).backward()
    assert x.grad is not None and x.grad.device.type == accel.device.type
    trainable = [(n, p) for n, p in list(backbone.named_parameters()) + list(
        neck.named_parameters()) if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    assert all(p.grad.device.type == accel.device.type and p.grad.shape == p.shape
               for _, p in trainable)
    if name == "x101_dcn":
        assert any("offset" in n for n, _ in trainable)


@pytest.mark.slow  # building X101-DCN and its float64 CPU forward take a while on a small CPU
def test_x101_dcn_backbone_accel_equals_cpu_float64(accel):
    accel.require_values()
    model = _x101_dcn()
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = accel.to(model)(accel.to(x))
    assert ref.keys() == out.keys()
    for k in ref:
        assert out[k].device.type == accel.device.type and out[k].dtype == torch.float32
        scale = ref[k].abs().max().clamp(min=1e-6)
        err = (out[k].double().cpu() - ref[k]).abs().max()
        assert err <= 1e-3 * scale, (k, float(err), float(scale))


@pytest.mark.slow
def test_two_nccl_processes_end_with_equal_parameters(tmp_path, real_cuda):
    if not real_cuda:
        pytest.skip("two NCCL processes need two CUDA devices, no stand-in runs NCCL: "
                    "no CUDA device")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "tools/train_net.py", "--config-file",
           "configs/demo/stageinteractor_demo.py", "--num-gpus", "2", "--dist-url", "auto",
           "train.device=cuda", "train.max_iter=4", "train.eval_period=0",
           "train.checkpointer.period=4", "dataloader.train.total_batch_size=4",
           f"train.output_dir={tmp_path / 'out'}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "World size: 2" in log
    assert "parameters identical on all 2 processes" in log
