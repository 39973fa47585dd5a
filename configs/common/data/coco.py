# COCO 2017 detection data, 1x pipeline (spec §6): resize short side 800 / long <= 1333,
# horizontal flip 0.5; images RGB uint8 (normalised by the model with ImageNet RGB mean/std);
# train2017 without images lacking annotations, crowd boxes ignored; evaluation on val2017.
# Datasets: detectron2's builtin names, under $DETECTRON2_DATASETS/coco (default ./datasets).
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from stageinteractor.d2.data import DetectionMapper, build_augmentations
from stageinteractor.d2.data.loader import build_resumable_train_loader

dataloader = OmegaConf.create()

# Resumable drop-in for build_detection_train_loader (same arguments; aspect-ratio grouped;
# the data stream continues exactly after --resume).
dataloader.train = L(build_resumable_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=True),
    mapper=L(DetectionMapper)(
        is_train=True,
        augmentations=L(build_augmentations)(policy="1x", short_edge=800, max_size=1333),
        image_format="RGB",
    ),
    total_batch_size=16,  # over all processes (2 images x 8 GPUs in the paper)
    num_workers=4,
    aspect_ratio_grouping=True,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetectionMapper)(
        is_train=False,
        augmentations=L(build_augmentations)(policy="test", short_edge=800, max_size=1333),
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir=None,  # set to train.output_dir by run configs if predictions should be kept
)
