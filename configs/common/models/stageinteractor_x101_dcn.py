"""StageInteractor with ResNeXt-101 32x4d + DCNv1 in res3-res5 (paper Tab. 3, X101-DCN).

mmdet: groups 32, base width 4, DCN (deform_groups 1) replacing the 3x3 conv of res3..res5,
frozen stem + res2, BN statistics frozen (EvalBN). Same decoder as the R50 model.
"""
from .stageinteractor_r50 import model

model.backbone.depth = 101
model.backbone.groups = 32
model.backbone.width_per_group = 4
model.backbone.stage_with_dcn = (False, True, True, True)
model.backbone.deform_groups = 1
