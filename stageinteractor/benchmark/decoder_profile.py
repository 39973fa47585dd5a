"""Where the decoder's time goes: torch.profiler tables per stage, per section and per op
(``tools/profile_decoder.py``).

The config's ``model.decoder`` is built (seed 0), perturbed like the benchmark's
(``perturb * N(0, 1)`` on every parameter) and fed random neck-like maps (N(0, 1), the decoder's
``query_dim`` channels at its ``feature_strides``) in a memory layout; ``iters`` batch-1
``no_grad`` inferences (+ top-k) are profiled after one warm-up. Stage parts are labelled with
``record_function`` by wrapping their methods (attention, sampler, mixing, the generator GEMM,
static layers, out_proj, FFN).
"""

from typing import Any, Dict, List

__all__ = ["GEMM_OPS", "build_inputs", "label_sections", "profile_decoder", "print_report"]

# mkldnn::_linear_pointwise: the oneDNN products of stageinteractor.core.gemm.linear (CPU float32)
GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "mkldnn::_linear_pointwise")


def _wrap(module, name: str, method: str = "forward") -> None:
    from torch.profiler import record_function

    inner = getattr(module, method)

    def wrapped(*args, **kwargs):
        with record_function(name):
            return inner(*args, **kwargs)

    setattr(module, method, wrapped)


def build_inputs(config_file: str, image_size, layout: str, perturb: float):
    """(decoder in eval mode, features [(1, D, ceil(H/s), ceil(W/s))], sizes (1, 2), top-k).
    One generator (seed 0) perturbs the weights, then draws the features. The config goes
    through the tools' front (a missing file: one-line ``ConfigError``)."""
    import torch
    from detectron2.config import instantiate

    from stageinteractor.d2.cli import load_config

    cfg = load_config(config_file)
    torch.manual_seed(0)
    dec = instantiate(cfg.model.decoder).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g))
    h, w = image_size
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    feats = [torch.randn(1, dec.query_dim, -(-h // s), -(-w // s), generator=g)
             .contiguous(memory_format=fmt) for s in dec.feature_strides]
    k = int(getattr(cfg.model, "max_detections_per_image", None) or 100)
    return dec, feats, torch.tensor([[h, w]]), k


def label_sections(dec) -> None:
    """``record_function`` labels: ``stage{s}`` per stage and ``part.<name>`` per stage part."""
    parts = {"attention": "attention", "sampler": "sampler", "mixing": "mixing"}
    for s, st in enumerate(dec.stages):
        _wrap(st, f"stage{s}")
        _wrap(st, "part.generator", method="generate")  # the fused generator GEMM (+ gate sigmoid)
        for attr, name in parts.items():
            _wrap(getattr(st, attr), f"part.{name}")
        _wrap(st.mixing.out_proj, "part.mixing.out_proj")
        for m in st.mixing.static or []:
            _wrap(m, "part.mixing.static")
        _wrap(st.ffn_fc1, "part.ffn")
        _wrap(st.ffn_fc2, "part.ffn")


def profile_decoder(dec, feats, sizes, k: int, iters: int, rows: int) -> Dict[str, Any]:
    """Profile ``iters`` inferences. Returns ``total_ms`` (per inference under the profiler),
    ``plain_ms`` (one unprofiled call), and the tables ``sections``, ``ops``, ``shapes`` (rows
    of strings, milliseconds per inference) and ``gemm_ms``."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from stageinteractor.core.postprocess import topk_detections

    def run():
        with torch.no_grad():
            out = dec(feats, sizes)[-1]
            topk_detections(out["logits"], out["boxes"], k)

    run()  # warm-up (not profiled)
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
    label_sections(dec)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(iters):
            with record_function("decoder"):
                run()
    ka = prof.key_averages()
    ms = lambda us: us / iters / 1e3  # noqa: E731 - microseconds in total -> ms per inference
    total = ms(next(e for e in ka if e.key == "decoder").cpu_time_total)
    sec = sorted((e for e in ka if e.key.startswith(("stage", "part."))), key=lambda e: e.key)
    ops = sorted((e for e in ka if e.key.startswith("aten::")),
                 key=lambda e: -e.self_cpu_time_total)
    shaped = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                     if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {
        "total_ms": total,
        "plain_ms": plain * 1e3,
        "sections": [[e.key, f"{ms(e.cpu_time_total):.1f}",
                      f"{100 * ms(e.cpu_time_total) / total:.1f}"] for e in sec],
        "ops": [[e.key, f"{ms(e.self_cpu_time_total):.1f}",
                 f"{100 * ms(e.self_cpu_time_total) / total:.1f}", e.count // iters]
                for e in ops[:rows]],
        "shapes": [[e.key, f"{ms(e.self_cpu_time_total):.1f}", e.count // iters,
                    str(e.input_shapes)[:90]] for e in shaped[:rows]],
        "gemm_ms": ms(sum(e.self_cpu_time_total for e in ops if e.key in GEMM_OPS)),
    }


def _table(title: str, header: List[str], rows: List[List[Any]], markdown: bool) -> None:
    print(f"\n{title}")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(str(c) for c in r) + " |")
    else:
        for r in [header] + rows:
            print("  " + "  ".join(f"{str(c):>12s}" if i else f"{str(c):40s}"
                                   for i, c in enumerate(r)))


def print_report(res: Dict[str, Any], headline: str, markdown: bool) -> None:
    """The headline with the per-call times, the three tables and the GEMM share."""
    total = res["total_ms"]
    print(f"{headline}: {total:.1f} ms per call under the profiler "
          f"({res['plain_ms']:.1f} ms without)")
    _table("sections (inclusive ms per inference; parts summed over stages)",
           ["section", "ms", "% of decoder"], res["sections"], markdown)
    _table("ops by self time", ["op", "ms", "% of decoder", "calls"], res["ops"], markdown)
    _table("largest (op, input shapes)", ["op", "ms", "calls", "shapes"], res["shapes"], markdown)
    gemm = res["gemm_ms"]
    print(f"\nmatrix products: {gemm:.1f} ms = {100 * gemm / total:.1f}% of the decoder; "
          f"other ops {total - gemm:.1f} ms")
