# The synthetic demo dataset (stageinteractor.d2.data.demo_dataset): 5 shape classes,
# 600 train / 100 val images of 128-192 px, generated on first use (atomically) under
# $DETECTRON2_DATASETS/stageinteractor_demo (default <repo>/datasets/stageinteractor_demo).
# Small-scale versions of the 1x pipeline: train short side {128..192 step 32} (long <= 320),
# flip 0.5; test short side 160; total batch 8; 2 loader workers.
from .coco import dataloader

dataloader.train.dataset.names = "stageinteractor_demo_train"
dataloader.train.mapper.augmentations.policy = "mstrain"
dataloader.train.mapper.augmentations.ms_short_edges = (128, 160, 192)
dataloader.train.mapper.augmentations.max_size = 320
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 2

dataloader.test.dataset.names = "stageinteractor_demo_val"
dataloader.test.mapper.augmentations.short_edge = 160
dataloader.test.mapper.augmentations.max_size = 320
dataloader.test.num_workers = 0
