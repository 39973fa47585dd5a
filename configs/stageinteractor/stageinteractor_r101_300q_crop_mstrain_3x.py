# StageInteractor R101, 300 queries, crop + multi-scale, 36 epochs (steps 24, 33).
# Paper Tab. 3 (StageInteractor, R101): 49.9 AP.
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_r101 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_3x_crop as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "./output/stageinteractor_r101_300q_crop_mstrain_3x"
train.max_iter = 36 * 7330
dataloader.evaluator.output_dir = train.output_dir
