"""Pure-PyTorch core of StageInteractor (no detectron2/detrex imports)."""
