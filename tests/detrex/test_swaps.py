"""use_csla / use_dca / use_device_agnostic_dino on detrex's own configs; DeviceAgnosticDINO's
denoising queries equal detrex's; DCA structure."""

import pytest
import torch

pytest.importorskip("detrex")

from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detrex.modeling.matcher import HungarianMatcher  # noqa: E402

from detrex_csla_helpers import cuda_calls_are_noops  # noqa: E402
from stageinteractor.detrex_ext import (  # noqa: E402
    CSLADeformableCriterion,
    CSLADINOCriterion,
    CSLADNCriterion,
    CSLAHDeformableCriterion,
    use_csla,
    use_dca,
    use_device_agnostic_dino,
)
from stageinteractor.detrex_ext.csla_criterion import CachedMatcher  # noqa: E402
from stageinteractor.detrex_ext.detrex_configs import load_detrex_project_config  # noqa: E402

DETREX_CONFIGS = [
    ("projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py", CSLADINOCriterion),
    ("projects/dn_detr/configs/dn_detr_r50_50ep.py", CSLADNCriterion),
    (
        "projects/deformable_detr/configs/deformable_detr_r50_two_stage_50ep.py",
        CSLADeformableCriterion,
    ),
    (
        "projects/h_deformable_detr/configs/h_deformable_detr_r50_two_stage_12ep.py",
        CSLAHDeformableCriterion,
    ),
]


@pytest.mark.parametrize(
    "path,twin", DETREX_CONFIGS, ids=[p.split("/")[1] for p, _ in DETREX_CONFIGS]
)
def test_use_csla_on_detrex_configs(path, twin):
    cfg = load_detrex_project_config(path)
    original = dict(cfg.model.criterion.weight_dict)
    fields = {k for k in cfg.model.criterion if k != "_target_"}
    use_csla(cfg.model, iou_threshold=0.6)
    crit = instantiate(cfg.model.criterion)
    assert type(crit) is twin
    assert dict(crit.weight_dict) == original  # every aux/_enc/_dn key kept, same weights
    assert fields <= set(cfg.model.criterion)
    assert isinstance(crit.matcher, CachedMatcher) and isinstance(
        crit.matcher.inner, HungarianMatcher
    )
    assert crit.csla_iou_threshold == 0.6 and crit.csla_scope == (-1, None)
    assert crit.csla_cls_norm == "max_positives"
    repr(crit)  # detrex's train_net prints the model
    # idempotent: swapping a twin only updates the switches
    use_csla(cfg.model, scope=(0, 0))
    assert instantiate(cfg.model.criterion).csla_scope == (0, 0)


def test_use_csla_rejects_unsupported_criterion():
    cfg = load_detrex_project_config("projects/dn_detr/configs/dn_detr_r50_50ep.py")
    cfg.model.criterion = L(torch.nn.Identity)()
    with pytest.raises(
        ValueError, match=r"unsupported criterion 'torch.nn.modules.linear.Identity'.*DINOCriterion"
    ):
        use_csla(cfg.model)
    with pytest.raises(ValueError, match="cls_norm"):
        use_csla(
            load_detrex_project_config("projects/dn_detr/configs/dn_detr_r50_50ep.py").model,
            cls_norm="x",
        )


def test_use_dca_structure():
    cfg = load_detrex_project_config("projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py")
    cfg.model.transformer.decoder.num_layers = 2
    base = instantiate(cfg.model.transformer.decoder)
    use_dca(cfg.model)
    dca = instantiate(cfg.model.transformer.decoder)
    layer = dca.layers[0]
    assert layer.operation_order == (
        "self_attn",
        "norm",
        "cross_attn",
        "norm",
        "cross_attn",
        "norm",
        "ffn",
        "norm",
    )
    assert len(layer.attentions) == 3 and len(layer.norms) == 4
    assert dca.layers[0].attentions[2] is not dca.layers[1].attentions[2]
    # exactly one extra deformable cross-attention + one LayerNorm per layer
    extra = sum(p.numel() for p in dca.parameters()) - sum(p.numel() for p in base.parameters())
    per_layer = sum(p.numel() for p in layer.attentions[1].parameters()) + sum(
        p.numel() for p in layer.norms[0].parameters()
    )
    assert extra == 2 * per_layer
    with pytest.raises(ValueError, match="unsupported decoder"):
        use_dca(load_detrex_project_config("projects/dn_detr/configs/dn_detr_r50_50ep.py").model)


def test_device_agnostic_dino_matches_detrex_denoising():
    from projects.dino.modeling import DINO

    cfg = load_detrex_project_config("projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py")
    use_device_agnostic_dino(cfg.model)
    from stageinteractor.detrex_ext import DeviceAgnosticDINO

    assert cfg.model._target_ is DeviceAgnosticDINO
    gen = torch.Generator().manual_seed(0)
    targets = [
        {
            "labels": torch.randint(0, 80, (n,), generator=gen),
            "boxes": torch.cat(
                [
                    0.3 + 0.4 * torch.rand(n, 2, generator=gen),
                    0.05 + 0.3 * torch.rand(n, 2, generator=gen),
                ],
                1,
            ),
        }
        for n in (3, 1, 0)
    ]
    label_enc = torch.nn.Embedding(80, 16)
    args = dict(
        dn_number=5,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        num_queries=7,
        num_classes=80,
        hidden_dim=16,
        label_enc=label_enc,
    )
    torch.manual_seed(3)
    ours = DeviceAgnosticDINO.prepare_for_cdn(None, targets, **args)
    torch.manual_seed(3)
    with cuda_calls_are_noops():
        theirs = DINO.prepare_for_cdn(None, targets, **args)
    for a, b in zip(ours[:3], theirs[:3]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert ours[3] == theirs[3]
    assert DeviceAgnosticDINO.prepare_for_cdn(None, [targets[2]], **args) == (None,) * 4


def _our_configs():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "csla", "configs")
    return sorted(glob.glob(os.path.join(root, "*.py")))


@pytest.mark.parametrize("path", _our_configs(), ids=lambda p: p.rsplit("/", 1)[-1][:-3])
def test_transfer_config_is_detrex_baseline_plus_csla(path):
    """Each transfer config = detrex's config (named in its header) + the swaps, nothing else."""
    import re

    from detectron2.config import LazyConfig
    from stageinteractor.detrex_ext import CSLA_TWINS

    ours = LazyConfig.load(path)
    base_rel = re.search(r"^#\s+(projects/\S+\.py)$", open(path).read(), re.M).group(1)
    base = load_detrex_project_config(base_rel)
    assert ours.model.criterion._target_ in set(CSLA_TWINS.values())
    assert ours.model.criterion._target_ is CSLA_TWINS[base.model.criterion._target_]
    assert dict(ours.model.criterion.weight_dict) == dict(base.model.criterion.weight_dict)
    assert ours.train.output_dir != base.train.output_dir
    for key in ("max_iter", "init_checkpoint", "clip_grad", "eval_period"):
        assert ours.train[key] == base.train[key], key
    assert ours.optimizer.lr == base.optimizer.lr
    assert ours.dataloader.train.total_batch_size == base.dataloader.train.total_batch_size
    crit = instantiate(ours.model.criterion)
    assert crit.csla_enabled and crit.csla_iou_threshold == 0.5 and crit.csla_scope == (-1, None)


@pytest.mark.parametrize(
    "name,base_rel",
    [
        (
            "dino_r50_4scale_12ep_csla.py",
            "projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py",
        ),
        ("dn_detr_r50_50ep_csla.py", "projects/dn_detr/configs/dn_detr_r50_50ep.py"),
        (
            "h_deformable_detr_r50_two_stage_12ep_csla.py",
            "projects/h_deformable_detr/configs/h_deformable_detr_r50_two_stage_12ep.py",
        ),
    ],
)
def test_csla_model_checkpoints_are_detrex_checkpoints(name, base_rel):
    """Same state-dict keys and shapes as detrex's model (tiny sizes): checkpoints interchange."""
    import os

    from detectron2.config import LazyConfig
    from stageinteractor.detrex_ext.tiny import shrink_model_cfg

    root = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "csla", "configs")
    ours = instantiate(shrink_model_cfg(LazyConfig.load(os.path.join(root, name)).model))
    base = instantiate(shrink_model_cfg(load_detrex_project_config(base_rel).model))
    a, b = ours.state_dict(), base.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(b)  # strict
