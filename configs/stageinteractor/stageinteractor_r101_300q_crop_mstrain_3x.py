# StageInteractor R101, 300 queries, crop + multi-scale, 36 epochs (steps 24, 33).
# Paper Tab. 3 (StageInteractor, R101): 49.9 AP.
from ..common.data.coco_crop_mstrain import dataloader
from ..common.models.stageinteractor_r101 import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import lr_multiplier_3x_crop as lr_multiplier
from ..common.train import train

model.decoder.num_queries = 300
# torchvision's ImageNet resnet101 (IMAGENET1K_V1; what the authors' torchvision://resnet101
# loads), converted on the fly by stageinteractor.d2.checkpoint (format "torchvision").
# detectron2's model zoo publishes a torchvision conversion for R-50 only (its R-101.pkl is
# MSRA's caffe model, a stride-in-1x1 network our checkpointer refuses).
train.init_checkpoint = "https://download.pytorch.org/models/resnet101-63fe2227.pth"
train.output_dir = "./output/stageinteractor_r101_300q_crop_mstrain_3x"
train.max_iter = 36 * 7330
dataloader.evaluator.output_dir = train.output_dir
