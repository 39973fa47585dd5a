#!/usr/bin/env python3
"""Where the training step's time goes (CPU): a torch.profiler table per phase and per op.

    python tools/profile_train_step.py [--config-file CFG] [--threads T] [--batch-size B]
        [--image-size H W] [--rows R]

Builds the config's model (random weights, decoder perturbed by 0.02 * N(0, 1) as in
``tools/benchmark.py``), a synthetic batch (``stageinteractor.benchmark.models.make_batch``: B
uint8 images with 8 boxes each) and runs the training step of ``tools/benchmark.py --train``
(forward, sum of the losses, backward, global-norm clipping at 1.0, AdamW): one warm-up step,
one timed step without the profiler, one step under it. Prints (seconds per step):

* phases: forward (backbone, neck, decoder + criterion), backward, clipping, optimizer step;
* op groups: convolutions, linear layers, batched products, grid_sample, norms, zero fills;
* ops by self time.
"""
import argparse
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from stageinteractor.errors import run_tool  # noqa: E402

__all__ = ["OP_GROUPS", "parse_args", "main"]

OP_GROUPS = {
    "convolutions, forward (THNN 1x1 / oneDNN)": ("aten::_slow_conv2d_forward", "aten::mkldnn_convolution"),
    "convolutions, backward": ("aten::_slow_conv2d_backward", "aten::convolution_backward"),
    "linear layers, forward (addmm)": ("aten::addmm",),
    "linear layers, backward (mm)": ("aten::mm",),
    "batched products (bmm, baddbmm)": ("aten::bmm", "aten::baddbmm"),
    "grid_sample forward": ("aten::grid_sampler_2d",),
    "grid_sample backward": ("aten::grid_sampler_2d_backward",),
    "zero fills (fill_)": ("aten::fill_",),
    "norms forward + backward": ("aten::native_group_norm", "aten::native_group_norm_backward",
                                 "aten::native_batch_norm", "aten::native_batch_norm_backward",
                                 "aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "copies (copy_)": ("aten::copy_",),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-file", default=os.path.join(
        _REPO_ROOT, "configs/stageinteractor/stageinteractor_r50_100q_1x.py"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, nargs=2, default=(512, 768), metavar=("H", "W"))
    ap.add_argument("--rows", type=int, default=25)
    return ap.parse_args(argv)


def _step(model, batch, params, opt, record_function) -> None:
    import torch

    model.train()
    with record_function("PHASE forward + losses"):
        losses = model(batch)
        loss = sum(v for v in losses.values() if torch.is_tensor(v))
    opt.zero_grad(set_to_none=True)
    with record_function("PHASE backward"):
        loss.backward()
    with record_function("PHASE clip_grad_norm_"):
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm=1.0)
    with record_function("PHASE AdamW step"):
        opt.step()


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from stageinteractor.benchmark.models import build_model, make_batch, perturb_decoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = build_model(args.config_file, [], "cpu")
    perturb_decoder(model, 0.02)
    batch = make_batch(model, args.batch_size, *args.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-4)  # as tools/benchmark.py --train
    _step(model, batch, params, opt, record_function)
    t0 = time.perf_counter()
    _step(model, batch, params, opt, record_function)
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, batch, params, opt, record_function)
    ev = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in ev.values()) / 1e6
    h, w = args.image_size
    print(f"training step, {args.threads} thread(s), batch {args.batch_size}, {h}x{w}, torch "
          f"{torch.__version__}: {plain:.2f} s without the profiler, {total:.2f} s under it\n")
    print("| phase | s | share |\n|---|---|---|")
    for k in sorted(k for k in ev if k.startswith("PHASE ")):
        s = ev[k].cpu_time_total / 1e6
        print(f"| {k[6:]} | {s:.2f} | {100 * s / total:.0f} % |")
    print("\n| op group (self time) | s | share |\n|---|---|---|")
    for name, ops in OP_GROUPS.items():
        s = sum(ev[o].self_cpu_time_total for o in ops if o in ev) / 1e6
        print(f"| {name} | {s:.2f} | {100 * s / total:.0f} % |")
    print("\n| op | self s | calls |\n|---|---|---|")
    top = sorted(ev.values(), key=lambda e: -e.self_cpu_time_total)[: args.rows]
    for e in top:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.3f} | {e.count} |")


if __name__ == "__main__":
    sys.exit(run_tool(main, tool="profile_train_step"))
