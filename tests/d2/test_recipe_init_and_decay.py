"""The training recipe's last differences with the authors' (issue 23.3a-b).

* Every config's ``train.init_checkpoint`` names a file that is published (a table of known
  published URLs, each with the format our checkpointer converts it from) or is empty
  (random init); the format is one that ``stageinteractor.d2.checkpoint`` accepts, and an
  ImageNet state dict of that format maps onto the config's backbone exactly.
* R101 starts from torchvision's resnet101: a local torchvision-format file (random weights,
  saved the way torchvision publishes them) through ``tools/train_net.py``, one iteration, the
  frozen stem / res2 of the trained model equal the file's tensors.
* Swin-S: weight decay 0 exactly for the parameters whose name *in the authors' model*
  contains ``absolute_pos_embed``, ``relative_position_bias_table`` or ``norm`` (mmcv
  ``custom_keys``), so our ``cls_norm`` / ``reg_norm`` (the authors' ``cls_fcs.1`` /
  ``reg_fcs.1``) are decayed.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from stageinteractor.d2.checkpoint import (  # noqa: E402
    IMAGENET_FORMATS,
    detect_imagenet_format,
    map_imagenet_backbone_state_dict,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py")
                 if "common" not in p.relative_to(REPO / "configs").parts
                 and p.name != "__init__.py")

# Files known to be published, with the layout their state dict has (checked by hand against
# the publishers' pages: detectron2 MODEL_ZOO.md "ImageNet Pretrained Models", torchvision's
# ResNet*_Weights.IMAGENET1K_V1, mmcv's open-mmlab model list, the Swin v1.0.0 release).
# detectron2's ImageNetPretrained/torchvision/ folder holds R-50.pkl only; its MSRA/R-101.pkl
# is a caffe (stride-in-1x1) model, which our checkpointer refuses.
PUBLISHED = {
    "detectron2://ImageNetPretrained/torchvision/R-50.pkl": "d2",
    "https://download.pytorch.org/models/resnet50-0676ba61.pth": "torchvision",
    "https://download.pytorch.org/models/resnet101-63fe2227.pth": "torchvision",
    "https://download.openmmlab.com/pretrain/third_party/"
    "resnext101_32x4d-a5af3160.pth": "torchvision",
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
    "swin_small_patch4_window7_224.pth": "swin",
}


def _cfg(path, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(str(REPO / path)), list(overrides))


def test_published_table_formats_are_accepted_by_the_checkpointer():
    assert set(PUBLISHED.values()) <= set(IMAGENET_FORMATS)


@pytest.mark.parametrize("path", CONFIGS)
def test_init_checkpoint_is_published_or_empty(path):
    ckpt = _cfg(path).train.init_checkpoint
    assert ckpt == "" or ckpt in PUBLISHED, f"{path}: {ckpt!r} is not a known published file"


def _resnet_tv_state_dict(depth):
    """A torchvision ResNet state dict (random weights) in torchvision's published layout."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    return net.state_dict()


@pytest.mark.parametrize("path", [p for p in CONFIGS if "_r50_" in p or "_r101_" in p])
def test_torchvision_resnet_maps_onto_config_backbone(path):
    """The ResNet configs' files: a torchvision state dict of that depth (the R-50.pkl of
    detectron2 is torchvision's resnet50 under our names) maps onto every backbone key."""
    depth = 101 if "_r101_" in path else 50
    sd = _resnet_tv_state_dict(depth)
    assert detect_imagenet_format(sd) == "torchvision"
    mapped, report = map_imagenet_backbone_state_dict(sd)
    backbone = instantiate(_cfg(path).model.backbone)
    ours = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    want = {k for k in ours if not k.endswith("num_batches_tracked")}
    assert set(mapped) == want
    assert all(mapped[k].shape == ours[k].shape for k in want)


@pytest.mark.slow
def test_r101_trains_from_a_local_torchvision_resnet101(tmp_path):
    """tools/train_net.py with the R101 config, its init_checkpoint replaced by a local
    torchvision-format resnet101 file, on the demo data at a tiny size, one iteration."""
    src = tmp_path / "resnet101-local.pth"
    sd = _resnet_tv_state_dict(101)
    torch.save(sd, src)
    out = tmp_path / "out"
    args = [
        "--config-file", "configs/stageinteractor/stageinteractor_r101_300q_crop_mstrain_3x.py",
        f"train.init_checkpoint={src}", f"train.output_dir={out}", "train.max_iter=1",
        "train.device=cpu", "train.eval_period=0", "train.checkpointer.period=100",
        "dataloader.train.dataset.names=stageinteractor_demo_train",
        "dataloader.test.dataset.names=stageinteractor_demo_val",
        "dataloader.train.mapper.augmentations.policy=1x",
        "dataloader.train.mapper.augmentations.short_edge=64",
        "dataloader.train.mapper.augmentations.max_size=96",
        "dataloader.train.total_batch_size=1", "dataloader.train.num_workers=0",
        "model.decoder.num_queries=10", "model.decoder.query_dim=64", "model.decoder.num_heads=4",
        "model.decoder.ffn_dim=256", "model.neck.out_channels=64", "model.neck.num_groups=16",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "tools/train_net.py", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "ImageNet checkpoint format 'torchvision'" in log, log[-3000:]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    # freeze_at=2: stem and res2 do not train, and the BatchNorm statistics of every stage are
    # frozen, so they still hold the file's values
    mapped, _ = map_imagenet_backbone_state_dict(sd)
    frozen = [k for k in mapped if k.startswith(("backbone.stem.", "backbone.res2."))
              or k.endswith(("running_mean", "running_var"))]
    assert any(k.startswith("backbone.res5.") for k in frozen)
    for k in frozen:
        assert torch.equal(final[k], mapped[k]), k
    assert torch.equal(final["backbone.stem.conv1.weight"], sd["conv1.weight"])
    assert torch.equal(final["backbone.res5.2.conv3.norm.running_var"],
                       sd["layer4.2.bn3.running_var"])


# ------------------------------------------------------------------------------ Swin-S decay

def _mmcv_no_decay(official_name):
    """The authors' paramwise_cfg (custom_keys, substring match, decay_mult 0)."""
    keys = ("absolute_pos_embed", "relative_position_bias_table", "norm")
    return any(k in official_name for k in keys)


def test_swin_s_weight_decay_follows_the_authors_names():
    from stageinteractor.official.checkpoint import key_maps
    from stageinteractor.official.layout import FusedMap

    cfg = _cfg("configs/stageinteractor/stageinteractor_swin_s_300q_crop_mstrain_3x.py")
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay_of = {by_id[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert set(decay_of) == {n for n, p in model.named_parameters() if p.requires_grad}

    # the authors' name of each of our parameters, from the checkpoint converter's key maps
    official = {}
    for m in key_maps("swin_s", num_queries=model.decoder.num_queries):
        if isinstance(m, FusedMap):
            official[m.ours] = "+".join(m.officials)
        elif m.ours is not None:
            official[m.ours] = m.official
    for name, wd in decay_of.items():
        want = 0.0 if _mmcv_no_decay(official[name]) else 1e-4
        assert wd == want, f"{name} (theirs {official[name]}): weight decay {wd}, authors {want}"

    # by hand, one stage of the decoder: which LayerNorms are decayed
    pre = "decoder.stages.3."
    st = {n[len(pre):]: wd for n, wd in decay_of.items() if n.startswith(pre)}
    for ln in ("attention_norm", "ffn_norm", "mixing.out_norm"):
        assert st[f"{ln}.weight"] == 0.0 and st[f"{ln}.bias"] == 0.0, ln
    for ln in ("cls_norm", "reg_norm"):
        assert st[f"{ln}.weight"] == 1e-4 and st[f"{ln}.bias"] == 1e-4, ln
    assert st["attention.iof_tau"] == 1e-4
    assert decay_of["neck.gn_out.weight"] == 1e-4
    assert decay_of["backbone.layers.0.blocks.0.norm1.weight"] == 0.0
    assert decay_of["backbone.layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0


# ------------------------------------------------------------------------------ R50 optimiser

def test_r50_optimizer_step_settings_are_the_authors_recorded_ones():
    """The settings of the step the gradient fixture recorded from the authors' optimizer and
    hooks (tests/fixtures/official_gradient_parity, meta/optimizer_json) are what the R50
    config builds: AdamW, lr at iteration 0 of the warm-up, betas, eps, weight decay on every
    parameter, global L2 clipping at 1.0, 500 warm-up iterations."""
    import json

    from stageinteractor.official.gradient_fixture import find_gradient_fixture

    directory = find_gradient_fixture()
    if directory is None:
        pytest.skip("official gradient fixture not found")
    expected = torch.load(directory / "expected.pt", weights_only=True)
    meta = json.loads(str(expected["meta/optimizer_json"]))
    cfg = _cfg("configs/stageinteractor/stageinteractor_r50_100q_1x.py")
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    sched = instantiate(cfg.lr_multiplier)
    assert type(opt).__name__ == meta["type"] == "AdamW"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for g in opt.param_groups:
        assert g["weight_decay"] == meta["weight_decay"] and list(g["betas"]) == meta["betas"]
        assert g["eps"] == meta["eps"] and g["amsgrad"] == meta["amsgrad"]
        assert g["lr"] == meta["base_lr"]
        assert abs(g["lr"] * sched(0.0) - meta["lr"]) <= 1e-12 * meta["lr"]
    w = meta["warmup_iters"] / cfg.train.max_iter
    assert meta["warmup"] == "linear" and sched(w) == 1.0 and sched(w * (1 - 1e-3)) < 1.0
    clip = cfg.train.clip_grad
    assert clip.enabled and clip.params.max_norm == meta["max_norm"]
    assert clip.params.norm_type == meta["norm_type"]


def _adamw_by_hand(p0, grads, lr, betas, eps, wd):
    """AdamW (decoupled weight decay, bias-corrected moments) written out in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("fused", ["auto", False])
def test_build_adamw_steps_equal_the_adamw_formula(fused):
    from stageinteractor.d2.engine import build_adamw, fused_adamw_supported

    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 50, generator=g)
    grads = [torch.randn(3, 50, generator=g) * 10 ** -k for k in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = build_adamw([{"params": [p]}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fused=fused)
    assert bool(opt.defaults["fused"]) == (fused == "auto" and fused_adamw_supported([p]))
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    expected = _adamw_by_hand(p0, grads, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    assert torch.allclose(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


def test_fused_adamw_support_follows_the_device():
    from stageinteractor.d2.engine import fused_adamw_supported

    assert not fused_adamw_supported([torch.zeros(2, device="meta")])
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_supported([])
