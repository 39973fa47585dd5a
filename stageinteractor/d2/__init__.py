"""detectron2 layer of StageInteractor."""

from .meta_arch import StageInteractor, rescale_boxes, topk_detections  # noqa: F401
