# StageInteractor R50, 300 queries, DETR crop + multi-scale training, 36 epochs (steps at epochs 24, 33).
# Paper Tab. 3 (StageInteractor, R50, 36 ep): 48.9 AP.
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_3x_crop as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/stageinteractor_r50_300q_crop_mstrain_3x"
train.max_iter = 36 * 7330  # 36 epochs at total batch 16
dataloader.evaluator.output_dir = train.output_dir
