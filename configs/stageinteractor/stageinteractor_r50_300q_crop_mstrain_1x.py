# StageInteractor R50, 300 queries, DETR crop + multi-scale training, 12 epochs (steps at epochs 8, 11).
# Paper Tab. 3 (StageInteractor, R50, 12 ep): 46.3 AP.
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/stageinteractor_r50_300q_crop_mstrain_1x"
train.max_iter = 12 * 7330  # 12 epochs at total batch 16
dataloader.evaluator.output_dir = train.output_dir
