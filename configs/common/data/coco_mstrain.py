# COCO 2017, multi-scale training (spec §6 "mstrain"): short side uniformly from
# {480, 512, ..., 800}, long side <= 1333, flip 0.5. Test pipeline as in coco.py.
from .coco import dataloader

dataloader.train.mapper.augmentations.policy = "mstrain"
