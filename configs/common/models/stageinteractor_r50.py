"""StageInteractor, ResNet-50, 100 queries (paper Tab. 2: 44.8 AP at 1x).

Model only; run configs under configs/stageinteractor/ add data, optimiser, schedule and train.
Every ablation of the paper is a plain override of this node (docs/CONFIGS.md), e.g.
``model.decoder.reuse=False`` or ``model.criterion.assigner.scope=[0,0]``.
"""
from detectron2.config import LazyCall as L

from stageinteractor.core.csla import CrossStageLabelAssigner
from stageinteractor.core.criterion import StageInteractorCriterion
from stageinteractor.core.decoder import StageInteractorDecoder
from stageinteractor.core.matcher import HungarianMatcher
from stageinteractor.d2.backbone.resnet import ResNet
from stageinteractor.d2.meta_arch import StageInteractor
from stageinteractor.d2.neck import ChannelMapping

model = L(StageInteractor)(
    # mmdet ResNet-50 "pytorch" style; EvalBN = BN statistics frozen, affine of res3-5 trained;
    # freeze_at=2 = stem + res2 frozen (mmdet frozen_stages=1). Weights: train.init_checkpoint.
    backbone=L(ResNet)(depth=50, norm="EvalBN", freeze_at=2, out_features=("res2", "res3", "res4", "res5")),
    # ChannelMapping: per-level 1x1 conv to 256 + ONE GroupNorm shared by all levels (not an FPN).
    neck=L(ChannelMapping)(
        in_features=("res2", "res3", "res4", "res5"),
        in_channels=(256, 512, 1024, 2048),
        strides=(4, 8, 16, 32),
        out_channels=256,
        num_groups=32,
    ),
    decoder=L(StageInteractorDecoder)(
        num_classes=80,
        num_queries=100,
        num_stages=6,
        feature_strides=(4, 8, 16, 32),
        query_dim=256,  # D
        num_heads=8,  # MHSA heads
        num_groups=4,  # G channel groups of sampler and mixer
        ffn_dim=2048,
        first_stage_points=64,  # P_in at stage 0 (Tab. 18)
        num_points=32,  # P_in at stages 1..5
        out_points=128,  # P_out of the spatial mixing
        # ---- ablation switches (stageinteractor/core/switches.py; released values) ----
        sampler="grouped",  # Tab. 17: "grouped" | "3d" | "3d_group_init"
        subpoint_offsets="shared",
        refine_mode="wh",
        pe_residual="stream",
        dynamic_bias=True,
        reuse=True,  # Tab. 6 "Reuse"
        reuse_start=2,  # first (0-based) stage reusing filters
        # The reuse-only switches stay None = "released value when reuse=True, off when
        # reuse=False", so that reuse=False or max_reused_channel_filters=0 are single overrides:
        max_reused_channel_filters=None,  # Tab. 10 max Δγ: 0..4, None = 4
        num_reused_spatial_filters=None,  # Tab. 8 N_S: 0 | 1 | 3, None = 1
        filter_usage=None,  # Tab. 11: "none" | "previous" | "current" | "adapter" (None)
        static_mixing=None,  # Tab. 15/16: "none" | "channel" | "spatial" | "channel_spatial" (None)
    ),
    criterion=L(StageInteractorCriterion)(
        num_classes="${..decoder.num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0),
        # Cross-stage label assigner (Tab. 6 "CSLA", 7, 13, 14).
        assigner=L(CrossStageLabelAssigner)(
            num_classes="${..num_classes}",
            enabled=True,
            # (lo, hi) candidate-stage offsets, None = unbounded: (-1, None) = the paper's
            # [i-1, L] (released). Tab. 13: [0,0] [-1,0] [-1,1] [null,null].
            scope=(-1, None),
            stages=None,  # None = every stage (Tab. 13 last row: [0, 1, 2, 3])
            iou_threshold=0.5,  # Tab. 14
            use_score=True,  # Tab. 7 "Score"
            cross_stage=True,  # Tab. 7 "Cross"
        ),
        loss_class_weight=2.0,
        loss_bbox_weight=5.0,
        loss_giou_weight=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    # mmdet ImageNet statistics, RGB order (the data mapper yields RGB uint8 CHW).
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    size_divisibility=32,
    max_detections_per_image=None,  # None = num_queries (official max_per_img)
)
