"""Peak training memory of a model: CUDA allocator peak, or on the CPU the resident-memory peak
of a fresh process.

CPU (:func:`measure_memory_cpu`): one fresh ``python -m stageinteractor.benchmark.memory``
process per measurement, alternating the models. In it the baseline is the resident memory after
the imports (VmRSS, with the kernel's high-water mark VmHWM reset there through
``/proc/self/clear_refs``, Linux >= 4.0); the peak is VmHWM after building the model and two
training steps; the figure is peak - baseline (weights, optimizer state and activations;
interpreter and libraries excluded). Without ``clear_refs``: ``ru_maxrss`` after the steps minus
``ru_maxrss`` after the imports. The process prints one line ``MEMORY_RESULT {json}``.

CUDA (:func:`measure_memory_cuda`): ``max_memory_allocated`` over two training steps in this
process, after ``reset_peak_memory_stats``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from stageinteractor.process_memory import RESULT_PREFIX, reset_peak_rss, rss_bytes, status_kib

from .log import log

__all__ = [
    "worker_command",
    "parse_result",
    "measure_memory_cpu",
    "measure_official_memory",
    "measure_memory_cuda",
]

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_command(
    config_file: str, opts: Sequence[str], image_size: Tuple[int, int], batch_size: int,
    threads: int = 0, amp: bool = False, compile: bool = False,
) -> List[str]:
    """The command line of one fresh-process measurement."""
    cmd = [sys.executable, "-m", "stageinteractor.benchmark.memory", "--config-file", config_file,
           "--image-size", str(image_size[0]), str(image_size[1]),
           "--batch-size", str(batch_size)]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--amp"] if amp else []
    cmd += ["--compile"] if compile else []
    return cmd + ["--", *opts]


def parse_result(stdout: str) -> Optional[Dict[str, Any]]:
    """The JSON of the ``MEMORY_RESULT`` line of a worker's output (None without one)."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    return None if line is None else json.loads(line[len(RESULT_PREFIX):])


def measure_memory_cpu(
    which: Dict[str, Tuple[str, Sequence[str]]], repeats: int, image_size: Tuple[int, int],
    batch_size: int, threads: int = 0, amp: bool = False, compile: bool = False,
) -> Dict[str, List[int]]:
    """``which``: name -> (config_file, opts). ``repeats`` fresh processes per model, the models
    alternating; name -> peak training bytes per process."""
    res: Dict[str, List[int]] = {n: [] for n in which}
    env = dict(os.environ)  # the worker imports this package from where this file lives
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    for r in range(repeats):
        for n, (cfg, opts) in which.items():
            cmd = worker_command(cfg, opts, image_size, batch_size, threads, amp, compile)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            result = parse_result(proc.stdout)
            if proc.returncode != 0 or result is None:
                raise RuntimeError(
                    f"memory worker for {n} ({cfg}) failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}"
                )
            res[n].append(result["train_peak_memory_bytes"])
            log(f"memory {r + 1}/{repeats} {n}: {res[n][-1] / 2**20:.1f} MiB")
    return res


def measure_official_memory(python: str, worker: str, repo: str, image_size: Tuple[int, int],
                            batch_size: int, threads: int, repeats: int) -> List[int]:
    """Peak training memory of the authors' training step: ``repeats`` fresh processes of their
    Python running ``worker --memory`` (:mod:`stageinteractor.official.train_worker`, measured
    as ours)."""
    res: List[int] = []
    cmd = [python, worker, "--repo", repo, "--size", str(image_size[0]), str(image_size[1]),
           "--batch", str(batch_size), "--memory"]
    cmd += ["--threads", str(threads)] if threads else []
    for r in range(repeats):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result = parse_result(proc.stdout)
        if proc.returncode != 0 or result is None:
            raise RuntimeError(f"the authors' memory worker failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        res.append(result["train_peak_memory_bytes"])
        log(f"memory {r + 1}/{repeats} official: {res[-1] / 2**20:.1f} MiB")
    return res


def measure_memory_cuda(models: Dict[str, Any], batches: Dict[str, Any], device: str,
                        amp: bool) -> Dict[str, List[int]]:
    """name -> [allocator peak bytes over two training steps]."""
    import torch

    from .steps import train_fn

    res = {}
    for n, m in models.items():
        step = train_fn(m, batches[n], device, amp)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        res[n] = [int(torch.cuda.max_memory_allocated())]
    return res


def _worker(argv=None) -> None:
    """The fresh process: prints ``MEMORY_RESULT {peak_rss_bytes, baseline_rss_bytes, method,
    train_peak_memory_bytes}``."""
    p = argparse.ArgumentParser()
    p.add_argument("--config-file", required=True)
    p.add_argument("--image-size", nargs=2, type=int, required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("opts", nargs="*", default=[])
    args = p.parse_args(argv)
    import torch

    from .models import build_model, is_stageinteractor, load_model_config, make_batch
    from .steps import train_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, info = load_model_config(args.config_file, args.opts, "cpu")  # imports its modules
    if reset_peak_rss():
        method, base = "VmHWM-VmRSS(after imports)", status_kib("VmRSS") * 1024
    else:
        method = "ru_maxrss delta"
        base = rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    model, _ = build_model(args.config_file, args.opts, "cpu", model_cfg, info)
    if args.compile and is_stageinteractor(model):
        model.decoder = torch.compile(model.decoder)
    h, w = args.image_size
    step = train_fn(model, make_batch(model, args.batch_size, h, w), "cpu", args.amp)
    for _ in range(2):
        step()
    if method.startswith("VmHWM"):
        peak = status_kib("VmHWM") * 1024
    else:
        peak = rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {"peak_rss_bytes": peak, "baseline_rss_bytes": base, "method": method,
              "train_peak_memory_bytes": max(0, peak - base)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    import torch  # noqa: F401  (imports before the baseline reading)
    import detectron2.config  # noqa: F401
    import scipy.optimize  # noqa: F401  (the matcher's; loaded lazily otherwise)

    import stageinteractor.d2.engine  # noqa: F401

    _x = torch.ones(2, requires_grad=True)  # autograd engine start-up before the baseline
    (_x * 2).sum().backward()
    _worker()
