"""X101-DCN's deformable-convolution backbone on the accelerator, and two NCCL processes
(issue 14, ``gpu`` tests).

* ``deform_conv2d`` (torchvision) has separate CPU and CUDA kernels: the X101-DCN backbone's
  forward (random weights, non-zero offsets: the offset convolutions are perturbed away from
  their zero init) on the accelerator equals the CPU's to float32 round-off over 101 layers:
  every output map within 1e-3 of its own scale (max |x|), TF32 off.
* ``tools/train_net.py --num-gpus 2`` on the demo config with ``train.device=cuda``: two NCCL
  processes train 4 iterations and end with identical parameters (the tool checks and logs it;
  a DDP "unused parameters" error would fail the run). Needs two GPUs; skipped otherwise.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stageinteractor.d2.backbone import build_resnext101_32x4d_dcn

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # building X101-DCN and its CPU forward take a while on a small CPU
def test_x101_dcn_backbone_accel_equals_cpu(accel_device):
    torch.manual_seed(0)
    model = build_resnext101_32x4d_dcn().eval()
    with torch.no_grad():
        n_offset = 0
        for name, p in model.named_parameters():
            if "offset" in name:  # zero-initialised: make the offsets matter
                p.add_(torch.randn_like(p) * 0.01)
                n_offset += 1
    assert n_offset > 0
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        out = model.to(accel_device)(x.to(accel_device))
    assert ref.keys() == out.keys()
    for k in ref:
        assert out[k].device.type == accel_device.type
        scale = ref[k].abs().max().clamp(min=1e-6)
        err = (out[k].cpu() - ref[k]).abs().max()
        assert err <= 1e-3 * scale, (k, float(err), float(scale))


@pytest.mark.slow
def test_two_nccl_processes_end_with_equal_parameters(tmp_path, real_cuda):
    if not real_cuda or torch.cuda.device_count() < 2:
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
