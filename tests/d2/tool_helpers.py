"""Helpers for the tests that run the tools through their command lines (tests/d2)."""
import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ((3, "cat"), (7, "dog"))  # non-contiguous ids, as custom data may have


def tool_env(datasets_root, **extra):
    """The tools' environment: this checkout first, one thread, a private datasets root."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(tool, args, env, timeout=300):
    """``python tools/<tool>.py ARGS`` from the checkout; returns (rc, stdout, stderr)."""
    p = subprocess.run([sys.executable, f"tools/{tool}.py", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def make_custom_dataset(root, splits=("train", "val"), n=3):
    """A COCO-json dataset in the layout of configs/common/data/custom.py: ``n`` random 64x48
    images per split, each with one box of every category of :data:`CATEGORIES`."""
    rng = np.random.default_rng(0)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            name = f"{split}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
                root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
            for j, (cid, _) in enumerate(CATEGORIES):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cid,
                             "bbox": [4 + 20 * j, 6, 16, 20], "area": 320, "iscrowd": 0})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns,
             "categories": [{"id": c, "name": name} for c, name in CATEGORIES]}))
    return root


@contextlib.contextmanager
def serve_folder(folder):
    """A local HTTP server over ``folder`` (stands in for a checkpoint URL); yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
