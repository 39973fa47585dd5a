#!/usr/bin/env python3
r"""Export a StageInteractor LazyConfig (whole detector) to ONNX; optionally check onnxruntime
against PyTorch on real images.

Examples::

    python tools/export_onnx.py --config-file configs/demo/stageinteractor_demo.py \
        --output model.onnx --dynamic-size \
        --verify datasets/stageinteractor_demo/val --max-verify 5 \
        train.init_checkpoint=output/demo/stageinteractor/model_final.pth

    python tools/export_onnx.py \
        --config-file configs/stageinteractor/stageinteractor_r50_100q_1x.py --output r50.onnx \
        --image-size 800 1344 train.init_checkpoint=model.pth

Graph: inputs ``image`` (1, 3, H, W) uint8 RGB (``--input-dtype float32`` for float), ``image_size``
(2,) int64 (h, w) of the resized image inside ``image`` (top-left), ``orig_size`` (2,) int64
(height, width) of the original image; outputs ``boxes`` (k, 4) xyxy in original-image pixels,
``scores`` (k,), ``classes`` (k,). See ``stageinteractor/d2/export.py``.

Without ``--dynamic-size`` the graph accepts the ``--image-size`` canvas only (default: the config's
test ``max_size`` square, rounded up to the size divisibility); ``--verify`` then places each
resized image at the top-left of that canvas.

``--verify IMG...``: every image is resized like the config's test mapper and run by onnxruntime
and by PyTorch; the tool prints per-image max box error (pixels and relative to the image size)
and max score error, and exits with status 1 if any image exceeds the tolerances (relative box
error 1e-3, score error 1e-4) or disagrees on classes. The PyTorch reference is the normal
inference path ``model([{"image", "height", "width"}])`` when the image is the whole canvas
(``--dynamic-size``), else the same exported module run eagerly on the same canvas.

Trailing ``key=value`` arguments are LazyConfig overrides. A mistake (config file, override,
switch value, checkpoint, image path) ends in one line ``export_onnx: error: ...`` and exit
status 2 (``stageinteractor.d2.cli``), before the ONNX file is written.
"""

import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stageinteractor.requirements import require  # noqa: E402

require("tools/export_onnx.py", "detectron2", "onnx", "onnxruntime")

from detectron2.config import instantiate  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402

from stageinteractor.d2.export import (  # noqa: E402
    ExportableStageInteractor,
    OnnxDetector,
    compare_detections,
    export_onnx,
    place_on_canvas,
    torch_reference,
)
from stageinteractor.d2.checkpoint_files import load_weights  # noqa: E402
from stageinteractor.d2.cli import (  # noqa: E402
    cfg_get,
    load_config,
    reclaim_overrides,
    run_tool,
    split_overrides,
)
from stageinteractor.errors import ConfigError, UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="LazyConfig .py file")
    p.add_argument("--output", required=True, help="ONNX file to write")
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="canvas size of the graph (default: test max_size square)",
    )
    p.add_argument("--dynamic-size", action="store_true", help="symbolic image height and width")
    p.add_argument(
        "--verify",
        nargs="+",
        default=None,
        metavar="IMG",
        help="images (or folders) to compare onnxruntime with PyTorch on",
    )
    p.add_argument("--max-verify", type=int, default=None, help="use at most this many images")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides key=value")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(flags + overrides)  # flags may follow the overrides
    reclaim_overrides(args, "verify")  # `--verify a.png key=value`: the overrides after the images
    if args.verify == []:
        p.error("--verify needs at least one image or folder")
    return args


def load_model(config_file, opts):
    cfg = load_config(config_file, opts)
    model = instantiate(cfg.model).eval()
    ckpt = cfg_get(cfg, "train.init_checkpoint", "")
    if ckpt:
        load_weights(model, ckpt, config_file=config_file)
    else:
        print("WARNING: no train.init_checkpoint given: exporting random weights")
    return cfg, model


def test_resize(cfg):
    """The config's test-time augmentations (its test mapper), as an AugmentationList."""
    try:
        augs = instantiate(cfg.dataloader.test.mapper).augmentations
    except Exception as e:  # noqa: BLE001 - any config without a usable test mapper
        raise ConfigError(f"--verify needs dataloader.test.mapper in the config ({e})") from None
    return augs if isinstance(augs, T.AugmentationList) else T.AugmentationList(list(augs))


def default_canvas(cfg, model):
    try:
        size = int(cfg.dataloader.test.mapper.augmentations.max_size)
    except Exception:  # noqa: BLE001
        size = 1333
    d = max(int(model.size_divisibility), 1)
    size = (size + d - 1) // d * d
    return (size, size)


def list_images(items):
    exts = (".jpg", ".jpeg", ".png", ".bmp")
    files = []
    for item in items:
        if os.path.isdir(item):
            files += sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(exts)
            )
        elif os.path.isfile(item):
            files.append(item)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"--verify: {item!r} is neither an image nor a folder")
            files += matches
    return files


def verify(cfg, model, path, files, canvas, input_dtype):
    resize = test_resize(cfg)
    onnx_model = OnnxDetector(path)
    wrapper = ExportableStageInteractor(model).eval()
    worst = {"max_box_px": 0.0, "max_box_rel": 0.0, "max_score": 0.0}
    all_ok = True
    print(
        f"{'image':40s} {'net h x w':>10s} {'k':>4s} {'box px':>10s} {'box rel':>10s} "
        f"{'score':>10s} {'cls!=':>5s} ok"
    )
    for f in files:
        rgb = read_image(f, format="RGB")
        h0, w0 = rgb.shape[:2]
        aug = T.AugInput(rgb)
        resize(aug)
        chw = np.ascontiguousarray(aug.image.transpose(2, 0, 1))
        h, w = chw.shape[1:]
        if model.input_format == "BGR":
            chw = chw[::-1].copy()
        image = place_on_canvas(chw, canvas)
        if input_dtype == "float32":
            image = image.astype(np.float32)
        out = onnx_model(image, (h, w), (h0, w0))
        if canvas is None:
            ref = torch_reference(model, torch.from_numpy(chw), (h0, w0))
        else:
            with torch.no_grad():
                b, s, c = wrapper(
                    torch.from_numpy(image), torch.tensor([h, w]), torch.tensor([h0, w0])
                )
            ref = {"boxes": b.numpy(), "scores": s.numpy(), "classes": c.numpy()}
        r = compare_detections(ref, out, (h0, w0))
        all_ok &= bool(r["ok"])
        for k in worst:
            worst[k] = max(worst[k], r[k])
        print(
            f"{os.path.basename(f)[:40]:40s} {f'{h}x{w}':>10s} {int(r['num']):4d} "
            f"{r['max_box_px']:10.3e} {r['max_box_rel']:10.3e} {r['max_score']:10.3e} "
            f"{int(r['class_mismatch']):5d} {'yes' if r['ok'] else 'NO'}"
        )
    print(
        f"verify: {len(files)} images, max box error {worst['max_box_px']:.3e} px "
        f"({worst['max_box_rel']:.3e} of the image size, tol 1e-3), max score error "
        f"{worst['max_score']:.3e} (tol 1e-4): {'PASS' if all_ok else 'FAIL'}"
    )
    return all_ok


def main(argv=None) -> int:
    """The command line (also callable in-process); returns the exit status."""
    return run_tool(_main, argv, tool="export_onnx")


def _main(argv) -> int:
    args = parse_args(argv)
    with torch.no_grad():  # scoped: main() is also called in-process (tests, notebooks)
        return _run(args)


def _run(args) -> int:
    files = list_images(args.verify)[: args.max_verify] if args.verify else []
    cfg, model = load_model(args.config_file, args.opts)
    canvas = tuple(args.image_size) if args.image_size else default_canvas(cfg, model)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    t0 = time.perf_counter()
    export_onnx(
        model,
        args.output,
        image_size=canvas,
        dynamic_size=args.dynamic_size,
        opset=args.opset,
        input_dtype=args.input_dtype,
    )
    size_txt = "dynamic H x W" if args.dynamic_size else f"{canvas[0]}x{canvas[1]}"
    print(
        f"exported {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB, opset "
        f"{args.opset}, {size_txt}, {time.perf_counter() - t0:.1f} s)"
    )
    if not args.verify:
        return 0
    ok = verify(
        cfg, model, args.output, files, None if args.dynamic_size else canvas, args.input_dtype
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
