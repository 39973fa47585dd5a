# Any COCO-format detection dataset: edit the paths (or override them on the command line is
# not possible for registration; edit here), then use like configs/common/data/coco.py.
# Registration happens when this config is loaded, i.e. in every process.
from stageinteractor.d2.data import register_coco_json

from .coco import dataloader

CUSTOM_ROOT = "./datasets/custom"

dataloader.train.dataset.names = register_coco_json(
    "custom_train", f"{CUSTOM_ROOT}/annotations/train.json", f"{CUSTOM_ROOT}/train")
dataloader.test.dataset.names = register_coco_json(
    "custom_val", f"{CUSTOM_ROOT}/annotations/val.json", f"{CUSTOM_ROOT}/val")
