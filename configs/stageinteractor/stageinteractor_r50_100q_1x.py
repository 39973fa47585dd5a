# StageInteractor R50, 100 queries, 1x (12 epochs), single-scale 800 training.
# Paper Tab. 2 "StageInteractor": 44.8 AP (COCO val2017). Base config of all ablations
# (docs/CONFIGS.md: Tab. 6-18 are overrides of this file).
from ..common.data.coco import dataloader
from ..common.models.stageinteractor_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/stageinteractor_r50_100q_1x"
train.max_iter = 12 * 7330  # 12 epochs at total batch 16
dataloader.evaluator.output_dir = train.output_dir
