"""The benchmark run of ``tools/benchmark.py``: models A (and B) built, counted, timed
interleaved (with the authors' reference and the roofline), memory, stress, ratios, JSON.

:func:`run` takes the tool's option namespace (its attribute names are the options' ``dest``s:
``config_file``, ``compare_config``, ``compare_opts``, ``opts``, ``device``, ``image_size``,
``batch_size``, ``iters``, ``warmup``, ``train``, ``amp``, ``compile``, ``json``, ``count_ops``,
``stress``, ``decoder_only``, ``threads``, ``memory_repeats``, ``no_flops``, ``malloc``,
``official_python``, ``official_repo``, ``official_worker``, ``no_roofline``,
``perturb_decoder``) and returns the JSON document (see the tool's docstring for its keys).
"""

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from .counts import count_flops, count_ops, count_syncs
from .load import LoadMonitor
from .log import log
from .memory import measure_memory_cpu, measure_memory_cuda, measure_official_memory
from .models import (
    build_model,
    is_stageinteractor,
    load_model_config,
    make_batch,
    param_counts,
    perturb_decoder,
)
from .report import ab_ratios, empty_result, official_ratios, print_summary, side_figures
from .roofline import ROOFLINE_N, interleave_roofline, measure_once, roofline_figures, sgemm_fn
from .stats import ratio, spread
from .steps import amp_dtype, decoder_fns, inference_fn, train_fn
from .stress import Stressor, stress_summary
from .timing import interleaved

__all__ = ["run", "start_reference", "model_specs", "References", "TRAIN_WORKER"]

#: the authors' training step worker (runs in their Python, by its path)
TRAIN_WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "official",
                            "train_worker.py")

Times = Dict[str, Dict[str, List[float]]]


def model_specs(args) -> Dict[str, Tuple[str, List[str]]]:
    """``{"a": (config, opts)}`` plus ``"b"`` with ``--compare-config`` and/or ``--compare-opts``
    (B = A's config with B's overrides when only ``--compare-opts`` is given)."""
    specs = {"a": (args.config_file, list(args.opts))}
    if args.compare_config or args.compare_opts is not None:
        specs["b"] = (args.compare_config or args.config_file, list(args.compare_opts or []))
    return specs


class References:
    """The authors' workers of one run (:mod:`stageinteractor.official.reference_client`):
    ``inference`` (decoder / backbone / whole / count; batch 1) and ``train`` (their training
    step, :mod:`stageinteractor.official.train_worker`), each None when not started; ``skip``:
    why there is no comparison at all; ``inference_skip``: why only the training one."""

    def __init__(self, skip: Optional[str] = None):
        self.inference, self.train, self.skip, self.inference_skip = None, None, skip, None
        self.python: Optional[str] = None
        self.repo: Optional[str] = None

    def pids(self) -> Tuple[int, ...]:
        return tuple(w.proc.pid for w in (self.inference, self.train) if w is not None)

    def close(self) -> None:
        for w in (self.inference, self.train):
            if w is not None:
                w.close()


def start_reference(args, threads: int) -> References:
    """The authors' workers this run compares with (:class:`References`); applies ``--malloc
    retain`` to this process and passes it to the workers. Raises ``ReferenceSettingsError``
    for unusable settings."""
    from stageinteractor.official.reference_client import OfficialReference, resolve_reference

    worker_env = None
    if args.malloc == "retain":
        # both sides alike: ours through mallopt now, the authors' worker through glibc's
        # environment variables (read at its start); memory subprocesses keep glibc's defaults
        from stageinteractor.cpu_allocator import GLIBC_ENV, retain_freed_memory

        args._malloc_applied = retain_freed_memory()
        worker_env = dict(GLIBC_ENV) if args._malloc_applied else None
        how = "applied" if args._malloc_applied else "not applicable (not glibc)"
        log(f"--malloc retain: {how}")
    train = args.train and not args.decoder_only
    py, repo, skip = resolve_reference(
        args.official_python, args.official_repo, device=args.device, amp=args.amp,
        compile=args.compile, batch_size=args.batch_size, train=train)
    refs = References(skip)
    if skip is not None:
        log(f"no same-run comparison with the authors' code: {skip}")
        return refs
    refs.python, refs.repo = py, repo
    if args.batch_size == 1:
        log(f"starting the authors' reference: {py} {args.official_worker} ({repo})")
        refs.inference = OfficialReference(py, repo, threads, args.image_size,
                                           worker=args.official_worker, env=worker_env)
    else:
        refs.inference_skip = (f"the inference reference runs batch 1 "
                               f"(--batch-size {args.batch_size})")
    if train:
        worker = getattr(args, "official_train_worker", TRAIN_WORKER)
        log(f"starting the authors' training step: {py} {worker} ({repo})")
        refs.train = OfficialReference(py, repo, threads, args.image_size, worker=worker,
                                       env=worker_env, extra_args=["--batch", str(args.batch_size)])
    return refs


def _build(args, specs) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(models, batches, results) of the sides, random weights (decoder perturbed). Every
    config is loaded and checked before the first model is built."""
    h, w = args.image_size
    loaded = {n: load_model_config(cfg, opts, args.device) for n, (cfg, opts) in specs.items()}
    models, batches, res = {}, {}, {}
    for n, (cfg, opts) in specs.items():
        log(f"building {n}: {cfg} {' '.join(opts)}")
        models[n], info = build_model(cfg, opts, args.device, *loaded[n])
        if args.perturb_decoder and is_stageinteractor(models[n]):
            perturb_decoder(models[n], args.perturb_decoder)
            info["decoder_perturbation"] = args.perturb_decoder
        batches[n] = make_batch(models[n], args.batch_size, h, w)
        res[n] = empty_result(info, param_counts(models[n]))
    return models, batches, res


def _counts(args, n: str, m, r: Dict[str, Any]) -> None:
    """FLOPs (unless ``--no-flops``), and with ``--count-ops`` aten calls and host syncs."""
    h, w = args.image_size
    if not args.no_flops:
        log(f"{n}: counting FLOPs (fvcore, batch 1, {h}x{w})")
        try:
            r["flops"] = count_flops(m, h, w)
        except Exception as e:  # noqa: BLE001 - a model fvcore cannot trace still gets timed
            log(f"{n}: FLOP count failed: {type(e).__name__}: {e}")
            r["flops"] = {"total": None, "error": f"{type(e).__name__}: {e}"}
    if not args.count_ops:
        return
    # the count depends on the code path only, not on the image size: a small image (same
    # size-divisibility as the timed one) keeps the backbone pass cheap
    ch, cw = min(h, 256), min(w, 384)
    if is_stageinteractor(m):
        log(f"{n}: counting decoder aten calls (batch 1, {ch}x{cw})")
        ops = count_ops(m, ch, cw)
        inf, tr = ops["inference"], ops["train_forward"]
        r.update(decoder_aten_calls=inf["total"], decoder_aten_calls_by_op=inf["by_op"],
                 decoder_aten_calls_by_stage=inf["by_section"],
                 decoder_aten_calls_train=tr["total"], decoder_aten_calls_train_by_op=tr["by_op"],
                 decoder_aten_calls_train_by_stage=tr["by_section"],
                 csla_enabled=ops["csla_enabled"])
    else:
        log(f"{n}: --count-ops needs a StageInteractor-style model (decoder.stages); skipped")
    r["host_syncs"] = count_syncs(m, args.batch_size, ch, cw)


def _official_info(args, refs: References) -> Dict[str, Any]:
    official = refs.inference or refs.train
    if official is None:
        return {"skipped": refs.skip}
    info = official.ready()
    out = {"python": official.python, "repo": official.repo, "torch": info.get("torch"),
           "threads": info.get("threads"), "size": info.get("size")}
    if refs.train is not None:
        out["train_batch"] = refs.train.ready().get("batch")
        out["train_clip_grad_max_norm"] = 1.0
    if refs.inference is None:
        out["inference_skipped"] = refs.inference_skip
        return out
    official = refs.inference
    if args.count_ops:
        log("official: counting decoder aten calls")
        cnt = official.call("count")
        out["decoder_aten_calls"] = cnt["aten_calls"]
        out["decoder_aten_calls_by_op"] = dict(list(cnt["by_op"].items())[:20])
    return out


def _time_sections(args, models, batches, extra: Dict[str, Callable], cpu: Times,
                   train_extra: Dict[str, Callable]) -> Times:
    """Interleaved timings of the sections: decoder-only, or inference (+ training step);
    ``extra``/``train_extra``: further callables timed with the models (the authors', sgemm)."""
    times: Times = {}
    it, wu, dev = args.iters, args.warmup, args.device
    if args.decoder_only:
        fns = {n: decoder_fns(m, batches[n], dev, args.amp)[0] for n, m in models.items()}
        fns = {n: f for n, f in fns.items() if f is not None}
        if fns:
            times["decoder_only"] = interleaved(dict(fns, **extra), it, wu, dev, "decoder-only",
                                                cpu.setdefault("decoder-only", {}))
        return times
    fns = {n: inference_fn(m, batches[n], dev, args.amp) for n, m in models.items()}
    times["inference"] = interleaved(dict(fns, **extra), it, wu, dev, "inference",
                                     cpu.setdefault("inference", {}))
    if args.train:
        fns = {n: train_fn(m, batches[n], dev, args.amp, clip=args.clip_grad)
               for n, m in models.items()}
        times["train"] = interleaved(dict(fns, **train_extra), it, wu, dev, "train step",
                                     cpu.setdefault("train step", {}))
    return times


def _stress(args, models, batches, official, sgemm: Optional[Callable]) -> Optional[Dict[str, Any]]:
    """Decoder and backbone (and the authors', and the CPU sgemm) idle, then under
    ``--stress`` busy workers; :func:`~.stress.stress_summary`."""
    if not args.stress:
        return None
    fns = {}
    for n, m in models.items():
        dec, bb = decoder_fns(m, batches[n], args.device, args.amp)
        if dec is not None:
            fns[f"{n}.decoder"], fns[f"{n}.backbone"] = dec, bb
    if fns and official is not None:
        fns["official.decoder"] = official.fn("decoder")
        fns["official.backbone"] = official.fn("backbone")
    if fns and sgemm is not None:
        fns["roofline.sgemm"] = sgemm
    if not fns:
        return {"workers": args.stress, "models": {}}
    idle = interleaved(fns, args.iters, args.warmup, args.device, "stress: idle")
    with Stressor(args.stress, 60 + 30 * args.iters * len(fns)):
        busy = interleaved(fns, args.iters, 1, args.device, f"stress: {args.stress} workers")
    return stress_summary(idle, busy, args.stress, ROOFLINE_N)


def _roofline(args, times: Times, res, once: Optional[List[float]]) -> Dict[str, Any]:
    """The ``roofline`` section: per timed section, the sgemm rate and achieved fractions."""
    if args.no_roofline:
        return {"skipped": "--no-roofline"}
    out: Dict[str, Any] = {}
    flops = res["a"]["flops"] or {}
    for key, label in (("decoder_only", "decoder"), ("inference", "whole")):
        t = times.get(key)
        if t is None or "a" not in t:
            continue
        sg = once if once is not None else t.get("sgemm")
        if sg is None:
            continue
        macs = flops.get("decoder") if label == "decoder" else flops.get("total")
        out.update(roofline_figures(sg, ROOFLINE_N, label, macs, t["a"], t.get("official")))
    if once is not None and out:
        out["sgemm_device"], out["sgemm_measured"] = args.device, "once, before the timed sections"
    return out


def _memory(args, models, batches, res, refs: References, official_res) -> None:
    """Peak training memory of the models (and of the authors' training step, CPU)."""
    log("peak training memory")
    if args.device == "cuda":
        mem = measure_memory_cuda(models, batches, args.device, args.amp)
    else:
        mem = measure_memory_cpu(model_specs(args), args.memory_repeats, args.image_size,
                                 args.batch_size, args.threads, args.amp, args.compile)
    for n, r in res.items():
        r["train_peak_memory_spread"] = spread(mem[n])
        r["train_peak_memory_bytes"] = r["train_peak_memory_spread"]["median"]
    if refs.train is not None:
        theirs = measure_official_memory(refs.python, refs.train.worker, refs.repo, args.image_size,
                                         args.batch_size, args.threads, args.memory_repeats)
        official_res["train_peak_memory_spread"] = spread(theirs)
        official_res["train_peak_memory_bytes"] = official_res["train_peak_memory_spread"]["median"]


def _measure(args, models, batches, res, refs: References, monitor, official_res) -> Dict[str, Any]:
    """Timed sections, memory and stress; the results' figures filled in. Returns the parts of
    the JSON that are not per model."""
    import torch

    official = refs.inference
    extra: Dict[str, Callable] = {}
    train_extra = {} if refs.train is None else {"official": refs.train.fn("train")}
    if official is not None:
        extra["official"] = official.fn("decoder" if args.decoder_only else "whole")
    sgemm, once = None, None
    if not args.no_roofline:
        if interleave_roofline(args.device):
            sgemm = extra["sgemm"] = sgemm_fn(ROOFLINE_N, args.device)
        else:
            once = measure_once(args.device, args.iters)
    cpu: Times = {}
    times = _time_sections(args, models, batches, extra, cpu, train_extra)
    for n, r in res.items():
        side_figures(r, n, times, cpu, args.batch_size)
    load = monitor.result()  # load of the timed sections (memory workers and stress excluded)
    if args.train and not args.decoder_only and args.memory_repeats > 0:
        _memory(args, models, batches, res, refs, official_res)
    for r in res.values():
        r["load_info"]["load"] = load
    return {"torch_threads": torch.get_num_threads(), "load": load, "times": times, "cpu": cpu,
            "stress": _stress(args, models, batches, official, sgemm), "roofline_once": once}


def _vs_official(times: Times, cpu: Times, official_res, a) -> Dict[str, Any]:
    """``ratios_vs_official`` (authors' / ours), with the peak training memory when measured."""
    out = official_ratios(times, cpu, official_res)
    theirs = official_res.get("train_peak_memory_bytes")
    if theirs is not None:
        out["train_peak_memory_bytes"] = ratio(theirs, a["train_peak_memory_bytes"])
    return out


def run(args, refs: Optional[References] = None) -> Dict[str, Any]:
    """The whole benchmark with the already started workers of the authors' code (or the reason
    why there are none); prints the summary, writes ``args.json``, returns the JSON document."""
    import torch

    refs = refs if refs is not None else References("authors' reference not started")
    if refs.train is not None and args.clip_grad is None:
        args.clip_grad = 1.0  # as theirs (optimizer_config) and our configs' train.clip_grad
    specs = model_specs(args)
    names = list(specs)
    monitor = LoadMonitor(live_pids=refs.pids())
    models, batches, res = _build(args, specs)
    for n in names:
        _counts(args, n, models[n], res[n])
    if args.compile:
        for n, m in models.items():
            if is_stageinteractor(m):
                m.decoder = torch.compile(m.decoder)
            else:
                models[n] = torch.compile(m)
    official_res = _official_info(args, refs)
    meas = _measure(args, models, batches, res, refs, monitor, official_res)
    times = meas["times"]
    out = {
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "torch": torch.__version__,
        "torch_threads": meas["torch_threads"],
        "malloc": {"mode": args.malloc, "applied": getattr(args, "_malloc_applied", False)},
        "load": meas["load"],
        "a": res["a"],
        "b": res.get("b"),
        "ratios": ab_ratios(res["a"], res["b"], times) if "b" in res else {},
        "stress": meas["stress"],
        "official": official_res,
        "ratios_vs_official": _vs_official(times, meas["cpu"], official_res, res["a"]),
        "roofline": _roofline(args, times, res, meas["roofline_once"]),
    }
    if args.amp:
        out["amp"] = {"dtype": str(amp_dtype(args.device)).replace("torch.", ""),
                      "grad_scaler": args.device.startswith("cuda")}
    print_summary(out, names, args.stress)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")
    return out
