"""The benchmark's derived figures and its printed summary.

* :func:`side_figures`: a model's medians and spreads from the interleaved timings;
* :func:`ab_ratios`: A/B ratios of two models (``ratios`` in the JSON);
* :func:`official_ratios`: the authors' figures and ``ratios_vs_official``;
* :func:`print_table` / :func:`print_summary`: what the tool prints on stdout.
"""

import statistics
import sys
from typing import Any, Dict, List

from .stats import paired_median_ratio, ratio, speedups, spread

__all__ = ["SECTIONS", "empty_result", "side_figures", "ab_ratios", "official_ratios",
           "print_table", "print_summary"]

#: timed section -> the label of its CPU-time record and of its A/B ratio
SECTIONS = {
    "decoder_only": ("decoder-only", "decoder_only_s"),
    "inference": ("inference", "inference_images_per_s"),
    "train": ("train step", "train_step_s"),
}


def empty_result(load_info: Dict[str, Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """A model's result with every figure None until measured."""
    res: Dict[str, Any] = {"load_info": load_info, "params": params}
    for key in ("flops", "inference_images_per_s", "inference_s_spread", "train_step_s",
                "train_step_s_spread", "train_peak_memory_bytes", "train_peak_memory_spread",
                "decoder_only_s", "decoder_only_s_spread", "decoder_aten_calls",
                "decoder_aten_calls_train", "decoder_aten_calls_by_op",
                "decoder_aten_calls_by_stage", "decoder_aten_calls_train_by_op",
                "decoder_aten_calls_train_by_stage"):
        res[key] = None
    return res


def side_figures(r: Dict[str, Any], name: str, times: Dict[str, Dict[str, List[float]]],
                 cpu: Dict[str, Dict[str, List[float]]], batch_size: int) -> None:
    """Fill model ``name``'s result ``r`` from ``times[section][name]`` (wall s per call) and
    ``cpu[label][name]`` (process CPU s per call): medians, spreads, images/s = batch / median."""
    if name in times.get("decoder_only", {}):
        r["decoder_only_s_spread"] = spread(times["decoder_only"][name])
        r["decoder_only_s"] = r["decoder_only_s_spread"]["median"]
        r["decoder_only_images_per_s"] = batch_size / r["decoder_only_s"]
    if "inference" in times:
        r["inference_s_spread"] = spread(times["inference"][name])
        r["inference_images_per_s"] = batch_size / r["inference_s_spread"]["median"]
    if "train" in times:
        r["train_step_s_spread"] = spread(times["train"][name])
        r["train_step_s"] = r["train_step_s_spread"]["median"]
    for key, (label, _) in SECTIONS.items():
        if key in times and name in cpu.get(label, {}):
            r[f"{key}_cpu_s_spread"] = spread(cpu[label][name])


def ab_ratios(a: Dict[str, Any], b: Dict[str, Any],
              times: Dict[str, Dict[str, List[float]]]) -> Dict[str, Any]:
    """A/B ratios: of medians (time ratios for times; images/s ratio for inference), of the
    per-iteration pairs (``*_paired``) and of the process CPU-time medians (``*_cpu``)."""
    out: Dict[str, Any] = {
        "inference_images_per_s": ratio(a["inference_images_per_s"], b["inference_images_per_s"]),
        "train_step_s": ratio(a["train_step_s"], b["train_step_s"]),
        "train_peak_memory_bytes": ratio(a["train_peak_memory_bytes"],
                                         b["train_peak_memory_bytes"]),
        "decoder_only_s": ratio(a["decoder_only_s"], b["decoder_only_s"]),
        "decoder_only_images_per_s": ratio(b["decoder_only_s"], a["decoder_only_s"]),
        "params": ratio(a["params"]["total"], b["params"]["total"]),
        "flops": ratio((a["flops"] or {}).get("total"), (b["flops"] or {}).get("total")),
    }
    for key in ("inference", "train", "decoder_only"):
        t, label = times.get(key, {}), SECTIONS[key][1]
        if "b" in t:
            out[f"{label}_paired"] = paired_median_ratio(t["a"], t["b"], invert=key == "inference")
    for key, (_, label) in SECTIONS.items():
        ca, cb = a.get(f"{key}_cpu_s_spread"), b.get(f"{key}_cpu_s_spread")
        if ca and cb:  # A/B of the per-call process CPU time (inference: of throughput)
            r_ = ca["median"] / cb["median"]
            out[f"{label}_cpu"] = 1 / r_ if key == "inference" else r_
    return out


def official_ratios(times: Dict[str, Dict[str, List[float]]],
                    cpu: Dict[str, Dict[str, List[float]]],
                    official_res: Dict[str, Any]) -> Dict[str, Any]:
    """Add the authors' spreads (``decoder_s``/``whole_s``/``train_s``, ``*_cpu_s``) to
    ``official_res``;
    return ``ratios_vs_official`` = authors' / ours per section (:func:`~.stats.speedups` and
    ``cpu`` = ratio of CPU-time medians)."""
    out: Dict[str, Any] = {}
    for key, what, label in (("decoder_only", "decoder-only", "decoder"),
                             ("inference", "inference", "whole"), ("train", "train step", "train")):
        t = times.get(key, {})
        if "official" in t and "a" in t:
            official_res[f"{label}_s"] = spread(t["official"])
            official_res[f"{label}_cpu_s"] = spread(cpu[what]["official"])
            sp = speedups(t["official"], t["a"])
            sp["cpu"] = statistics.median(cpu[what]["official"]) / statistics.median(cpu[what]["a"])
            out[label] = sp
    return out


def print_table(res: Dict[str, Any], names: List[str]) -> None:
    """One column per model: parameters, FLOPs, speed, memory, CPU times, aten calls."""
    def fmt(v, scale=1.0, digits=3):
        return "-" if v is None else f"{v / scale:.{digits}f}"

    def cpu(key, digits=3):
        return lambda r: fmt((r.get(f"{key}_cpu_s_spread") or {}).get("median"), 1.0, digits)

    rows = [
        ("params (M)", lambda r: fmt(r["params"]["total"], 1e6)),
        ("  decoder params (M)", lambda r: fmt(r["params"]["decoder"], 1e6)),
        ("FLOPs (G)", lambda r: fmt(r["flops"]["total"] if r["flops"] else None, 1e9, 2)),
        ("  decoder FLOPs (G)", lambda r: fmt((r["flops"] or {}).get("decoder"), 1e9, 2)),
        ("inference img/s", lambda r: fmt(r["inference_images_per_s"])),
        ("train step (s)", lambda r: fmt(r["train_step_s"])),
        ("train peak mem (MiB)", lambda r: fmt(r["train_peak_memory_bytes"], 2**20, 1)),
        ("decoder-only (s)", lambda r: fmt(r["decoder_only_s"], 1.0, 4)),
        ("  process CPU s: inference", cpu("inference")),
        ("  process CPU s: train step", cpu("train")),
        ("  process CPU s: decoder-only", cpu("decoder_only", 4)),
        ("decoder aten calls", lambda r: str(r["decoder_aten_calls"] or "-")),
        ("decoder aten calls (train fwd)", lambda r: str(r["decoder_aten_calls_train"] or "-")),
    ]
    print(f"{'':32s}" + "".join(f"{n:>16s}" for n in names))
    for label, f in rows:
        print(f"{label:32s}" + "".join(f"{f(res[n]):>16s}" for n in names))


def _print_counts(res: Dict[str, Any], names: List[str]) -> None:
    for n in names:
        if res[n]["decoder_aten_calls_by_stage"]:
            print(f"{n}: decoder aten calls per section (inference): "
                  f"{res[n]['decoder_aten_calls_by_stage']}")
            print(f"{n}: decoder aten calls per section (train fwd): "
                  f"{res[n]['decoder_aten_calls_train_by_stage']}")
            top = list(res[n]["decoder_aten_calls_by_op"].items())[:15]
            print(f"{n}: top ops (inference): " + ", ".join(f"{k}={v}" for k, v in top))
    for n in names:
        for what, c in (res[n].get("host_syncs") or {}).items():
            print(f"{n}: host syncs per {what.replace('_', ' ')}: {c['total']} ("
                  + ", ".join(f"{k} {c[k]}" for k in ("scalar", "to_cpu", "to_gpu", "data_dep"))
                  + f"; non-blocking host->device copies {c['to_gpu_async']})")


def _print_official(off: Dict[str, Any], vs: Dict[str, Any]) -> None:
    if "skipped" in off:
        print(f"authors' reference: skipped - {off['skipped']}")
        return
    calls = off.get("decoder_aten_calls")
    print(
        f"authors' reference ({off['python']}, torch {off['torch']}, {off['threads']} threads): "
        + ", ".join(f"{label} median {off[label + '_s']['median']:.4f} s"
                    for label in ("decoder", "whole", "train") if off.get(label + "_s"))
        + (f", decoder aten calls {calls}" if calls else "")
    )
    for label, sp in vs.items():
        if not isinstance(sp, dict):
            print(f"{label}: authors' / ours = {sp:.3f}x")
            continue
        print(f"{label}: authors' / ours = {sp['median']:.3f}x (medians), "
              f"{sp['paired']:.3f}x (paired), {sp['cpu']:.3f}x (CPU time)")


def print_summary(out: Dict[str, Any], names: List[str], stress_workers: int) -> None:
    """Everything after the table: ratios, counts, the authors' reference, roofline, stress,
    load (a warning on stderr when the machine was busy)."""
    res = {n: out[n] for n in names}
    print_table(res, names)
    ratios = out["ratios"]
    if ratios:
        print("ratios A/B: "
              + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items() if v is not None))
    _print_counts(res, names)
    _print_official(out["official"], out["ratios_vs_official"])
    roof = out["roofline"]
    if roof.get("sgemm_macs_per_s"):
        fr = ", ".join(f"{k[: -len('_fraction')]} {100 * v:.1f}%" for k, v in roof.items()
                       if k.endswith("_fraction") and v is not None)
        print(f"roofline: {roof['sgemm_n']}^3 sgemm {roof['sgemm_macs_per_s'] / 1e9:.1f} GMAC/s "
              f"in this run" + (f"; achieved fraction: {fr}" if fr else ""))
    stress = out["stress"]
    if stress:
        for n, parts in stress["models"].items():
            print(f"{n}: slowdown under {stress_workers} stress workers: "
                  + ", ".join(f"{p}={v['slowdown']:.2f}x" for p, v in parts.items()))
        for k, v in stress.get("vs_official", {}).items():
            print(f"stress: authors' / ours {k}: {v['median']:.3f}x (medians), "
                  f"{v['paired']:.3f}x (paired)")
    load = out["load"]
    oth = load["other_processes_cpu_share"]
    print(f"load: 1-min loadavg {load['loadavg_1min_start']} -> {load['loadavg_1min_end']}, "
          f"other processes used {'n/a' if oth is None else f'{100 * oth:.0f}%'} "
          f"of {load['cpus']} CPUs")
    if load["busy"]:
        print("WARNING: the machine was busy during the measurements: absolute timings are noisy; "
              "A/B ratios (interleaved) are more robust", file=sys.stderr)
