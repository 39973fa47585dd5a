#!/usr/bin/env python3
"""The embedded demo (what ``make demo`` runs): train, evaluate and draw a small detector on CPU.

    python tools/run_demo.py [--model stageinteractor|adamixer|both] [--output-dir output/demo]
                             [--max-iter N] [--skip-train] [--num-images 4] [--threads 1]
                             [--val-images N]

For each selected model (``configs/demo/<model>_demo.py``) it

1. generates the synthetic demo dataset on first use (``datasets/stageinteractor_demo``, see
   ``stageinteractor/d2/data/demo_dataset.py``);
2. trains it with ``tools/train_net.py`` (progress and ETA come from train_net's writers; the
   last iteration runs the COCO evaluation on the val split) into ``<output-dir>/<model>/``,
   unless ``--skip-train`` (then ``<output-dir>/<model>/model_final.pth`` must exist);
3. evaluates the final checkpoint again with ``tools/train_net.py --eval-only
   train.init_checkpoint=<output-dir>/<model>/model_final.pth`` and checks that it reproduces
   the training-time evaluation exactly (the run fails if it does not);
4. draws detections and per-stage sampling points on the first ``--num-images`` val images with
   ``tools/demo.py`` into ``<output-dir>/<model>/vis/``;

and ends with the COCO table of every model and where the pictures are. Everything runs in this
one process (the tools are imported, not spawned), so the result is deterministic under the
configs' fixed seed (for a given ``--threads``; the default is one torch thread, which is the
fastest setting for these small models and does not collapse on a loaded machine the way a
two-thread team does). ``--val-images N`` evaluates on the first N val images only (a quick smoke
run; the AP is then not comparable with the full val split). A mistake ends in one line
(``run_demo: error: ...``, or the line of the tool it ran) and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from stageinteractor.requirements import require  # noqa: E402

# the demo trains with detectron2 and draws its pictures with tools/demo.py (cv2)
require("tools/run_demo.py", "detectron2", "cv2")

from stageinteractor.errors import UserError, run_tool  # noqa: E402

MODELS = ("stageinteractor", "adamixer")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools folder is not a package)."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_stageinteractor_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=MODELS + ("both",), default="stageinteractor",
                   help="which demo config(s) to run (default: stageinteractor)")
    p.add_argument("--output-dir", default=os.path.join("output", "demo"),
                   help="parent folder; each model writes into <output-dir>/<model>")
    p.add_argument("--max-iter", type=int, default=None,
                   help="override train.max_iter (the schedule scales with it)")
    p.add_argument("--skip-train", action="store_true",
                   help="do not train; evaluate and draw <output-dir>/<model>/model_final.pth")
    p.add_argument("--num-images", type=int, default=4, help="val images to draw (default 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the demo's small ops run fastest on "
                        "one thread, and two threads slow down badly on a shared machine)")
    p.add_argument("--val-images", type=int, default=None,
                   help="evaluate on the first N val images only (smoke runs)")
    args = p.parse_args(argv)
    if args.max_iter is not None and args.max_iter < 1:
        p.error(f"--max-iter must be >= 1, got {args.max_iter}")
    if args.num_images < 0:
        p.error(f"--num-images must be >= 0, got {args.num_images}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.val_images is not None and args.val_images < 1:
        p.error(f"--val-images must be >= 1, got {args.val_images}")
    return args


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def val_subset(n: int, out_dir: str) -> str:
    """Register the first ``n`` val images as ``stageinteractor_demo_val_first{n}``; returns it.

    The subset json is written to ``out_dir``; a name registered earlier in this process (for
    another output folder) is replaced.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from stageinteractor.d2.data import (
        DEMO_CLASSES,
        DEMO_VAL,
        ensure_demo_dataset,
        register_coco_json,
    )

    base = ensure_demo_dataset()
    with open(os.path.join(base, "annotations", "instances_val.json")) as f:
        coco = json.load(f)
    images = sorted(coco["images"], key=lambda im: im["id"])[:n]
    keep = {im["id"] for im in images}
    coco["images"] = images
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"instances_val_first{n}.json")
    with open(path, "w") as f:
        json.dump(coco, f, sort_keys=True)
    name = f"{DEMO_VAL}_first{n}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    return register_coco_json(name, path, os.path.join(base, "val"),
                              metadata={"thing_classes": list(DEMO_CLASSES)})


def val_images(n: int) -> List[str]:
    from stageinteractor.d2.data import ensure_demo_dataset

    folder = os.path.join(ensure_demo_dataset(), "val")
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:n]]


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def training_eval(out_dir: str) -> Dict[str, float]:
    """The last ``bbox/*`` record of ``metrics.json`` (the evaluation at the last iteration)."""
    path = os.path.join(out_dir, "metrics.json")
    found: Dict[str, float] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if "bbox/AP" in rec:
                found = {k.split("/", 1)[1]: float(v) for k, v in rec.items()
                         if k.startswith("bbox/")}
    if not found:
        raise RuntimeError(f"{path} holds no bbox/AP record: the training-time evaluation did "
                           "not run (is train.eval_period > 0?)")
    return found


def same_results(a: Dict[str, float], b: Dict[str, float]) -> bool:
    keys = set(a) | set(b)
    return all(k in a and k in b and (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))
               for k in keys)


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{res.get(m, float('nan')):.2f}"
                                                 for m in METRICS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------------
def run_model(model: str, args: argparse.Namespace, train_net, demo) -> Dict:
    config = os.path.join(REPO_ROOT, "configs", "demo", f"{model}_demo.py")
    out = os.path.abspath(os.path.join(args.output_dir, model))
    common = [f"train.output_dir={out}", f"dataloader.evaluator.output_dir={out}"]
    if args.val_images is not None:
        common.append(f"dataloader.test.dataset.names={val_subset(args.val_images, out)}")
    final = os.path.join(out, "model_final.pth")
    banner = f"==== [{model}] "
    t0 = time.time()
    if not args.skip_train:
        train_opts = list(common)
        if args.max_iter is not None:
            # evaluate once, at the last iteration; checkpoint only at the end
            train_opts += [f"train.max_iter={args.max_iter}", f"train.eval_period={args.max_iter}",
                           f"train.checkpointer.period={args.max_iter}"]
        print(f"{banner}training: python tools/train_net.py --config-file "
              f"{os.path.relpath(config, REPO_ROOT)} {' '.join(train_opts)}", flush=True)
        rc = train_net.cli(["--config-file", config] + train_opts)
        if rc != 0:  # train_net printed its one line
            raise SystemExit(rc)
    elif not os.path.isfile(final):
        raise UserError(f"--skip-train but {final} does not exist; train first "
                        f"(python tools/run_demo.py --model {model})")
    t_train = time.time() - t0

    print(f"{banner}evaluating {final} (--eval-only)", flush=True)
    t1 = time.time()
    cfg_args = train_net.parse_args(
        ["--config-file", config, "--eval-only", f"train.init_checkpoint={final}"] + common)
    res = train_net.main(cfg_args)
    evaluated = {k: float(v) for k, v in res["bbox"].items()}
    t_eval = time.time() - t1
    reproduced = None
    if not args.skip_train:
        at_train = training_eval(out)
        reproduced = same_results(at_train, evaluated)
        if not reproduced:
            raise SystemExit(
                f"run_demo: --eval-only of {final} gave {evaluated}, but the training-time "
                f"evaluation gave {at_train}: not reproduced")
        print(f"{banner}--eval-only reproduces the training-time evaluation exactly", flush=True)

    vis_dir = os.path.join(out, "vis")
    pictures: List[str] = []
    if args.num_images:
        images = val_images(args.num_images)
        print(f"{banner}drawing {len(images)} val images -> {vis_dir}", flush=True)
        rc = demo.main(["--config-file", config, "--checkpoint", final, "--input", *images,
                        "--output", vis_dir, "--sampling-points"])
        if rc != 0:  # demo printed its one line
            raise SystemExit(rc)
        pictures = sorted(os.path.join(vis_dir, f) for f in os.listdir(vis_dir))
    return {"results": evaluated, "reproduced": reproduced, "train_s": t_train,
            "eval_s": t_eval, "output_dir": out, "vis_dir": vis_dir, "pictures": pictures}


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status."""
    return run_tool(_main, argv, tool="run_demo")


def _main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    models = MODELS if args.model == "both" else (args.model,)
    import torch

    torch.set_num_threads(args.threads)
    train_net = _load_tool("train_net")
    demo = _load_tool("demo")
    import stageinteractor.d2.data  # noqa: F401 - registers the demo datasets

    summary = {m: run_model(m, args, train_net, demo) for m in models}

    print("\n==== demo results (COCO bbox, val split"
          + (f", first {args.val_images} images" if args.val_images else "") + ")")
    print(format_table({m: s["results"] for m, s in summary.items()}))
    for m, s in summary.items():
        check = {True: "reproduced exactly by --eval-only", None: "(--skip-train: not compared)",
                 False: "NOT reproduced"}[s["reproduced"]]
        print(f"{m}: train {s['train_s'] / 60:.1f} min, eval {s['eval_s']:.0f} s; "
              f"training-time evaluation {check}")
        print(f"  checkpoint: {os.path.join(s['output_dir'], 'model_final.pth')}")
        print(f"  pictures:   {s['vis_dir']}/ ({len(s['pictures'])} files: detections X.jpg, "
              "sampling points X_points.jpg)")
    with open(os.path.join(args.output_dir, "demo_summary.json"), "w") as f:
        json.dump({m: {k: v for k, v in s.items() if k != "pictures"}
                   for m, s in summary.items()}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
