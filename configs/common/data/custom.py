# Any COCO-format detection dataset, with the 1x pipeline of configs/common/data/coco.py.
# Registration runs when this config is loaded (in every process, as DDP needs). The paths
# come from $CUSTOM_DATASET_ROOT (default ./datasets/custom) laid out as
#   annotations/train.json, annotations/val.json, train/<images>, val/<images>
# or edit CUSTOM_ROOT / the file names below. tools/train_net.py validates both json files
# (keys, ids, image files, boxes, categories) before training.
import os

from stageinteractor.d2.data import register_coco_json

from .coco import dataloader

CUSTOM_ROOT = os.environ.get("CUSTOM_DATASET_ROOT", "./datasets/custom")

dataloader.train.dataset.names = register_coco_json(
    "custom_train", os.path.join(CUSTOM_ROOT, "annotations", "train.json"),
    os.path.join(CUSTOM_ROOT, "train"))
dataloader.test.dataset.names = register_coco_json(
    "custom_val", os.path.join(CUSTOM_ROOT, "annotations", "val.json"),
    os.path.join(CUSTOM_ROOT, "val"))
