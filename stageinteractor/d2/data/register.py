"""Dataset registration helpers (config-level).

* :func:`register_coco_json` registers any COCO-format detection json under a name, lazily
  (nothing is read until the dataset is requested). It returns the name, so a LazyConfig can
  write ``names=register_coco_json("my_train", "/data/train.json", "/data/train")`` or wrap it in
  ``L(...)``. Calling it again with the same arguments is a no-op; a different json/root under
  an existing name is an error.
* COCO 2017 uses detectron2's builtin names :data:`COCO_2017_TRAIN` / :data:`COCO_2017_VAL`
  (``$DETECTRON2_DATASETS/coco/{train2017,val2017,annotations/instances_*2017.json}``).
* :func:`register_demo_datasets` registers ``stageinteractor_demo_train`` / ``_val``; the
  images are generated on first request (see :mod:`.demo_dataset`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .demo_dataset import DEMO_CLASSES, DemoDatasetSpec, demo_dataset_dir, ensure_demo_dataset
from .validate import prepare_dataset, register_prepare_hook

__all__ = ["COCO_2017_TRAIN", "COCO_2017_VAL", "DEMO_TRAIN", "DEMO_VAL",
           "register_coco_json", "register_demo_datasets"]

COCO_2017_TRAIN = "coco_2017_train"
COCO_2017_VAL = "coco_2017_val"
DEMO_TRAIN = "stageinteractor_demo_train"
DEMO_VAL = "stageinteractor_demo_val"


def register_coco_json(name: str, json_file: str, image_root: str, *,
                       metadata: Optional[Dict] = None) -> str:
    """Register a COCO-format detection dataset as ``name`` and return ``name``.

    ``thing_classes`` and the dataset-id -> contiguous-id map are filled by detectron2's
    ``load_coco_json`` on first load; ``evaluator_type="coco"`` and ``json_file`` make it usable
    with ``COCOEvaluator`` directly.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old = (getattr(meta, "json_file", None), getattr(meta, "image_root", None))
        if old != (json_file, image_root):
            raise ValueError(
                f"dataset '{name}' is already registered with json_file={old[0]!r}, "
                f"image_root={old[1]!r}; cannot re-register it with json_file={json_file!r}, "
                f"image_root={image_root!r} (choose another name)")
        return name

    def _load():
        prepare_dataset(name)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="coco", **(metadata or {}))
    return name


def register_demo_datasets(root: Optional[str] = None,
                           spec: DemoDatasetSpec = DemoDatasetSpec()) -> None:
    """Register the synthetic demo dataset splits (generated lazily, atomically)."""
    base = demo_dataset_dir(root)
    for name, split in ((DEMO_TRAIN, "train"), (DEMO_VAL, "val")):
        if name in DatasetCatalog.list():
            continue
        register_prepare_hook(name, lambda: ensure_demo_dataset(root, spec))
        register_coco_json(
            name, os.path.join(base, "annotations", f"instances_{split}.json"),
            os.path.join(base, split),
            metadata={"thing_classes": list(DEMO_CLASSES)})
