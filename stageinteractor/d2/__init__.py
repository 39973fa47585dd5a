"""detectron2 layer of StageInteractor."""
