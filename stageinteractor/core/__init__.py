"""Pure-PyTorch core of StageInteractor (no detectron2/detrex imports)."""

# --- criterion (matcher, losses, CSLA, criterion, diagnostics) ---
from .matcher import HungarianMatcher  # noqa: E402
from .losses import giou_loss, l1_loss, sigmoid_focal_loss  # noqa: E402
from .csla import TABLE13_SCOPES, CrossStageLabelAssigner  # noqa: E402
from .criterion import StageInteractorCriterion  # noqa: E402
from .diagnostics import label_instability, positive_counts  # noqa: E402
