# AdaMixer baseline (as a setting of the StageInteractor classes), R50, 100 queries, 1x.
# Paper Tab. 6 row 1 (no CSLA, no reuse) = Tab. 18 "baseline, 64 points": 42.6 AP.
from ..common.data.coco import dataloader
from ..common.models.adamixer_r50 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/adamixer_r50_100q_1x"
train.max_iter = 12 * 7330
dataloader.evaluator.output_dir = train.output_dir
