# StageInteractor Swin-S, 300 queries, crop + multi-scale, 36 epochs (steps 24, 33,
# 1000 warm-up iterations). Paper Tab. 3 (StageInteractor, Swin-S): 52.7 AP.
# Optimiser: AdamW without weight decay on Swin position tables and "*norm*" parameters, the
# names as the authors' model spells them (configs/common/optim.py).
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_swin_s import model
from ..common.optim import AdamW_swin as optimizer
from ..common.schedule import lr_multiplier_3x_crop_swin as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
# official Microsoft ImageNet-1k Swin-S weights (converted on the fly by stageinteractor.d2.checkpoint)
train.init_checkpoint = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth"
train.output_dir = "./output/stageinteractor_swin_s_300q_crop_mstrain_3x"
train.max_iter = 36 * 7330
dataloader.evaluator.output_dir = train.output_dir
