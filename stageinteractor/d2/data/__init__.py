"""Data layer: demo dataset, COCO-json registration, validation, mapper, resumable loader.

Importing this package registers the demo datasets ``stageinteractor_demo_train`` and
``stageinteractor_demo_val`` (generated on first use) and detectron2's builtin COCO names.
"""
from .demo_dataset import DEMO_CLASSES, DemoDatasetSpec, ensure_demo_dataset, generate_demo_dataset
from .loader import ResumableTrainLoader, build_resumable_train_loader
from .mapper import (
    PIXEL_MEAN_RGB,
    PIXEL_STD_RGB,
    DetectionMapper,
    RandomBranch,
    build_augmentations,
)
from .register import (
    COCO_2017_TRAIN,
    COCO_2017_VAL,
    DEMO_TRAIN,
    DEMO_VAL,
    register_coco_json,
    register_demo_datasets,
)
from .validate import DatasetValidationError, validate_coco_json, validate_registered_dataset

register_demo_datasets()
