"""detectron2 layer of StageInteractor."""

from .meta_arch import StageInteractor, rescale_boxes  # noqa: F401
