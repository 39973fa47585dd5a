#!/usr/bin/env python3
"""Where the decoder's time goes: torch.profiler tables per stage, per section and per op.

    python tools/profile_decoder.py [--config-file CFG] [--threads T] [--iters N]
        [--image-size H W] [--layout channels_last|contiguous] [--rows R] [--markdown]

Builds the config's ``model.decoder`` (default: the R50-100q StageInteractor), perturbs its
weights like ``tools/benchmark.py`` (``--perturb-decoder``, 0.02 * N(0, 1)), feeds it random
neck-like maps (N(0, 1), 256 channels, strides 4-32) in ``--layout`` (channels-last = what the
neck emits in CPU inference) and profiles ``--iters`` batch-1 ``no_grad`` inferences (+ top-k)
after one warm-up. Tables (milliseconds per inference):

* sections: inclusive time of each stage and of the stage parts (attention, sampler, mixing,
  generator GEMM, static layers, out_proj, FFN), summed over the stages;
* ops: self time per aten op, and per (op, input shapes) for the largest entries;
* the share of time in matrix products (addmm/mm/bmm/baddbmm) and their multiply-add rate.
"""
import argparse
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def _wrap(module, name: str, method: str = "forward") -> None:
    from torch.profiler import record_function

    inner = getattr(module, method)

    def wrapped(*args, **kwargs):
        with record_function(name):
            return inner(*args, **kwargs)

    setattr(module, method, wrapped)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-file", default=os.path.join(_REPO_ROOT, "configs/stageinteractor/stageinteractor_r50_100q_1x.py"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--image-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
    ap.add_argument("--perturb-decoder", type=float, default=0.02)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--malloc", choices=("retain", "system"), default="system",
                    help="system: glibc's defaults; retain: keep freed memory for reuse "
                    "(stageinteractor.cpu_allocator), as tools/benchmark.py --malloc retain")
    args = ap.parse_args(argv)
    if args.malloc == "retain":
        from stageinteractor.cpu_allocator import retain_freed_memory

        retain_freed_memory()

    import torch
    from detectron2.config import LazyConfig, instantiate
    from torch.profiler import ProfilerActivity, profile, record_function

    from stageinteractor.core.postprocess import topk_detections

    torch.set_num_threads(args.threads)
    cfg = LazyConfig.load(args.config_file)
    torch.manual_seed(0)
    dec = instantiate(cfg.model.decoder).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(args.perturb_decoder * torch.randn(p.shape, generator=g))
    H, W = args.image_size
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    feats = [
        torch.randn(1, dec.query_dim, -(-H // s), -(-W // s), generator=g).contiguous(memory_format=fmt)
        for s in dec.feature_strides
    ]
    sizes = torch.tensor([[H, W]])
    k = int(getattr(cfg.model, "max_detections_per_image", None) or 100)

    def run():
        with torch.no_grad():
            out = dec(feats, sizes)[-1]
            topk_detections(out["logits"], out["boxes"], k)

    run()  # warm-up (not profiled)
    t0 = time.perf_counter()
    run()
    plain = time.perf_counter() - t0
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
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.iters):
            with record_function("decoder"):
                run()
    n = args.iters
    ka = prof.key_averages()
    total = next(e for e in ka if e.key == "decoder").cpu_time_total / n / 1e3
    md = args.markdown

    def table(title, header, rows):
        print(f"\n{title}")
        if md:
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for r in rows:
                print("| " + " | ".join(str(c) for c in r) + " |")
        else:
            for r in [header] + rows:
                print("  " + "  ".join(f"{str(c):>12s}" if i else f"{str(c):40s}" for i, c in enumerate(r)))

    print(
        f"decoder inference: {args.threads} thread(s), {H}x{W}, layout {args.layout}, torch {torch.__version__}: "
        f"{total:.1f} ms per call under the profiler ({plain * 1e3:.1f} ms without)"
    )
    sec = sorted((e for e in ka if e.key.startswith(("stage", "part."))), key=lambda e: e.key)
    table(
        "sections (inclusive ms per inference; parts summed over stages)",
        ["section", "ms", "% of decoder"],
        [[e.key, f"{e.cpu_time_total / n / 1e3:.1f}", f"{100 * e.cpu_time_total / n / 1e3 / total:.1f}"] for e in sec],
    )
    ops = sorted(
        (e for e in ka if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total
    )
    table(
        "ops by self time",
        ["op", "ms", "% of decoder", "calls"],
        [
            [e.key, f"{e.self_cpu_time_total / n / 1e3:.1f}", f"{100 * e.self_cpu_time_total / n / 1e3 / total:.1f}", e.count // n]
            for e in ops[: args.rows]
        ],
    )
    shaped = sorted(
        (e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")),
        key=lambda e: -e.self_cpu_time_total,
    )
    table(
        "largest (op, input shapes)",
        ["op", "ms", "calls", "shapes"],
        [
            [e.key, f"{e.self_cpu_time_total / n / 1e3:.1f}", e.count // n, str(e.input_shapes)[:90]]
            for e in shaped[: args.rows]
        ],
    )
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM_OPS) / n / 1e3
    print(f"\nmatrix products: {gemm:.1f} ms = {100 * gemm / total:.1f}% of the decoder; other ops {total - gemm:.1f} ms")


if __name__ == "__main__":
    main()
