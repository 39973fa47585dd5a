"""Pure-PyTorch core of StageInteractor (no detectron2/detrex imports)."""

# --- criterion (matcher, losses, CSLA, criterion, diagnostics) ---
from .matcher import HungarianMatcher  # noqa: E402
from .losses import giou_loss, l1_loss, sigmoid_focal_loss  # noqa: E402
from .csla import TABLE13_SCOPES, CrossStageLabelAssigner  # noqa: E402
from .criterion import StageInteractorCriterion  # noqa: E402
from .diagnostics import label_instability, positive_counts  # noqa: E402

from .box_ops import (  # noqa: E402,F401
    box_area,
    cxcywh_to_xyxy,
    elementwise_giou,
    elementwise_iou,
    pairwise_giou,
    pairwise_iof,
    pairwise_iou,
    refine_xyzr,
    xyxy_to_cxcywh,
    xyxy_to_xyzr,
    xyzr_to_xyxy,
)
from .decoder import StageInteractorDecoder  # noqa: E402,F401
from .postprocess import topk_detections  # noqa: E402,F401
from .switches import ADAMIXER_BASELINE, DecoderSwitches  # noqa: E402,F401
from .filter_bank import FilterBank  # noqa: E402,F401
from .stage import OFFICIAL_GENERATOR_SOURCES, DecoderStage, fuse_group_rows  # noqa: E402,F401
