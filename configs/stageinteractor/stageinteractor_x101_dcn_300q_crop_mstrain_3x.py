# StageInteractor X101-32x4d-DCN, 300 queries, crop + multi-scale, 36 epochs (steps 24, 33).
# Paper Tab. 3 (StageInteractor, X101-DCN): 51.3 AP.
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_x101_dcn import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_3x_crop as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
# open-mmlab://resnext101_32x4d (mmcv); converted on the fly by stageinteractor.d2.checkpoint
train.init_checkpoint = "https://download.openmmlab.com/pretrain/third_party/resnext101_32x4d-a5af3160.pth"
train.output_dir = "./output/stageinteractor_x101_dcn_300q_crop_mstrain_3x"
train.max_iter = 36 * 7330
dataloader.evaluator.output_dir = train.output_dir
