#!/usr/bin/env python3
r"""Run a StageInteractor LazyConfig on images and draw the detections.

Examples (the first one works after `make demo`, which writes the dataset and checkpoint):

    python tools/demo.py --config-file configs/demo/stageinteractor_demo.py \
        --input datasets/stageinteractor_demo/val --output output/demo/my_vis --sampling-points \
        train.init_checkpoint=output/demo/stageinteractor/model_final.pth

    python tools/demo.py --config-file configs/stageinteractor/stageinteractor_r50_100q_1x.py \
        --input a.jpg b.jpg --output out/ --confidence-threshold 0.4 --sampling-points \
        train.init_checkpoint=model.pth

For every input ``X.jpg`` it writes ``OUTPUT/X.jpg`` (detections above the threshold, drawn by
detectron2's ``Visualizer``) and, with ``--sampling-points``, ``OUTPUT/X_points.jpg``: one panel
per decoder stage showing, for the ``--num-queries`` top-scoring queries, the box each stage
starts from and the points it samples, one colour per query.

Trailing ``key=value`` arguments are LazyConfig overrides (e.g. ``train.init_checkpoint=...``,
``model.decoder.reuse=False``); ``--checkpoint`` is a shortcut for ``train.init_checkpoint``.
Boxes are labelled with the category names of the config's test dataset (COCO-json datasets:
the json's categories). A mistake (config file, override, switch value, checkpoint, input)
ends in one line ``demo: error: ...`` and exit status 2 (``stageinteractor.d2.cli``).
"""
import argparse
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stageinteractor.requirements import require  # noqa: E402

require("tools/demo.py", "detectron2", "cv2")  # detectron2's Visualizer imports cv2

from detectron2.config import instantiate  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from stageinteractor.d2.checkpoint_files import load_weights  # noqa: E402
from stageinteractor.d2.cli import (  # noqa: E402
    cfg_get,
    load_config,
    reclaim_overrides,
    run_tool,
    split_overrides,
)
from stageinteractor.d2.data.validate import dataset_categories  # noqa: E402
from stageinteractor.errors import UserError  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PALETTE = [
    (0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.10, 0.75, 0.20), (0.95, 0.65, 0.05),
    (0.65, 0.20, 0.85), (0.05, 0.80, 0.80), (0.95, 0.30, 0.65), (0.55, 0.55, 0.10),
]


def parse_args(argv=None) -> argparse.Namespace:
    class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """keeps the examples' line breaks and shows the defaults"""

    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--config-file", required=True, help="LazyConfig .py file")
    p.add_argument("--checkpoint", default=None, help="weights (same as train.init_checkpoint=...)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--confidence-threshold", type=float, default=0.3, help="detections drawn")
    p.add_argument("--sampling-points", action="store_true", help="also draw per-stage sampling points")
    p.add_argument("--num-queries", type=int, default=4, help="queries drawn with --sampling-points")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--min-size", type=int, default=None, help="test short side (default: from config)")
    p.add_argument("--max-size", type=int, default=None, help="test long side limit (default: from config)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides key=value")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(flags + overrides)  # flags may follow the overrides
    reclaim_overrides(args, "input")  # `--input a.png key=value`: --input swallowed the overrides
    if not args.input:
        p.error("--input needs at least one image or folder")
    return args


def list_images(inputs: List[str]) -> List[str]:
    files = []
    for path in inputs:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS)
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"--input: {path!r} is neither an image file nor a folder")
    if not files:
        raise UserError(f"--input: no images ({', '.join(IMAGE_EXTS)}) found in {inputs}")
    return files


def _test_augmentations(cfg, min_size, max_size):
    """The test-time augmentations: the config's test mapper, else ResizeShortestEdge(800, 1333)."""
    if min_size or max_size:
        return T.AugmentationList([T.ResizeShortestEdge(min_size or 800, max_size or 1333)])
    try:
        mapper = instantiate(cfg.dataloader.test.mapper)
        augs = mapper.augmentations
        return augs if isinstance(augs, T.AugmentationList) else T.AugmentationList(list(augs))
    except Exception as e:  # config without a test loader: fall back to the COCO test size
        print(f"WARNING: no usable dataloader.test.mapper ({e}); resizing to short side 800, max 1333")
        return T.AugmentationList([T.ResizeShortestEdge(800, 1333)])


def _metadata(cfg):
    """Metadata with the category names of the config's test dataset (registered when the
    config was loaded; for a COCO json not loaded yet, read from its categories), or None."""
    names = cfg_get(cfg, "dataloader.test.dataset.names")
    if not names:
        return None
    name = names if isinstance(names, str) else list(names)[0]
    if not isinstance(name, str):
        return None
    classes = dataset_categories(name)
    return Metadata(name=name, thing_classes=classes) if classes else MetadataCatalog.get(name)


def _label_counts(instances, metadata) -> str:
    """``"cat 2, dog 1"``: the drawn detections per class (names when the metadata has them)."""
    names = metadata.get("thing_classes", None) if metadata is not None else None
    counts: Dict[str, int] = {}
    for c in instances.pred_classes.tolist():
        label = names[c] if names and 0 <= c < len(names) else str(c)
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def build(args):
    opts = list(args.opts)
    if args.checkpoint:
        opts.append(f"train.init_checkpoint={args.checkpoint}")
    cfg = load_config(args.config_file, opts)
    model = instantiate(cfg.model).to(args.device).eval()
    ckpt = cfg_get(cfg, "train.init_checkpoint", "")
    if ckpt:
        load_weights(model, ckpt, config_file=args.config_file)
    else:
        print("WARNING: no checkpoint given (--checkpoint or train.init_checkpoint=...): random weights")
    return cfg, model, _test_augmentations(cfg, args.min_size, args.max_size)


@torch.no_grad()
def run_one(model, resize, image_rgb: np.ndarray, want_points: bool):
    """Returns (instances in original pixels, stage outputs or None, scale (sx, sy) net->orig)."""
    h, w = image_rgb.shape[:2]
    aug_input = T.AugInput(image_rgb)
    resize(aug_input)
    net = aug_input.image
    tensor = torch.as_tensor(np.ascontiguousarray(net.transpose(2, 0, 1)))
    if model.input_format == "BGR":
        tensor = tensor.flip(0)
    inputs = [{"image": tensor, "height": h, "width": w}]
    instances = model(inputs)[0]["instances"].to("cpu")
    stages = None
    if want_points:
        images = model.preprocess_image(inputs)
        sizes = torch.as_tensor([list(images.image_sizes[0])], dtype=torch.float32, device=model.device)
        stages = model.run_decoder(images.tensor, sizes, return_sampling_points=True)
    return instances, stages, (w / net.shape[1], h / net.shape[0])


def _vis_scale(image: np.ndarray) -> float:
    """Upscale small images so that labels and points stay readable (>= 400 px wide)."""
    return max(1.0, 400.0 / image.shape[1])


def draw_detections(image_rgb, instances, metadata, threshold: float) -> np.ndarray:
    keep = instances[instances.scores >= threshold]
    vis = Visualizer(image_rgb, metadata, scale=_vis_scale(image_rgb))
    return vis.draw_instance_predictions(keep).get_image()


def _points_xy(points: torch.Tensor) -> torch.Tensor:
    """Any (B, N, ..., C>=2) sampling-point tensor -> (B, N, P, 2) x, y."""
    if points.shape[-1] < 2:
        raise ValueError(f"sampling_points must end with (x, y[, z]), got shape {tuple(points.shape)}")
    return points[..., :2].reshape(points.shape[0], points.shape[1], -1, 2)


def draw_sampling_points(image_rgb, stages: List[Dict], scale, num_queries: int) -> np.ndarray:
    """One panel per stage: input box + sampling points of the top-scoring queries."""
    from stageinteractor.core.box_ops import xyzr_to_xyxy

    if not stages or "sampling_points" not in stages[0]:
        raise RuntimeError(
            "--sampling-points: the decoder returned no 'sampling_points' (it must support "
            "decoder(features, image_sizes, return_sampling_points=True))"
        )
    best = stages[-1]["logits"][0].sigmoid().max(dim=-1).values
    queries = best.topk(min(num_queries, best.numel())).indices.tolist()
    sx, sy = scale
    panels = []
    for s, out in enumerate(stages):
        vis = Visualizer(image_rgb, scale=_vis_scale(image_rgb))
        pts = _points_xy(out["sampling_points"].float().cpu())[0]
        boxes = xyzr_to_xyxy(out["input_xyzr"].float().cpu()[0]) if "input_xyzr" in out else None
        for rank, q in enumerate(queries):
            color = PALETTE[rank % len(PALETTE)]
            if boxes is not None:
                b = boxes[q].tolist()
                vis.draw_box([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], edge_color=color, alpha=0.8)
            for x, y in pts[q].tolist():
                vis.draw_circle((x * sx, y * sy), color=color, radius=2)
        vis.draw_text(f"stage {s}", (10, 10), horizontal_alignment="left", color="w")
        panels.append(vis.get_output().get_image())
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    ph, pw = panels[0].shape[:2]
    grid = np.full((rows * ph, cols * pw, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        grid[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = panel
    return grid


def main(argv=None) -> int:
    """The command line (also called in-process by tools/run_demo.py); returns the exit status."""
    return run_tool(_run, argv, tool="demo")


def _run(argv) -> int:
    args = parse_args(argv)
    images = list_images(args.input)
    cfg, model, resize = build(args)
    metadata = _metadata(cfg)
    os.makedirs(args.output, exist_ok=True)
    from PIL import Image

    for path in images:
        image = read_image(path, format="RGB")
        instances, stages, scale = run_one(model, resize, image, args.sampling_points)
        stem = os.path.splitext(os.path.basename(path))[0]
        out_path = os.path.join(args.output, stem + ".jpg")
        Image.fromarray(draw_detections(image, instances, metadata, args.confidence_threshold)).save(out_path)
        drawn = instances[instances.scores >= args.confidence_threshold]
        print(f"{path}: {len(drawn)} detections >= {args.confidence_threshold}"
              f"{' (' + _label_counts(drawn, metadata) + ')' if len(drawn) else ''} -> {out_path}")
        if args.sampling_points:
            pts_path = os.path.join(args.output, stem + "_points.jpg")
            Image.fromarray(draw_sampling_points(image, stages, scale, args.num_queries)).save(pts_path)
            print(f"  sampling points -> {pts_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
