"""Where the training step's time goes on the CPU: torch.profiler self times per phase, per op
group and per op, for :class:`stageinteractor.benchmark.steps.TrainStep` (the step that
``tools/benchmark.py --train`` times). ``tools/profile_train_step.py`` is its command line.
"""
from typing import Any, Dict, List, Mapping, Sequence, Tuple

__all__ = ["OP_GROUPS", "group_self_times", "profile_train_step", "print_train_profile"]

#: op groups of the report: name -> aten ops whose self time it sums
OP_GROUPS: Dict[str, Tuple[str, ...]] = {
    "convolutions, forward (THNN 1x1 / oneDNN)": ("aten::_slow_conv2d_forward",
                                                  "aten::mkldnn_convolution"),
    "convolutions, backward": ("aten::_slow_conv2d_backward", "aten::convolution_backward"),
    # gemm.linear's oneDNN products (CPU float32: decoder Linears, the backbone's 1x1 convs over
    # pixel rows), forward and backward together
    "oneDNN products (gemm.linear)": ("mkldnn::_linear_pointwise",),
    "linear layers, forward (addmm)": ("aten::addmm",),
    "linear layers, backward (mm)": ("aten::mm",),
    "batched products (bmm, baddbmm)": ("aten::bmm", "aten::baddbmm"),
    # the sampler's kernels: grid_sample, or the gather kernel (embedding_bag) with the shared
    # map gradient of core/shared_grad.py (scatter-adds into one buffer per level)
    "point sampling forward (grid_sample / embedding_bag)": ("aten::grid_sampler_2d",
                                                             "aten::_embedding_bag"),
    "point sampling backward": ("aten::grid_sampler_2d_backward",
                                "aten::_embedding_bag_per_sample_weights_backward",
                                "aten::_embedding_bag_dense_backward",
                                "aten::scatter_add_", "aten::index_add_"),
    "zero fills (fill_)": ("aten::fill_",),
    "norms forward + backward": ("aten::native_group_norm", "aten::native_group_norm_backward",
                                 "aten::native_batch_norm", "aten::native_batch_norm_backward",
                                 "aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "copies (copy_)": ("aten::copy_",),
}

_PHASE = "PHASE "


def group_self_times(self_s: Mapping[str, float],
                     groups: Mapping[str, Sequence[str]] = OP_GROUPS) -> List[Tuple[str, float]]:
    """[(group, summed self seconds)] in the order of ``groups``; ops absent from ``self_s``
    count 0, ops in no group are not counted."""
    return [(name, sum(self_s.get(op, 0.0) for op in ops)) for name, ops in groups.items()]


def profile_train_step(step, *, rows: int = 25) -> Dict[str, Any]:
    """One warm-up call of ``step`` (a TrainStep), one timed call, one call under the profiler.

    Returns ``{"plain_s", "profiled_s", "phases": [(name, s)], "groups": [(name, s)],
    "top": [(op, self s, calls)]}``; ``profiled_s`` is the sum of all self times.
    """
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    step()
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    before, step.phase = step.phase, (lambda name: record_function(_PHASE + name))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        step.phase = before
    ev = {e.key: e for e in prof.key_averages()}
    ops = {k: e.self_cpu_time_total / 1e6 for k, e in ev.items() if not k.startswith(_PHASE)}
    phases = [(n, ev[_PHASE + n].cpu_time_total / 1e6) for n in step.PHASES if _PHASE + n in ev]
    top = sorted(((k, s, ev[k].count) for k, s in ops.items()), key=lambda r: -r[1])[:rows]
    return {"plain_s": plain, "profiled_s": sum(ops.values()), "phases": phases,
            "groups": group_self_times(ops), "top": top}


def print_train_profile(res: Mapping[str, Any], headline: str) -> None:
    """Markdown tables of :func:`profile_train_step`'s result."""
    total = res["profiled_s"] or 1.0
    print(f"{headline}: {res['plain_s']:.2f} s without the profiler, {res['profiled_s']:.2f} s "
          "under it\n")
    for title, rows in (("phase", res["phases"]), ("op group (self time)", res["groups"])):
        print(f"| {title} | s | share |\n|---|---|---|")
        for name, s in rows:
            print(f"| {name} | {s:.2f} | {100 * s / total:.0f} % |")
        print()
    print("| op | self s | calls |\n|---|---|---|")
    for op, s, calls in res["top"]:
        print(f"| `{op}` | {s:.3f} | {calls} |")
