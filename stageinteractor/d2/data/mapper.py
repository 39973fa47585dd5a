"""Dataset mapper and augmentation policies (spec §6 "Train pipelines").

Image convention (shared with the meta-architecture configs): ``"image"`` is a **uint8 CHW
tensor in RGB order**; normalisation uses the ImageNet statistics in RGB
(:data:`PIXEL_MEAN_RGB`, :data:`PIXEL_STD_RGB`) and ``input_format="RGB"``. Padding to a
multiple of 32 is done by the model when it batches the images
(``ImageList.from_tensors(size_divisibility=32)``).

Policies (:func:`build_augmentations`):

* ``"1x"``: resize short side 800, long side <= 1333; horizontal flip p = 0.5.
* ``"mstrain"``: short side uniformly from {480, 512, ..., 800}, long <= 1333; flip.
* ``"crop_mstrain"``: DETR policy: flip first, then with probability 1/2 each
  (A) the multi-scale resize, or (B) resize short side in {400, 500, 600} (long <= 1333),
  absolute-range random crop h in [384, min(600, H)], w in [384, min(600, W)] (boxes clipped,
  emptied boxes dropped; an image may end with no box, like mmdet's allow_negative_crop), then
  the multi-scale resize.
* ``"test"``: resize short side 800, long <= 1333.

The sizes are parameters, so the demo configs reuse the same policies at small scale.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["PIXEL_MEAN_RGB", "PIXEL_STD_RGB", "MSTRAIN_SHORT_EDGES", "RandomBranch",
           "build_augmentations", "DetectionMapper"]

PIXEL_MEAN_RGB = [123.675, 116.28, 103.53]
PIXEL_STD_RGB = [58.395, 57.12, 57.375]
MSTRAIN_SHORT_EDGES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


class RandomBranch(T.Augmentation):
    """Apply one of several augmentation lists, chosen uniformly at random (np.random).

    The building block of the DETR "two-branch" policy (mmdet's AutoAugment with two
    policies). ``branches``: list of lists of Augmentation/Transform.
    """

    def __init__(self, branches: Sequence[Sequence]):
        super().__init__()
        if len(branches) == 0:
            raise ValueError("RandomBranch needs at least one branch")
        self.branches = [T.AugmentationList(list(b)) for b in branches]

    def __call__(self, aug_input) -> T.Transform:
        k = int(np.random.randint(len(self.branches)))
        return self.branches[k](aug_input)

    def __repr__(self):
        return "RandomBranch[" + " | ".join(str(b) for b in self.branches) + "]"


def build_augmentations(policy: str, *, short_edge: int = 800, max_size: int = 1333,
                        ms_short_edges: Sequence[int] = MSTRAIN_SHORT_EDGES,
                        crop_resize_edges: Sequence[int] = (400, 500, 600),
                        crop_size: Sequence[int] = (384, 600),
                        flip_prob: float = 0.5) -> List[T.Augmentation]:
    """The augmentation list of a named policy (see the module docstring)."""
    flip = T.RandomFlip(prob=flip_prob, horizontal=True, vertical=False)
    if policy == "1x":
        return [T.ResizeShortestEdge(short_edge, max_size), flip]
    if policy == "mstrain":
        return [T.ResizeShortestEdge(tuple(ms_short_edges), max_size, sample_style="choice"),
                flip]
    if policy == "crop_mstrain":
        ms = T.ResizeShortestEdge(tuple(ms_short_edges), max_size, sample_style="choice")
        return [
            flip,
            RandomBranch([
                [ms],
                [T.ResizeShortestEdge(tuple(crop_resize_edges), max_size, sample_style="choice"),
                 T.RandomCrop("absolute_range", tuple(crop_size)),
                 T.ResizeShortestEdge(tuple(ms_short_edges), max_size, sample_style="choice")],
            ]),
        ]
    if policy == "test":
        return [T.ResizeShortestEdge(short_edge, max_size)]
    raise ValueError(f"unknown augmentation policy {policy!r}, expected one of "
                     f"'1x', 'mstrain', 'crop_mstrain', 'test'")


class DetectionMapper:
    """Map a detectron2 dataset dict to the model input dict.

    Output: ``{"image": uint8 (3, H, W) tensor in image_format, "height", "width" (original
    size), "image_id", "file_name"}`` plus, in training, ``"instances"``:
    ``Instances(image_size=(H, W), gt_boxes=Boxes (G, 4) absolute xyxy in the augmented frame,
    gt_classes=(G,) long)``. Crowd annotations are dropped; boxes left empty by cropping are
    dropped (G may be 0). In eval, annotations are removed.

    Randomness comes only from ``np.random`` (detectron2 augmentations), so seeding numpy
    before the call makes the output deterministic (see :mod:`.loader`).
    """

    def __init__(self, *, is_train: bool, augmentations: Sequence, image_format: str = "RGB"):
        self.is_train = bool(is_train)
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format

    def __repr__(self):
        return (f"DetectionMapper(is_train={self.is_train}, image_format={self.image_format}, "
                f"augmentations={self.augmentations})")

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict
        annos = [utils.transform_instance_annotations(a, transforms, (h, w))
                 for a in (annos or []) if int(a.get("iscrowd", 0)) == 0]
        instances = utils.annotations_to_instances(annos, (h, w))
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
