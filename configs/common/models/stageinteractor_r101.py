"""StageInteractor with ResNet-101 (paper Tab. 3). Same decoder as the R50 model."""
from .stageinteractor_r50 import model

model.backbone.depth = 101
