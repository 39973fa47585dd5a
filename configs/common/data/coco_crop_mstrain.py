# COCO 2017, DETR crop + multi-scale policy for the 300-query crop configs (spec §6):
# flip, then with p = 1/2 each: (A) short side in {480..800 step 32}; or (B) short side in
# {400, 500, 600}, absolute random crop [384, 600], then short side in {480..800 step 32};
# long side <= 1333 throughout. Test pipeline as in coco.py.
from .coco import dataloader

dataloader.train.mapper.augmentations.policy = "crop_mstrain"
