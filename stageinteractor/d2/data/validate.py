"""Validate a detection dataset before training, with one clear message per problem.

Checks (COCO json): readable file, well-formed JSON, required keys and types, unique ids,
every image file present under ``image_root``, every annotation pointing at a known image and
a known category, every non-crowd box finite, of positive size and inside its image (a
tolerance of ``tol`` pixels accepts float round-off). Crowd boxes only get structural checks
because training ignores them.

Every error is a :class:`DatasetValidationError` whose message names the file, the image or
annotation id, the offending value and what was expected. Validation stops at the first error
and reports how many further problems of the same scan were found.

:func:`dataset_names` lists the datasets a config's ``dataloader`` uses (all, the train split
only, or what ``--eval-only`` reads); :func:`dataset_categories` gives a registered dataset's
category names in detectron2's contiguous order (for ``num_classes`` checks and labels).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional

from stageinteractor.errors import UserError

__all__ = ["DatasetValidationError", "validate_coco_json", "validate_dataset_dicts",
           "validate_registered_dataset", "dataset_names", "dataset_categories"]


class DatasetValidationError(UserError, ValueError):
    """A dataset is unusable; the message says where and why (a user mistake: the tools print
    it as one line, see :mod:`stageinteractor.errors`)."""


class _Collector:
    def __init__(self, source: str):
        self.source = source
        self.errors: List[str] = []

    def add(self, msg: str) -> None:
        self.errors.append(msg)

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        extra = len(self.errors) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''} in this file)" if extra else ""
        raise DatasetValidationError(f"{self.source}: {self.errors[0]}{more}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_box(c: _Collector, where: str, box: Any, img_w: float, img_h: float,
               tol: float) -> None:
    """``box`` is COCO xywh."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_is_number, box))):
        c.add(f"{where}: 'bbox' is {box!r}, expected a list of 4 numbers [x, y, w, h]")
        return
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        c.add(f"{where}: 'bbox' {box!r} contains a non-finite value, expected finite numbers")
    elif w <= 0 or h <= 0:
        c.add(f"{where}: 'bbox' {box!r} has non-positive size (w={w:g}, h={h:g}), "
              f"expected w > 0 and h > 0")
    elif x < -tol or y < -tol or x + w > img_w + tol or y + h > img_h + tol:
        c.add(f"{where}: 'bbox' {box!r} (x0={x:g}, y0={y:g}, x1={x + w:g}, y1={y + h:g}) lies "
              f"outside its image of width {img_w:g} and height {img_h:g}, expected "
              f"0 <= x0 < x1 <= {img_w:g} and 0 <= y0 < y1 <= {img_h:g}")


def validate_coco_json(json_file: str, image_root: Optional[str], *, check_files: bool = True,
                       tol: float = 1.0) -> Dict[str, int]:
    """Validate a COCO-format detection json.

    Args:
        json_file: path of the annotation file.
        image_root: directory that ``images[*].file_name`` is relative to (``None`` skips the
            file-existence check).
        check_files: check that every image file exists.
        tol: pixels a box may exceed its image by (float round-off in converted datasets).

    Returns:
        ``{"images": n, "annotations": n, "categories": n}`` on success.

    Raises:
        DatasetValidationError: with the file, the id, the value and the expectation.
    """
    if not os.path.isfile(json_file):
        raise DatasetValidationError(f"{json_file}: annotation file does not exist")
    try:
        with open(json_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetValidationError(
            f"{json_file}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetValidationError(f"{json_file}: cannot read the file: {e}") from None

    c = _Collector(json_file)
    if not isinstance(data, dict):
        raise DatasetValidationError(
            f"{json_file}: top level is a {type(data).__name__}, expected a JSON object with "
            f"keys 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            c.add(f"missing top-level key '{key}', expected a list")
        elif not isinstance(data[key], list):
            c.add(f"top-level key '{key}' is a {type(data[key]).__name__}, expected a list")
    c.raise_if_any()

    categories = set()
    for k, cat in enumerate(data["categories"]):
        where = f"categories[{k}]"
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            c.add(f"{where} = {cat!r}: missing key 'id' or 'name', expected "
                  f"{{'id': int, 'name': str}}")
            continue
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            c.add(f"{where}: 'id' is {cat['id']!r}, expected an int")
        elif cat["id"] in categories:
            c.add(f"{where}: duplicate category id {cat['id']}")
        categories.add(cat["id"])
    c.raise_if_any()

    images: Dict[Any, Dict] = {}
    for k, img in enumerate(data["images"]):
        missing = [key for key in ("id", "file_name", "width", "height")
                   if not isinstance(img, dict) or key not in img]
        if missing:
            ident = img.get("id", f"#{k}") if isinstance(img, dict) else f"#{k}"
            c.add(f"image id {ident}: missing key(s) {missing}, expected 'id', 'file_name', "
                  f"'width', 'height'")
            continue
        where = f"image id {img['id']} ({img['file_name']!r})"
        if img["id"] in images:
            c.add(f"{where}: duplicate image id {img['id']!r}")
            continue
        for key in ("width", "height"):
            v = img[key]
            if not (_is_number(v) and v > 0):
                c.add(f"{where}: '{key}' is {v!r}, expected a positive number")
        if check_files and image_root is not None:
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                c.add(f"{where}: image file {path} does not exist")
        images[img["id"]] = img
    c.raise_if_any()

    for k, ann in enumerate(data["annotations"]):
        ident = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
        where = f"annotation id {ident}"
        missing = [key for key in ("image_id", "category_id", "bbox")
                   if not isinstance(ann, dict) or key not in ann]
        if missing:
            c.add(f"{where}: missing key(s) {missing}, expected 'image_id', 'category_id', "
                  f"'bbox'")
            continue
        where = f"annotation id {ident} (image id {ann['image_id']!r})"
        img = images.get(ann["image_id"])
        if img is None:
            c.add(f"{where}: 'image_id' {ann['image_id']!r} is not the id of any image in "
                  f"'images'")
            continue
        if ann["category_id"] not in categories:
            c.add(f"{where}: unknown 'category_id' {ann['category_id']!r}, expected one of "
                  f"{sorted(categories)}")
        if ann.get("iscrowd", 0):
            continue  # crowd regions are ignored in training
        _check_box(c, where, ann["bbox"], float(img["width"]), float(img["height"]), tol)
    c.raise_if_any()
    return {"images": len(images), "annotations": len(data["annotations"]),
            "categories": len(categories)}


def validate_dataset_dicts(name: str, dicts: List[Dict], *, num_classes: Optional[int] = None,
                           check_files: bool = True, tol: float = 1.0) -> Dict[str, int]:
    """Validate detectron2 dataset dicts (for datasets registered without a json file).

    Boxes must be ``BoxMode.XYXY_ABS`` (0) or ``BoxMode.XYWH_ABS`` (1); other modes are only
    structurally checked.
    """
    c = _Collector(f"dataset '{name}'")
    n_ann = 0
    for k, d in enumerate(dicts):
        ident = d.get("image_id", f"#{k}")
        fname = d.get("file_name")
        where = f"image id {ident} ({fname!r})"
        if fname is None:
            c.add(f"image id {ident}: missing key 'file_name'")
            continue
        if check_files and not os.path.isfile(fname):
            c.add(f"{where}: image file {fname} does not exist")
        w, h = d.get("width"), d.get("height")
        for ann in d.get("annotations", []):
            n_ann += 1
            awhere = f"{where}, annotation {ann.get('id', n_ann - 1)}"
            cls = ann.get("category_id")
            if num_classes is not None and not (isinstance(cls, int) and 0 <= cls < num_classes):
                c.add(f"{awhere}: unknown category_id {cls!r}, expected an int in "
                      f"[0, {num_classes})")
            if ann.get("iscrowd", 0) or w is None or h is None:
                continue
            box = ann.get("bbox")
            mode = int(ann.get("bbox_mode", 1))
            if mode == 0 and isinstance(box, (list, tuple)) and len(box) == 4 and \
                    all(map(_is_number, box)):
                box = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            if mode in (0, 1):
                _check_box(c, awhere, box, float(w), float(h), tol)
    c.raise_if_any()
    return {"images": len(dicts), "annotations": n_ann}


# name -> callable run before validation (e.g. generate the demo dataset on first use)
_PREPARE_HOOKS: Dict[str, Callable[[], None]] = {}


def register_prepare_hook(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn()`` before dataset ``name`` is validated or loaded."""
    _PREPARE_HOOKS[name] = fn


def prepare_dataset(name: str) -> None:
    hook = _PREPARE_HOOKS.get(name)
    if hook is not None:
        hook()


def validate_registered_dataset(name: str, *, check_files: bool = True) -> Dict[str, int]:
    """Validate a dataset registered in detectron2's catalogs.

    Uses ``MetadataCatalog.get(name).json_file``/``image_root`` when present (COCO json
    datasets, including detectron2's builtin ``coco_2017_*``), else the loaded dataset dicts.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise DatasetValidationError(
            f"dataset '{name}' is not registered; registered names include "
            f"{sorted(DatasetCatalog.list())[:12]}... (register it with "
            f"stageinteractor.d2.data.register_coco_json)")
    prepare_dataset(name)
    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None)
    if json_file:
        return validate_coco_json(json_file, getattr(meta, "image_root", None),
                                  check_files=check_files)
    classes = getattr(meta, "thing_classes", None)
    return validate_dataset_dicts(name, DatasetCatalog.get(name),
                                  num_classes=len(classes) if classes else None,
                                  check_files=check_files)


# ----------------------------------------------------------------------------------------------
# which datasets a config uses, and their categories
# ----------------------------------------------------------------------------------------------
_NAME_KEYS = ("names", "dataset_name", "dataset_names")


def _names_under(node) -> List[str]:
    """Dataset names held by ``names`` / ``dataset_name(s)`` keys anywhere below ``node``."""
    from omegaconf import DictConfig, ListConfig

    found: List[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            try:
                v = node[k]
            except Exception:  # noqa: BLE001 - unresolvable interpolation
                continue
            if k in _NAME_KEYS:
                vals = [v] if isinstance(v, str) else list(v) if isinstance(
                    v, (ListConfig, list, tuple)) else []
                found.extend(x for x in vals if isinstance(x, str))
            else:
                found.extend(_names_under(v))
    elif isinstance(node, ListConfig):
        for v in node:
            found.extend(_names_under(v))
    return found


def dataset_names(cfg, *, eval_only: bool = False, train_only: bool = False) -> List[str]:
    """The dataset names a LazyConfig's ``dataloader`` uses, in order, without repeats.

    ``eval_only``: only those of ``dataloader.test`` and ``dataloader.evaluator`` (what
    ``--eval-only`` reads); ``train_only``: only those of ``dataloader.train``; else all.
    """
    loader = cfg.get("dataloader") if hasattr(cfg, "get") else None
    if loader is None:
        return []
    if eval_only:
        parts = [loader.get(k) for k in ("test", "evaluator") if k in loader]
    elif train_only:
        parts = [loader.get("train")] if "train" in loader else []
    else:
        parts = [loader]
    return list(dict.fromkeys(n for p in parts for n in _names_under(p)))


def dataset_categories(name: str) -> Optional[List[str]]:
    """Category names of a registered dataset in contiguous-id order (what detectron2's
    ``load_coco_json`` makes ``thing_classes``: the json's categories sorted by id), or None
    when they cannot be known without loading the dataset."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    classes = getattr(meta, "thing_classes", None)
    if classes:
        return list(classes)
    json_file = getattr(meta, "json_file", None)
    if not json_file or not os.path.isfile(json_file):
        return None
    try:
        with open(json_file, "rb") as f:
            cats = json.loads(f.read().decode("utf-8")).get("categories")
        return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
    except (ValueError, TypeError, KeyError, AttributeError, OSError):
        return None  # a malformed json: validation names the problem
