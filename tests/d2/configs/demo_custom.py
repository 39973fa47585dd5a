# The demo StageInteractor (configs/demo/stageinteractor_demo.py) on a COCO-json dataset laid out
# like configs/common/data/custom.py ($CUSTOM_DATASET_ROOT: annotations/{train,val}.json,
# train/, val/), at the demo's small image sizes. Used by the command-line tests of the tools.
import os

from detectron2.config import LazyConfig

_REPO = os.path.join(os.path.dirname(__file__), "..", "..", "..")
_demo = LazyConfig.load(os.path.join(_REPO, "configs", "demo", "stageinteractor_demo.py"))

model = _demo.model
model.decoder.num_classes = 2  # the categories of the tests' custom json

dataloader = LazyConfig.load(os.path.join(_REPO, "configs", "common", "data", "custom.py")).dataloader
dataloader.train.mapper.augmentations.short_edge = 64
dataloader.train.mapper.augmentations.max_size = 96
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.mapper.augmentations.short_edge = 64
dataloader.test.mapper.augmentations.max_size = 96
dataloader.test.num_workers = 0

optimizer = _demo.optimizer
lr_multiplier = _demo.lr_multiplier
train = _demo.train
train.max_iter = 2
train.eval_period = 0
train.checkpointer.period = 2
train.log_period = 1
train.output_dir = "./output/test_demo_custom"
dataloader.evaluator.output_dir = None
