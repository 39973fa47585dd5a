#!/usr/bin/env python3
"""Speed, memory, FLOPs, parameters and aten-call counts of one or two LazyConfig models.

    python tools/benchmark.py --config-file A [--compare-config B] [--compare-opts k=v ...]
        [--device cpu|cuda] [--image-size H W] [--batch-size N] [--iters N] [--warmup N]
        [--train] [--amp] [--compile] [--json PATH] [--count-ops] [--stress N] [--decoder-only]
        [--threads T] [--memory-repeats R] [--official-python PY --official-repo DIR]
        [--no-roofline] [--perturb-decoder S] [key=value ...]

* Trailing ``key=value`` overrides apply to A, ``--compare-opts`` to B. ``--compare-opts``
  without ``--compare-config`` compares A's config with itself plus those overrides (e.g. CSLA
  off: ``--compare-opts model.criterion.assigner.enabled=False``).
* Works for configs/ (StageInteractor, AdaMixer) and detrex configs (their own model; on CPU a
  detrex ``DINO`` is swapped for the device-agnostic DINO of ``stageinteractor.detrex_ext``).
  Weights are random (speed and memory do not depend on them). Inputs: synthetic uint8 images
  of ``--image-size`` with 8 random ground-truth boxes each (training).
* Timings: A and B are measured **interleaved in one process** (ABBA order per iteration), so
  machine noise hits both; every figure comes with its spread (median, quartiles, min, max) and
  the ratios are ratios of medians (``*_paired`` = median of per-iteration A/B ratios;
  ``*_cpu`` = the same from the process CPU time per call, robust to other processes' load
  with ``--threads 1``).
  Inference = ``model(batch)`` in eval mode under ``no_grad`` (images/s = batch / time);
  ``--train`` adds the training step (forward + backward + AdamW step); ``--decoder-only`` times
  only the decoder (+ top-k) on precomputed neck outputs and skips the whole-model figures.
* Peak training memory: CUDA = allocator peak (``max_memory_allocated``) over the training steps;
  CPU = in a **fresh subprocess per measurement**: the peak resident memory (kernel high-water
  mark VmHWM, reset after the imports via /proc/self/clear_refs; fallback ``ru_maxrss``) over
  model build + 2 training steps, minus the resident memory after the imports (i.e. weights,
  optimizer state and activations; interpreter and libraries excluded), repeated
  ``--memory-repeats`` times alternating A and B.
* FLOPs: fvcore with handles for every matrix product incl. ``bmm``/``baddbmm``/``matmul``/SDPA
  (``stageinteractor.d2.flops``), batch 1 at ``--image-size``; 1 FLOP = 1 multiply-add.
* ``--count-ops``: aten calls (``stageinteractor.core.op_count``) of one batch-1 ``no_grad``
  decoder inference (query generator, stages, top-k; no backbone/neck) and of the forward of one
  training step (decoder + criterion as configured), per stage and per op; counted at
  min(H, 256) x min(W, 384) (the count depends on the code path, not on the image size).
  Also the host syncs (``stageinteractor.d2.sync_count``: scalar reads, device->host and
  blocking host->device copies, data-dependent shapes) of one whole training step and one
  inference at ``--batch-size``, same size (JSON ``host_syncs``).
* Load: 1-minute load average and the CPU share used by *other* processes during the run
  (``/proc/stat`` busy time minus this process's and its children's CPU time, over wall time x
  cores); a warning is printed when the machine is busy. ``--stress N`` starts N CPU-bound
  worker processes (self-terminating after a time limit, stopped by this tool, also on Ctrl-C)
  and reports each model's slowdown (stressed / idle median) for the decoder and the backbone.
* The authors' model in the same run (``--official-python PY --official-repo DIR``, default
  ``$OFFICIAL_PY``/``$OFFICIAL_REPO``; ``../shared/tools/official_runtime/setup.sh`` builds such
  an environment): ``tools/official_reference.py`` runs in that Python as a persistent worker
  (separate process, same threads, same image size, batch 1, float32, eager) and each of its
  calls is timed inside the worker, interleaved with ours: its decoder (``--decoder-only``) or
  its whole model (backbone to boxes; otherwise), also under ``--stress`` (decoder and
  backbone). Reported: its spread, ``ratios_vs_official`` = authors' / ours (ratio of medians,
  median of per-iteration ratios, ratio of CPU-time medians; > 1 = ours faster) and, with
  ``--count-ops``, its decoder's aten calls. Skipped with a one-line reason when not given.
  Both decoders' weights are random, perturbed by ``--perturb-decoder`` (0.02 * N(0, 1), as the
  reference does) so that queries sample different points.
* CPU allocator (``--malloc``, default ``system`` = glibc's defaults, as a user's process runs):
  ``--malloc retain`` keeps freed memory for reuse (``stageinteractor.cpu_allocator``; glibc
  ``mallopt``, for the authors' worker through glibc's environment variables, both sides alike)
  so that large per-call tensors do not page-fault anew on every call. Peak-memory subprocesses
  always run with the defaults. Recorded in the JSON (``malloc``).
* Roofline: a 2048^3 float32 ``mm`` is timed interleaved with the models (``--no-roofline``
  skips it); ``roofline`` gives its multiply-add rate and the decoder's / whole model's achieved
  rate (fvcore multiply-adds / median time) as a fraction of it, also for the authors' model
  (same function, our count).

JSON (``--json``): ``{"settings", "load", "a", "b", "ratios", "stress", "official",
"ratios_vs_official", "roofline"}`` (``stress.vs_official``: authors' / ours idle and stressed,
``stress.roofline``: sgemm rate idle and stressed); ``a``/``b`` hold
``params``, ``flops``, ``inference_images_per_s``, ``train_step_s``, ``train_peak_memory_bytes``
(medians; ``*_spread`` dicts alongside), ``decoder_only_s``, ``decoder_aten_calls``,
``decoder_aten_calls_train``, ``decoder_aten_calls_by_op`` (+ ``_by_stage``), ``host_syncs``
(``{"train_step": {...}, "inference": {...}}``) and ``load_info``.
"""

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ statistics
def spread(values: Sequence[float]) -> Optional[Dict[str, Any]]:
    """median, quartiles, IQR, min, max of a list (None if empty)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
        "values": xs,
    }


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b in (None, 0) else float(a) / float(b)


def speedups(theirs: Sequence[float], ours: Sequence[float]) -> Dict[str, float]:
    """theirs / ours of interleaved timings: ratio of medians and median of per-iteration ratios
    (> 1: ours is faster)."""
    return {
        "median": statistics.median(theirs) / statistics.median(ours),
        "paired": statistics.median([t / o for t, o in zip(theirs, ours)]),
    }


# ------------------------------------------------------------------------------------ load
def _proc_stat_busy() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        v = [int(x) for x in parts[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf(
            "SC_CLK_TCK"
        )
    except (OSError, ValueError, IndexError):
        return None


def _pid_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, from /proc/<pid>/stat (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0.0


def _own_cpu(live_pids: Tuple[int, ...] = ()) -> float:
    """This process's CPU time, its waited-for children's, and that of the live helper processes
    ``live_pids`` (e.g. the authors' reference worker: a child's CPU time enters
    ``children_user`` only once it has exited and been waited for)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(map(_pid_cpu, live_pids))


def _loadavg1() -> Optional[float]:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


class LoadMonitor:
    """Machine load during a section: 1-min load average (start/end) and the CPU share of other
    processes = (machine busy time - own CPU time) / (wall time x cores). ``live_pids``: helper
    processes of this run that stay alive across the section (their CPU time counts as own)."""

    def __init__(self, live_pids: Tuple[int, ...] = ()):
        self.ncpu = os.cpu_count() or 1
        self.live_pids = tuple(live_pids)
        self.t0, self.busy0 = time.perf_counter(), _proc_stat_busy()
        self.own0 = _own_cpu(self.live_pids)
        self.load_start = _loadavg1()

    def result(self) -> Dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy1, own1 = _proc_stat_busy(), _own_cpu(self.live_pids)
        others = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            others = max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / (wall * self.ncpu))
        res = {
            "loadavg_1min_start": self.load_start,
            "loadavg_1min_end": _loadavg1(),
            "cpus": self.ncpu,
            "other_processes_cpu_share": others,
            "own_cpu_s": own1 - self.own0,
            "wall_s": wall,
        }
        loads = [x for x in (res["loadavg_1min_start"], res["loadavg_1min_end"]) if x is not None]
        res["busy"] = bool(
            (others is not None and others > 0.2) or (loads and max(loads) > 0.75 * self.ncpu)
        )
        return res


# ------------------------------------------------------------------------------------ stress
_BUSY_LOOP = (
    "import sys, time\nend = time.time() + float(sys.argv[1])\nx = 0\n"
    "while time.time() < end:\n    x += 1\n"
)


class Stressor:
    """N CPU-bound worker processes (each exits by itself after ``limit_s``); stopped on exit of the
    ``with`` block (also on Ctrl-C / exceptions) by their process ids."""

    def __init__(self, num: int, limit_s: float):
        self.num, self.limit_s = num, limit_s
        self.procs: List[subprocess.Popen] = []

    def __enter__(self):
        for _ in range(self.num):
            self.procs.append(
                subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(self.limit_s)])
            )
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return False


# ------------------------------------------------------------------------------------ models
def _add_import_roots(config_file: str) -> None:
    """detrex configs import ``projects.<name>``: put the repository root above ``projects/``
    (and detrex's checkout) on sys.path."""
    path = os.path.abspath(config_file)
    marker = os.sep + "projects" + os.sep
    roots = [path[: path.index(marker)]] if marker in path else []
    try:
        import detrex

        roots.append(os.path.dirname(os.path.dirname(os.path.abspath(detrex.__file__))))
    except ImportError:
        pass
    for root in roots:
        if os.path.isdir(os.path.join(root, "projects")) and root not in sys.path:
            sys.path.append(root)


def load_model_config(config_file: str, opts: Sequence[str], device: str):
    """Load a LazyConfig, apply the overrides strictly and make ``model`` buildable on ``device``
    (detrex DINO -> device-agnostic DINO on CPU). Returns (model config node, info dict)."""
    from detectron2.config import LazyConfig

    from stageinteractor.d2.engine import apply_overrides_strict

    if not os.path.isfile(config_file):
        raise SystemExit(f"benchmark: config file {config_file!r} does not exist")
    _add_import_roots(config_file)
    cfg = LazyConfig.load(config_file)
    cfg = apply_overrides_strict(cfg, list(opts))
    if "model" not in cfg:
        raise SystemExit(f"benchmark: config {config_file} has no top-level 'model'")
    swapped = False
    if device == "cpu":
        try:
            from stageinteractor.detrex_ext.swap import use_device_agnostic_dino

            use_device_agnostic_dino(cfg.model)
            swapped = True
        except (ImportError, ValueError):
            pass  # not a detrex DINO model
    if "device" in cfg.model:
        cfg.model.device = device
    return cfg.model, {
        "config_file": config_file,
        "opts": list(opts),
        "device_agnostic_dino": swapped,
    }


def build_model(config_file: str, opts: Sequence[str], device: str, model_cfg=None, info=None):
    """Instantiate a LazyConfig's ``model`` (random weights) on ``device``: (model, info)."""
    from detectron2.config import instantiate

    if model_cfg is None:
        model_cfg, info = load_model_config(config_file, opts, device)
    t0 = time.perf_counter()
    model = instantiate(model_cfg).to(device)
    info = dict(info, **{"class": type(model).__qualname__, "build_s": time.perf_counter() - t0})
    return model, info


def is_stageinteractor(model) -> bool:
    return all(hasattr(model, a) for a in ("extract_features", "decoder", "criterion")) and hasattr(
        model.decoder, "stages"
    )


def _num_classes(model) -> int:
    for obj in (getattr(model, "decoder", None), model):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int):
            return n
    return 80


def make_batch(model, batch: int, h: int, w: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Synthetic detectron2 batch: uint8 (3, h, w) images with 8 ground-truth boxes each."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(8, 2, generator=g)) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, _num_classes(model), (8,), generator=g)
        out.append({"image": img, "height": h, "width": w, "instances": inst})
    return out


def _decoder_module(model):
    if hasattr(model, "decoder"):
        return model.decoder
    tr = getattr(model, "transformer", None)
    return getattr(tr, "decoder", None)


def _stage_list(decoder) -> Optional[Any]:
    for name in ("stages", "layers"):
        if decoder is not None and hasattr(decoder, name):
            return getattr(decoder, name)
    return None


# ------------------------------------------------------------------------------------ params
def param_counts(model) -> Dict[str, Any]:
    """Total / trainable parameters, per top-level module and per decoder stage."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    res = {
        "total": count(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "modules": {n: count(m) for n, m in model.named_children()},
    }
    dec = _decoder_module(model)
    stages = _stage_list(dec)
    res["decoder"] = count(dec) if dec is not None else None
    res["decoder_stages"] = [count(s) for s in stages] if stages is not None else []
    return res


# ------------------------------------------------------------------------------------ flops
def _normalized_images(model, batch):
    images = model.preprocess_image(batch)
    return images.tensor, model._image_sizes_tensor(images)


def count_flops(model, h: int, w: int) -> Dict[str, Any]:
    """fvcore FLOPs (incl. batched matrix products) of a batch-1 inference at (h, w)."""
    import torch
    from torch import nn

    from stageinteractor.core.postprocess import topk_detections
    from stageinteractor.d2.flops import flop_analysis, matrix_product_flops

    batch = make_batch(model, 1, h, w)
    model.eval()
    if is_stageinteractor(model):

        class _Inference(nn.Module):
            """Backbone + neck + decoder + top-k; every stage's outputs are returned so that the
            trace keeps the heads of all stages (the eager model computes them)."""

            def __init__(self, m):
                super().__init__()
                self.model = m

            def forward(self, images, sizes):
                outs = self.model.decoder(self.model.extract_features(images), sizes)
                det = topk_detections(
                    outs[-1]["logits"], outs[-1]["boxes"], self.model.max_detections_per_image
                )
                return tuple(o[k] for o in outs for k in ("logits", "boxes")) + (
                    det["scores"],
                    det["boxes"],
                )

        with torch.no_grad():
            analysis = flop_analysis(_Inference(model), _normalized_images(model, batch))
    else:
        with torch.no_grad():
            analysis = flop_analysis(model, batch, detectron2_inputs=True)
    by_module = {
        k[len("model.") :] if k.startswith("model.") else k: int(v)
        for k, v in analysis.by_module().items()
    }
    res = {
        "total": int(analysis.total()),
        "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
        "matrix_products": matrix_product_flops(analysis),
        "modules": {n: by_module.get(n, 0) for n, _ in model.named_children()},
        "unsupported_ops": dict(analysis.unsupported_ops()),
    }
    dec = _decoder_module(model)
    stages = _stage_list(dec)
    dec_name = next((n for n, m in model.named_modules() if m is dec), None)
    if dec_name is not None:
        res["decoder"] = by_module.get(dec_name, 0)
        sname = "stages" if hasattr(dec, "stages") else "layers"
        res["decoder_stages"] = [
            by_module.get(f"{dec_name}.{sname}.{i}", 0) for i in range(len(stages or []))
        ]
    return res


# ------------------------------------------------------------------------------------ op counts
def count_ops(model, h: int, w: int) -> Dict[str, Any]:
    import torch

    from stageinteractor.core.op_count import count_decoder_inference, count_decoder_training
    from stageinteractor.core.postprocess import topk_detections

    batch = make_batch(model, 1, h, w)
    with torch.no_grad():
        model.eval()
        images, sizes = _normalized_images(model, batch)
        feats = [f.detach() for f in model.extract_features(images)]
    k = model.max_detections_per_image
    inf = count_decoder_inference(
        model.decoder,
        feats,
        sizes,
        postprocess=lambda outs: topk_detections(outs[-1]["logits"], outs[-1]["boxes"], k),
    )
    model.train()
    gt_boxes, gt_classes, gt_mask = model.prepare_targets(batch)
    tr = count_decoder_training(
        model.decoder,
        model.criterion,
        feats,
        sizes,
        {"gt_boxes": gt_boxes, "gt_classes": gt_classes, "gt_mask": gt_mask},
    )
    model.zero_grad(set_to_none=True)
    model.eval()
    assigner = getattr(model.criterion, "assigner", None)
    return {
        "inference": inf,
        "train_forward": tr,
        "csla_enabled": getattr(assigner, "enabled", None) if assigner is not None else None,
    }


def count_syncs(model, batch_size: int, h: int, w: int) -> Optional[Dict[str, Any]]:
    """Host syncs (``stageinteractor.d2.sync_count``) of one training step and one inference at
    ``batch_size`` x h x w; None (logged) when the model cannot run them."""
    from stageinteractor.d2.sync_count import count_host_syncs

    log(f"counting host syncs (batch {batch_size}, {h}x{w})")
    try:
        return count_host_syncs(model, make_batch(model, batch_size, h, w))
    except Exception as e:  # noqa: BLE001 - e.g. a detrex model that needs more queries
        log(f"host-sync count failed: {type(e).__name__}: {e}")
        return None


# ------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _autocast(device: str, amp: bool):
    import torch

    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(
        device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16
    )


CPU_TIMES: Dict[str, Dict[str, List[float]]] = {}  # what -> name -> process CPU seconds per call


def interleaved(
    fns: Dict[str, Callable[[], Any]], iters: int, warmup: int, device: str, what: str
) -> Dict[str, List[float]]:
    """Run the callables alternately (ABBA per iteration); wall seconds per call for each.
    The process CPU seconds of each call go to ``CPU_TIMES[what]`` (less sensitive to other
    processes than wall time, most of all with one thread). A callable that returns a dict with
    ``wall_s`` and ``cpu_s`` (the authors' reference, timed inside its own process) is recorded
    with those times."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n]()
        log(f"{what}: warm-up {i + 1}/{warmup}")
    times = {n: [] for n in names}
    cpu = CPU_TIMES.setdefault(what, {n: [] for n in names})
    for i in range(iters):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            r = fns[n]()
            _sync(device)
            wall, used = time.perf_counter() - t0, time.process_time() - c0
            if isinstance(r, dict) and "wall_s" in r:  # timed by another process (the reference)
                wall, used = float(r["wall_s"]), float(r["cpu_s"])
            times[n].append(wall)
            cpu.setdefault(n, []).append(used)
        log(
            f"{what}: {i + 1}/{iters} "
            + "  ".join(f"{n}={times[n][-1]:.3f}s (cpu {cpu[n][-1]:.3f}s)" for n in names)
        )
    return times


def inference_fn(model, batch, device: str, amp: bool):
    import torch

    def run():
        model.eval()
        with torch.no_grad(), _autocast(device, amp):
            model(batch)

    return run


def train_fn(model, batch, device: str, amp: bool):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-4)

    def run():
        model.train()
        with _autocast(device, amp):
            losses = model(batch)
        loss = sum(v for v in losses.values() if torch.is_tensor(v))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def decoder_fns(model, batch, device: str, amp: bool):
    """(decoder-only callable on precomputed neck outputs, backbone+neck callable), or
    (None, None) for models without ``extract_features``/``decoder.stages``."""
    import torch

    from stageinteractor.core.postprocess import topk_detections

    if not is_stageinteractor(model):
        return None, None
    model.eval()
    with torch.no_grad():
        images, sizes = _normalized_images(model, batch)
        feats = [f.detach() for f in model.extract_features(images)]
    k = model.max_detections_per_image

    def dec():
        with torch.no_grad(), _autocast(device, amp):
            out = model.decoder(feats, sizes)[-1]
            topk_detections(out["logits"].float(), out["boxes"].float(), k)

    def backbone():
        with torch.no_grad(), _autocast(device, amp):
            model.extract_features(images)

    return dec, backbone


# ------------------------------------------------------------------------------------ reference
OFFICIAL_WORKER = os.path.join(_REPO_ROOT, "tools", "official_reference.py")


class OfficialReference:
    """The authors' model in a separate process of their own Python (``tools/official_reference.py``,
    a persistent worker speaking a line protocol), so that it is timed in the same run as ours,
    call by call, with the same threads and image size. ``call(cmd)`` sends one command and
    returns the worker's JSON reply; its stderr goes to a temporary file (tail shown on failure)."""

    def __init__(self, python: str, repo: str, threads: int, size, worker: str = OFFICIAL_WORKER,
                 env: Optional[Dict[str, str]] = None):
        import tempfile

        self.python, self.repo, self.worker = python, repo, worker
        self._err = tempfile.TemporaryFile(mode="w+")
        cmd = [python, worker, "--repo", repo, "--size", str(size[0]), str(size[1])]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1,
            env=None if env is None else {**os.environ, **env},
        )
        self.info: Optional[Dict[str, Any]] = None

    def _read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            tail = self._err.read()[-3000:]
            raise RuntimeError(f"official reference worker exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def ready(self) -> Dict[str, Any]:
        """Wait for the start-up line (model built, neck outputs computed)."""
        if self.info is None:
            self.info = self._read()
            if not self.info.get("ready"):
                raise RuntimeError(f"official reference worker: unexpected start-up reply {self.info}")
        return self.info

    def call(self, cmd: str) -> Dict[str, Any]:
        self.ready()
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"official reference worker, {cmd!r}: {reply['error']}")
        return reply

    def fn(self, cmd: str) -> Callable[[], Dict[str, Any]]:
        return lambda: self.call(cmd)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def official_settings(args) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(python, repo, None) of the authors' environment, or (None, None, one-line reason)."""
    py = args.official_python or os.environ.get("OFFICIAL_PY")
    repo = args.official_repo or os.environ.get("OFFICIAL_REPO")
    if not py or not repo:
        return None, None, (
            "authors' reference not given (--official-python/--official-repo or "
            "$OFFICIAL_PY/$OFFICIAL_REPO; ../shared/tools/official_runtime/setup.sh builds them)"
        )
    if not os.path.exists(py):
        return None, None, f"authors' reference: python {py!r} does not exist"
    if not os.path.isdir(repo):
        return None, None, f"authors' reference: repository {repo!r} is not a directory"
    if args.device != "cpu" or args.amp or args.compile or args.batch_size != 1:
        return None, None, "authors' reference: only for float32 eager CPU runs of batch 1"
    return py, repo, None


ROOFLINE_N = 2048


def sgemm_fn(n: int = ROOFLINE_N) -> Callable[[], None]:
    """One n x n x n float32 matrix product (the machine's in-run multiply-add roofline)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    return lambda: torch.mm(a, b, out=c)


def perturb_decoder(model, scale: float, seed: int = 0) -> None:
    """``p += scale * N(0, 1)`` on every decoder parameter (the authors' reference does the same
    to its rpn_head/roi_head): random-init generators have zero weights, so without it all
    queries would sample the same points (cache-friendly, not representative of a trained
    model) and boxes would not move between stages."""
    import torch

    dec = _decoder_module(model)
    if dec is None or scale == 0:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


# ------------------------------------------------------------------------------------ memory
def _rss_bytes(ru_maxrss: int) -> int:
    return int(ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def memory_worker(args) -> None:
    """Fresh-process CPU peak-memory measurement; prints one JSON line.

    Baseline = resident memory after the imports (VmRSS, with the high-water mark VmHWM reset
    there via /proc/self/clear_refs); peak = VmHWM after 2 training steps (model build included).
    Without clear_refs: ``ru_maxrss`` after the steps minus ``ru_maxrss`` after the imports."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, info = load_model_config(
        args.config_file, args.opts, "cpu"
    )  # imports the config's modules
    if _reset_peak_rss():
        method, base = "VmHWM-VmRSS(after imports)", _status_kib("VmRSS") * 1024
    else:
        method, base = "ru_maxrss delta", _rss_bytes(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
    model, _ = build_model(args.config_file, args.opts, "cpu", model_cfg, info)
    if args.compile and is_stageinteractor(model):
        model.decoder = torch.compile(model.decoder)
    h, w = args.image_size
    step = train_fn(model, make_batch(model, args.batch_size, h, w), "cpu", args.amp)
    for _ in range(2):
        step()
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(
        "MEMORY_RESULT "
        + json.dumps(
            {
                "peak_rss_bytes": peak,
                "baseline_rss_bytes": base,
                "method": method,
                "train_peak_memory_bytes": max(0, peak - base),
            }
        ),
        flush=True,
    )


def measure_memory_cpu(args, which: Dict[str, tuple]) -> Dict[str, List[int]]:
    """``which``: name -> (config_file, opts). Fresh subprocess per measurement, alternating."""
    res = {n: [] for n in which}
    for r in range(args.memory_repeats):
        for n, (cfg, opts) in which.items():
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--_memory-worker",
                "--config-file",
                cfg,
                "--image-size",
                str(args.image_size[0]),
                str(args.image_size[1]),
                "--batch-size",
                str(args.batch_size),
            ]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--amp"] if args.amp else []
            cmd += ["--compile"] if args.compile else []
            cmd += ["--", *opts]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next(
                (l for l in proc.stdout.splitlines() if l.startswith("MEMORY_RESULT ")), None
            )
            if proc.returncode != 0 or line is None:
                raise RuntimeError(
                    f"memory worker for {n} ({cfg}) failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}"
                )
            res[n].append(json.loads(line[len("MEMORY_RESULT ") :])["train_peak_memory_bytes"])
            log(f"memory {r + 1}/{args.memory_repeats} {n}: {res[n][-1] / 2**20:.1f} MiB")
    return res


def measure_memory_cuda(
    models: Dict[str, Any], batch, device: str, amp: bool
) -> Dict[str, List[int]]:
    import torch

    res = {}
    for n, m in models.items():
        step = train_fn(m, batch[n], device, amp)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        res[n] = [int(torch.cuda.max_memory_allocated())]
    return res


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """keeps the description's line breaks and shows every option's default"""

    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=_Formatter,
        epilog="examples:\n"
        "  python tools/benchmark.py --config-file configs/stageinteractor/"
        "stageinteractor_r50_100q_1x.py \\\n"
        "      --compare-config configs/adamixer/adamixer_r50_100q_1x.py --train --threads 2\n"
        "  python tools/benchmark.py --config-file configs/stageinteractor/"
        "stageinteractor_r50_100q_1x.py \\\n"
        "      --decoder-only --count-ops --iters 20 --json decoder.json\n"
        "See the module docstring (top of tools/benchmark.py) for what each figure measures.",
    )
    p.add_argument("--config-file", required=True, help="LazyConfig of model A")
    p.add_argument("--compare-config", default=None,
                   help="LazyConfig of model B, measured interleaved with A (none: A only)")
    p.add_argument(
        "--compare-opts",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="overrides for B only (B = A's config when --compare-config is absent)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument("--image-size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"),
                   help="synthetic input image size")
    p.add_argument("--batch-size", type=int, default=1, help="images per call")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    p.add_argument("--train", action="store_true", help="also time training steps and peak memory")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder (whole model for others)"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--count-ops", action="store_true",
                   help="count aten calls of one decoder inference and one training forward")
    p.add_argument("--stress", type=int, default=0, metavar="N",
                   help="also measure with N CPU-bound worker processes running (0 = no)")
    p.add_argument("--decoder-only", action="store_true",
                   help="time only the decoder (+ top-k) on precomputed neck outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=2,
        help="peak-memory measurements per model " "(fresh processes on CPU); 0 = skip",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore FLOP count")
    p.add_argument(
        "--malloc",
        choices=("retain", "system"),
        default="system",
        help="system (default): glibc's defaults, as a user's process runs; retain: keep freed "
        "CPU memory for reuse (glibc mallopt, stageinteractor.cpu_allocator), in this process "
        "and the authors' worker alike, so that large tensors do not page-fault on every call",
    )
    p.add_argument(
        "--official-python",
        default=None,
        metavar="PY",
        help="python of an environment of the authors' code (default $OFFICIAL_PY): their model "
        "is timed in the same run, interleaved with A (tools/official_reference.py)",
    )
    p.add_argument(
        "--official-repo",
        default=None,
        metavar="DIR",
        help="checkout of the authors' repository (default $OFFICIAL_REPO)",
    )
    p.add_argument("--official-worker", default=OFFICIAL_WORKER, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-roofline",
        action="store_true",
        help="skip the in-run 2048^3 sgemm (the multiply-add rate that timings are compared to)",
    )
    p.add_argument(
        "--perturb-decoder",
        type=float,
        default=0.02,
        metavar="S",
        help="add S * N(0, 1) to every decoder parameter (default 0.02, as the authors' "
        "reference): random-init generators are zero, so all queries would sample the same "
        "points; 0 = off",
    )
    p.add_argument("--_memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "opts",
        nargs="*",
        default=[],
        help="overrides of A, key=value (after the options, or "
        "before --compare-opts, whose values run up to the next option)",
    )
    args = p.parse_args(argv)
    args.opts = [o for o in args.opts if o != "--"]
    if args.compare_opts is not None:
        args.compare_opts = [o for o in args.compare_opts if o != "--"]
    for name in ("batch_size", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.stress < 0 or min(args.image_size) < 32 or args.perturb_decoder < 0:
        p.error("--warmup/--stress/--perturb-decoder must be >= 0 and --image-size >= 32")
    return args


def _print_table(res: Dict[str, Any], names: List[str]) -> None:
    def fmt(v, scale=1.0, digits=3):
        return "-" if v is None else f"{v / scale:.{digits}f}"

    rows = [
        ("params (M)", lambda r: fmt(r["params"]["total"], 1e6)),
        ("  decoder params (M)", lambda r: fmt(r["params"]["decoder"], 1e6)),
        ("FLOPs (G)", lambda r: fmt(r["flops"]["total"] if r["flops"] else None, 1e9, 2)),
        ("  decoder FLOPs (G)", lambda r: fmt((r["flops"] or {}).get("decoder"), 1e9, 2)),
        ("inference img/s", lambda r: fmt(r["inference_images_per_s"])),
        ("train step (s)", lambda r: fmt(r["train_step_s"])),
        ("train peak mem (MiB)", lambda r: fmt(r["train_peak_memory_bytes"], 2**20, 1)),
        ("decoder-only (s)", lambda r: fmt(r["decoder_only_s"], 1.0, 4)),
        (
            "  process CPU s: inference",
            lambda r: fmt((r.get("inference_cpu_s_spread") or {}).get("median")),
        ),
        (
            "  process CPU s: train step",
            lambda r: fmt((r.get("train_cpu_s_spread") or {}).get("median")),
        ),
        (
            "  process CPU s: decoder-only",
            lambda r: fmt((r.get("decoder_only_cpu_s_spread") or {}).get("median"), 1.0, 4),
        ),
        ("decoder aten calls", lambda r: str(r["decoder_aten_calls"] or "-")),
        ("decoder aten calls (train fwd)", lambda r: str(r["decoder_aten_calls_train"] or "-")),
    ]
    print(f"{'':32s}" + "".join(f"{n:>16s}" for n in names))
    for label, f in rows:
        print(f"{label:32s}" + "".join(f"{f(res[n]):>16s}" for n in names))


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda but CUDA is not available")
    worker_env = None
    if args.malloc == "retain":
        # both sides alike: ours through mallopt now, the authors' worker through glibc's
        # environment variables (read at its start); memory subprocesses keep glibc's defaults
        from stageinteractor.cpu_allocator import GLIBC_ENV, retain_freed_memory

        args._malloc_applied = retain_freed_memory()
        worker_env = dict(GLIBC_ENV) if args._malloc_applied else None
        log(f"--malloc retain: {'applied' if args._malloc_applied else 'not applicable (not glibc)'}")
    official = None
    off_py, off_repo, off_skip = official_settings(args)
    if off_skip is None:
        log(f"starting the authors' reference: {off_py} {args.official_worker} ({off_repo})")
        official = OfficialReference(  # same threads and allocator settings as ours
            off_py, off_repo, torch.get_num_threads(), args.image_size, worker=args.official_worker,
            env=worker_env,
        )
    else:
        log(f"no same-run comparison with the authors' code: {off_skip}")
    try:
        return _main(args, official, off_skip)
    finally:
        if official is not None:
            official.close()


def _main(args, official: Optional["OfficialReference"], off_skip: Optional[str]) -> Dict[str, Any]:
    import torch

    specs = {"a": (args.config_file, args.opts)}
    if args.compare_config or args.compare_opts is not None:
        specs["b"] = (args.compare_config or args.config_file, args.compare_opts or [])
    names = list(specs)
    h, w = args.image_size
    monitor = LoadMonitor(live_pids=(official.proc.pid,) if official is not None else ())
    models, infos, batches, res = {}, {}, {}, {}
    for n, (cfg, opts) in specs.items():
        log(f"building {n}: {cfg} {' '.join(opts)}")
        models[n], infos[n] = build_model(cfg, opts, args.device)
        if args.perturb_decoder and is_stageinteractor(models[n]):
            perturb_decoder(models[n], args.perturb_decoder)
            infos[n]["decoder_perturbation"] = args.perturb_decoder
        batches[n] = make_batch(models[n], args.batch_size, h, w)
        res[n] = {
            "load_info": infos[n],
            "params": param_counts(models[n]),
            "flops": None,
            "inference_images_per_s": None,
            "inference_s_spread": None,
            "train_step_s": None,
            "train_step_s_spread": None,
            "train_peak_memory_bytes": None,
            "train_peak_memory_spread": None,
            "decoder_only_s": None,
            "decoder_only_s_spread": None,
            "decoder_aten_calls": None,
            "decoder_aten_calls_train": None,
            "decoder_aten_calls_by_op": None,
            "decoder_aten_calls_by_stage": None,
            "decoder_aten_calls_train_by_op": None,
            "decoder_aten_calls_train_by_stage": None,
        }
    for n in names:
        m = models[n]
        if not args.no_flops:
            log(f"{n}: counting FLOPs (fvcore, batch 1, {h}x{w})")
            try:
                res[n]["flops"] = count_flops(m, h, w)
            except Exception as e:  # noqa: BLE001 - a model fvcore cannot trace still gets timed
                log(f"{n}: FLOP count failed: {type(e).__name__}: {e}")
                res[n]["flops"] = {"total": None, "error": f"{type(e).__name__}: {e}"}
        if args.count_ops:
            if is_stageinteractor(m):
                # the count depends on the code path only, not on the image size: a small image
                # (same size-divisibility as the timed one) keeps the backbone pass cheap
                ch, cw = min(h, 256), min(w, 384)
                log(f"{n}: counting decoder aten calls (batch 1, {ch}x{cw})")
                ops = count_ops(m, ch, cw)
                res[n].update(
                    decoder_aten_calls=ops["inference"]["total"],
                    decoder_aten_calls_by_op=ops["inference"]["by_op"],
                    decoder_aten_calls_by_stage=ops["inference"]["by_section"],
                    decoder_aten_calls_train=ops["train_forward"]["total"],
                    decoder_aten_calls_train_by_op=ops["train_forward"]["by_op"],
                    decoder_aten_calls_train_by_stage=ops["train_forward"]["by_section"],
                    csla_enabled=ops["csla_enabled"],
                )
            else:
                log(
                    f"{n}: --count-ops needs a StageInteractor-style model (decoder.stages); "
                    "skipped"
                )
            res[n]["host_syncs"] = count_syncs(m, args.batch_size, min(h, 256), min(w, 384))
    if args.compile:
        for n, m in models.items():
            if is_stageinteractor(m):
                m.decoder = torch.compile(m.decoder)
            else:
                models[n] = torch.compile(m)

    official_res: Dict[str, Any] = {"skipped": off_skip} if official is None else {}
    if official is not None:
        info = official.ready()
        official_res.update(
            python=official.python,
            repo=official.repo,
            torch=info.get("torch"),
            threads=info.get("threads"),
            size=info.get("size"),
        )
        if args.count_ops:
            log("official: counting decoder aten calls")
            cnt = official.call("count")
            official_res["decoder_aten_calls"] = cnt["aten_calls"]
            official_res["decoder_aten_calls_by_op"] = dict(list(cnt["by_op"].items())[:20])
    # same-run extras timed interleaved with the models: the authors' model and the roofline
    extra: Dict[str, Callable[[], Any]] = {}
    if official is not None:
        extra["official"] = official.fn("decoder" if args.decoder_only else "whole")
    if not args.no_roofline:
        extra["sgemm"] = sgemm_fn()

    times = {}
    if args.decoder_only:
        fns = {n: decoder_fns(models[n], batches[n], args.device, args.amp)[0] for n in names}
        fns = {n: f for n, f in fns.items() if f is not None}
        if fns:
            times["decoder_only"] = interleaved(
                dict(fns, **extra), args.iters, args.warmup, args.device, "decoder-only"
            )
    else:
        fns = {n: inference_fn(models[n], batches[n], args.device, args.amp) for n in names}
        times["inference"] = interleaved(
            dict(fns, **extra), args.iters, args.warmup, args.device, "inference"
        )
        if args.train:
            fns = {n: train_fn(models[n], batches[n], args.device, args.amp) for n in names}
            times["train"] = interleaved(fns, args.iters, args.warmup, args.device, "train step")
    cpu_names = {"decoder_only": "decoder-only", "inference": "inference", "train": "train step"}
    for n in names:
        r = res[n]
        if "decoder_only" in times and n in times["decoder_only"]:
            r["decoder_only_s_spread"] = spread(times["decoder_only"][n])
            r["decoder_only_s"] = r["decoder_only_s_spread"]["median"]
            r["decoder_only_images_per_s"] = args.batch_size / r["decoder_only_s"]
        if "inference" in times:
            r["inference_s_spread"] = spread(times["inference"][n])
            r["inference_images_per_s"] = args.batch_size / r["inference_s_spread"]["median"]
        if "train" in times:
            r["train_step_s_spread"] = spread(times["train"][n])
            r["train_step_s"] = r["train_step_s_spread"]["median"]
        for key, what in cpu_names.items():
            if key in times and n in CPU_TIMES.get(what, {}):
                r[f"{key}_cpu_s_spread"] = spread(CPU_TIMES[what][n])
    load = monitor.result()  # load of the timed sections (memory workers and stress excluded)
    if args.train and not args.decoder_only and args.memory_repeats > 0:
        log("peak training memory")
        if args.device == "cuda":
            mem = measure_memory_cuda(models, batches, args.device, args.amp)
        else:
            mem = measure_memory_cpu(args, specs)
        for n in names:
            res[n]["train_peak_memory_spread"] = spread(mem[n])
            res[n]["train_peak_memory_bytes"] = res[n]["train_peak_memory_spread"]["median"]
    for n in names:
        res[n]["load_info"]["load"] = load

    stress = None
    if args.stress:
        stress = {"workers": args.stress, "models": {}}
        fns = {}
        for n in names:
            dec, bb = decoder_fns(models[n], batches[n], args.device, args.amp)
            if dec is not None:
                fns[f"{n}.decoder"], fns[f"{n}.backbone"] = dec, bb
        if fns and official is not None:
            fns["official.decoder"] = official.fn("decoder")
            fns["official.backbone"] = official.fn("backbone")
        if fns and not args.no_roofline:
            fns["roofline.sgemm"] = extra["sgemm"]
        if fns:
            idle = interleaved(fns, args.iters, args.warmup, args.device, "stress: idle")
            limit = 60 + 30 * args.iters * len(fns)
            with Stressor(args.stress, limit):
                busy = interleaved(
                    fns, args.iters, 1, args.device, f"stress: {args.stress} workers"
                )
            for key in fns:
                n, part = key.split(".")
                i_med, s_med = statistics.median(idle[key]), statistics.median(busy[key])
                stress["models"].setdefault(n, {})[part] = {
                    "idle_s": spread(idle[key]),
                    "stressed_s": spread(busy[key]),
                    "slowdown": s_med / i_med,
                }
            if "official.decoder" in fns and "a.decoder" in fns:
                stress["vs_official"] = {
                    f"{part}_speedup_{cond}": speedups(runs[f"official.{part}"], runs[f"a.{part}"])
                    for part in ("decoder", "backbone")
                    for cond, runs in (("idle", idle), ("stressed", busy))
                }
            if "roofline.sgemm" in fns:
                roof = stress["models"].pop("roofline")["sgemm"]
                stress["roofline"] = {
                    "sgemm_idle_macs_per_s": ROOFLINE_N**3 / roof["idle_s"]["median"],
                    "sgemm_stressed_macs_per_s": ROOFLINE_N**3 / roof["stressed_s"]["median"],
                }

    ratios = {}
    if "b" in res:
        a, b = res["a"], res["b"]
        ratios = {
            "inference_images_per_s": _ratio(
                a["inference_images_per_s"], b["inference_images_per_s"]
            ),
            "train_step_s": _ratio(a["train_step_s"], b["train_step_s"]),
            "train_peak_memory_bytes": _ratio(
                a["train_peak_memory_bytes"], b["train_peak_memory_bytes"]
            ),
            "decoder_only_s": _ratio(a["decoder_only_s"], b["decoder_only_s"]),
            "decoder_only_images_per_s": _ratio(b["decoder_only_s"], a["decoder_only_s"]),
            "params": _ratio(a["params"]["total"], b["params"]["total"]),
            "flops": _ratio((a["flops"] or {}).get("total"), (b["flops"] or {}).get("total")),
        }
        for key, src in (
            ("inference_images_per_s_paired", "inference"),
            ("train_step_s_paired", "train"),
            ("decoder_only_s_paired", "decoder_only"),
        ):
            if src in times and "b" in times[src]:
                pr = [x / y for x, y in zip(times[src]["a"], times[src]["b"])]
                ratios[key] = statistics.median([1 / r for r in pr] if src == "inference" else pr)
        for key in cpu_names:
            ca, cb = a.get(f"{key}_cpu_s_spread"), b.get(f"{key}_cpu_s_spread")
            if ca and cb:  # A/B of the per-call process CPU time (inference: of throughput)
                r_ = ca["median"] / cb["median"]
                label = {"inference": "inference_images_per_s", "train": "train_step_s"}.get(
                    key, "decoder_only_s"
                )
                ratios[f"{label}_cpu"] = 1 / r_ if key == "inference" else r_
    ratios_vs_official: Dict[str, Any] = {}
    roofline: Dict[str, Any] = {"skipped": "--no-roofline"} if args.no_roofline else {}
    for key, what, label in (
        ("decoder_only", "decoder-only", "decoder"),
        ("inference", "inference", "whole"),
    ):
        if key not in times:
            continue
        t = times[key]
        if "official" in t and "a" in t:
            official_res[f"{label}_s"] = spread(t["official"])
            official_res[f"{label}_cpu_s"] = spread(CPU_TIMES[what]["official"])
            sp = speedups(t["official"], t["a"])
            sp["cpu"] = statistics.median(CPU_TIMES[what]["official"]) / statistics.median(
                CPU_TIMES[what]["a"]
            )
            ratios_vs_official[label] = sp
        if "sgemm" in t:
            rate = ROOFLINE_N**3 / statistics.median(t["sgemm"])
            roofline.update(
                sgemm_n=ROOFLINE_N,
                sgemm_s=spread(t["sgemm"]),
                sgemm_macs_per_s=rate,
            )
            flops = res["a"]["flops"] or {}
            macs = flops.get("decoder") if label == "decoder" else flops.get("total")
            roofline[f"{label}_macs"] = macs
            if not macs:
                roofline[f"{label}_fraction"] = None
                roofline["note"] = "no FLOP count (--no-flops): fractions not computed"
                continue
            roofline[f"{label}_fraction"] = macs / statistics.median(t["a"]) / rate
            if "official" in t:
                # the same function (same multiply-adds; counted on our model)
                roofline[f"official_{label}_fraction"] = macs / statistics.median(t["official"]) / rate
    out = {
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "malloc": {"mode": args.malloc, "applied": getattr(args, "_malloc_applied", False)},
        "load": load,
        "a": res["a"],
        "b": res.get("b"),
        "ratios": ratios,
        "stress": stress,
        "official": official_res,
        "ratios_vs_official": ratios_vs_official,
        "roofline": roofline,
    }
    _print_table(res, names)
    if ratios:
        print(
            "ratios A/B: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items() if v is not None)
        )
    for n in names:
        if res[n]["decoder_aten_calls_by_stage"]:
            print(
                f"{n}: decoder aten calls per section (inference): "
                f"{res[n]['decoder_aten_calls_by_stage']}"
            )
            print(
                f"{n}: decoder aten calls per section (train fwd): "
                f"{res[n]['decoder_aten_calls_train_by_stage']}"
            )
            top = list(res[n]["decoder_aten_calls_by_op"].items())[:15]
            print(f"{n}: top ops (inference): " + ", ".join(f"{k}={v}" for k, v in top))
    for n in names:
        for what, c in (res[n].get("host_syncs") or {}).items():
            print(f"{n}: host syncs per {what.replace('_', ' ')}: {c['total']} ("
                  + ", ".join(f"{k} {c[k]}" for k in ("scalar", "to_cpu", "to_gpu", "data_dep"))
                  + f"; non-blocking host->device copies {c['to_gpu_async']})")
    if "skipped" in official_res:
        print(f"authors' reference: skipped - {official_res['skipped']}")
    else:
        calls = official_res.get("decoder_aten_calls")
        print(
            f"authors' reference ({official_res['python']}, torch {official_res['torch']}, "
            f"{official_res['threads']} threads): "
            + ", ".join(
                f"{label} median {official_res[label + '_s']['median']:.4f} s"
                for label in ("decoder", "whole")
                if official_res.get(label + "_s")
            )
            + (f", decoder aten calls {calls}" if calls else "")
        )
        for label, sp in ratios_vs_official.items():
            print(
                f"{label}: authors' / ours = {sp['median']:.3f}x (medians), "
                f"{sp['paired']:.3f}x (paired), {sp['cpu']:.3f}x (CPU time)"
            )
    if roofline.get("sgemm_macs_per_s"):
        fr = ", ".join(
            f"{k[: -len('_fraction')]} {100 * v:.1f}%"
            for k, v in roofline.items()
            if k.endswith("_fraction") and v is not None
        )
        print(
            f"roofline: {ROOFLINE_N}^3 sgemm {roofline['sgemm_macs_per_s'] / 1e9:.1f} GMAC/s in this run"
            + (f"; achieved fraction: {fr}" if fr else "")
        )
    if stress:
        for n, parts in stress["models"].items():
            print(
                f"{n}: slowdown under {args.stress} stress workers: "
                + ", ".join(f"{p}={v['slowdown']:.2f}x" for p, v in parts.items())
            )
        for k, v in stress.get("vs_official", {}).items():
            print(f"stress: authors' / ours {k}: {v['median']:.3f}x (medians), {v['paired']:.3f}x (paired)")
    oth = load["other_processes_cpu_share"]
    print(
        f"load: 1-min loadavg {load['loadavg_1min_start']} -> {load['loadavg_1min_end']}, "
        "other processes used "
        f"{'n/a' if oth is None else f'{100 * oth:.0f}%'} of {load['cpus']} CPUs"
    )
    if load["busy"]:
        print(
            "WARNING: the machine was busy during the measurements: absolute timings are noisy; "
            "A/B ratios (interleaved) are more robust",
            file=sys.stderr,
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")
    return out


def _handle_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that `with Stressor(...)` stops its workers


if __name__ == "__main__":
    if "--_memory-worker" in sys.argv:
        import torch  # noqa: F401  (imports before the baseline reading)
        import detectron2.config  # noqa: F401

        import stageinteractor.d2.engine  # noqa: F401
        import scipy.optimize  # noqa: F401  (the matcher's; loaded lazily otherwise)

        _x = torch.ones(2, requires_grad=True)  # autograd engine start-up before the baseline
        (_x * 2).sum().backward()

        memory_worker(parse_args())
    else:
        signal.signal(signal.SIGTERM, _handle_sigterm)
        main()
