#!/usr/bin/env python3
"""One prepared check of the CUDA path (issue 14): gpu tests, host syncs, GPU figures.

    python3 tools/gpu_check.py --output-dir OUT [--device cuda|cpu] [--budget-s 420]
        [--skip-tests] [--rows NAME ...]

Runs, in this order, within ``--budget-s`` seconds of wall time (default 420: the whole check
fits in 8 minutes on one GPU):

1. the environment: device name, GPU count and memory, torch / CUDA / cuDNN versions;
2. the ``gpu``-marked tests (``pytest -m gpu tests/*/test_cuda_*.py``: gpu tests live in
   ``test_cuda_*.py`` files), with their counts and log;
3. host syncs per training step and per inference (``stageinteractor.d2.sync_count``) of the
   demo and the R50-100q config; on CUDA also PyTorch's own sync-debug count;
4. the benchmark rows of the README's GPU speed table (``tools/benchmark.py`` subprocesses, one
   JSON each): StageInteractor vs the AdaMixer baseline, R50-100q, 800x1216, batch 1
   (inference img/s and ratio, training step, peak memory), the same with AMP, decoder-only
   latency, StageInteractor vs detrex DINO-R50 (when detrex's DINO config is found) and
   inference with ``--compile`` (the decoder under ``torch.compile``).

Each step gets a timeout from the budget left; a row that cannot start with enough time left is
recorded as skipped ("budget"), so the check always ends in time and says what it left out.

``--device cpu`` is the dry run that CI tests (``tests/d2/test_gpu_check.py``): the gpu tests
run on the CPU (``STAGEINTERACTOR_GPU_DRY_RUN=1``), the host syncs are the counter's CPU dry
run, and the rows use the demo configs at 128x160 with one iteration (same commands, same
JSON, small sizes).

Writes ``OUT/gpu_check.log`` (everything printed, including each subprocess's output) and
``OUT/gpu_check.json``: ``{"env", "budget_s", "wall_s", "tests", "host_syncs", "rows", "ok"}``;
``rows[name]`` = ``{"command", "status" (ok / failed / timeout / skipped), "reason",
"wall_s", "figures", "json"}``. Exit status 0 when every test passed and no row failed
(skipped rows are listed, not failures).
"""

import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

R50 = "configs/stageinteractor/stageinteractor_r50_100q_1x.py"
ADAMIXER_R50 = "configs/adamixer/adamixer_r50_100q_1x.py"
DEMO = "configs/demo/stageinteractor_demo.py"
ADAMIXER_DEMO = "configs/demo/adamixer_demo.py"

# per device: benchmark settings of the rows (the cpu dry run: demo configs, tiny sizes)
SETTINGS = {
    "cuda": dict(a=R50, b=ADAMIXER_R50, size=("800", "1216"), iters="20", warmup="5",
                 dec_iters="50", dino_iters="10", dino_size=("800", "1216"),
                 extra=["--memory-repeats", "1"]),
    # DINO's 900 two-stage proposals need >= 900 encoder tokens: 256x320 at least
    "cpu": dict(a=DEMO, b=ADAMIXER_DEMO, size=("128", "160"), iters="1", warmup="0",
                dec_iters="2", dino_iters="1", dino_size=("256", "320"),
                extra=["--memory-repeats", "0", "--threads", "1"]),
}
# minimum seconds a step needs to be worth starting, per device
MIN_START = {"cuda": 30.0, "cpu": 3.0}


class Check:
    """Budget, log and JSON of one run."""

    def __init__(self, out_dir: str, budget_s: float, device: str):
        self.out_dir = out_dir
        self.budget_s = float(budget_s)
        self.device = device
        self.t0 = time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)
        self.log_path = os.path.join(out_dir, "gpu_check.log")
        self.log_file = open(self.log_path, "w")
        self.result: Dict[str, Any] = {"device": device, "budget_s": self.budget_s, "rows": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def log(self, msg: str, raw: bool = False) -> None:
        line = msg if raw else f"[gpu_check {time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + ("" if line.endswith("\n") else "\n"))
        self.log_file.flush()

    def run(self, cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None):
        """Run ``cmd`` from the repository root; (returncode or "timeout", output, wall s)."""
        self.log("$ " + " ".join(cmd))
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=max(1.0, timeout))
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = "timeout"
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
                else (e.stderr or "")
        wall = time.perf_counter() - t
        self.log(out, raw=True)
        self.log(f"exit {rc} after {wall:.1f}s")
        return rc, out, wall

    def write(self) -> None:
        self.result["wall_s"] = time.perf_counter() - self.t0
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump(self.result, f, indent=1, default=str)


# ------------------------------------------------------------------------------------ steps
def environment(device: str) -> Dict[str, Any]:
    import torch

    env: Dict[str, Any] = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu_count"] = torch.cuda.device_count()
        env["gpus"] = [
            {"name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())
        ]
    for name in ("torchvision", "detectron2", "detrex"):
        try:
            env[name] = __import__(name).__dict__.get("__version__", "importable")
        except Exception as e:  # noqa: BLE001 - a broken install may raise anything
            env[name] = None
            env[f"{name}_error"] = f"{type(e).__name__}: {e}"
    return env


def gpu_tests(check: Check) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if check.device == "cpu":
        env["STAGEINTERACTOR_GPU_DRY_RUN"] = "1"
    xml = os.path.join(check.out_dir, "gpu_tests.xml")
    # the dry run leaves out the slow ones (R50-size models and X101-DCN on a small CPU)
    marker_args = ["-m", "gpu and not slow"] if check.device == "cpu" else ["-m", "gpu"]
    # the gpu tests live in tests/<layer>/test_cuda_*.py (collecting only those saves the
    # imports of every other test module)
    files = sorted(os.path.relpath(f, REPO)
                   for f in glob.glob(os.path.join(REPO, "tests", "*", "test_cuda_*.py")))
    # R50 decoder/model checks, detrex, backbone: about 2 minutes on one GPU
    timeout = min(check.left() - MIN_START[check.device], 300.0)
    rc, out, wall = check.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
         "-rs", f"--junitxml={xml}", *marker_args], timeout, env)
    res: Dict[str, Any] = {"returncode": rc, "wall_s": wall, "dry_run": check.device == "cpu"}
    for key in ("passed", "failed", "skipped", "error", "errors"):
        m = re.findall(rf"(\d+) {key}\b", out)
        if m:
            res["errors" if key == "error" else key] = int(m[-1])
    res["skip_reasons"] = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", out)))
    res["ok"] = rc == 0 and not res.get("failed") and not res.get("errors")
    return res


def host_syncs(check: Check) -> Dict[str, Any]:
    """In-process counts (a GPU run also gets PyTorch's sync-debug count)."""
    import importlib.util

    import torch

    from stageinteractor.d2.sync_count import count_host_syncs

    spec = importlib.util.spec_from_file_location("benchmark_tool",
                                                  os.path.join(REPO, "tools/benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cuda = check.device == "cuda"
    cases = [("demo", DEMO, (128, 160))]
    if cuda:
        cases.append(("r50_100q", R50, (512, 640)))
    out: Dict[str, Any] = {}
    for name, cfg, (h, w) in cases:
        if check.left() < MIN_START[check.device]:
            out[name] = {"status": "skipped", "reason": "budget"}
            continue
        t = time.perf_counter()
        try:
            torch.manual_seed(0)
            model, _ = bench.build_model(os.path.join(REPO, cfg), [], check.device)
            res = count_host_syncs(model, bench.make_batch(model, 2, h, w), cuda_sync_debug=cuda)
            del model
            out[name] = {"status": "ok", "image_size": [h, w], "batch": 2, **res,
                         "wall_s": time.perf_counter() - t}
            for what, c in res.items():
                check.log(f"host syncs {name} {what}: total {c['total']} (scalar {c['scalar']}, "
                          f"to_cpu {c['to_cpu']}, to_gpu {c['to_gpu']}, data_dep {c['data_dep']};"
                          f" non-blocking copies {c['to_gpu_async']}; cuda sync-debug warnings "
                          f"{c['cuda_sync_warnings']})")
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            out[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            check.log(f"host syncs {name}: FAILED {type(e).__name__}: {e}")
        if cuda:
            torch.cuda.empty_cache()
    return out


def dino_config() -> Optional[str]:
    """detrex's DINO-R50-4scale config, when detrex's ``projects`` are importable."""
    try:
        import projects

        for root in list(getattr(projects, "__path__", [])):
            hits = glob.glob(os.path.join(root, "dino", "configs", "dino-resnet",
                                          "dino_r50_4scale_12ep.py"))
            if hits:
                return hits[0]
    except ImportError:
        pass
    return None


def bench_rows(check: Check) -> Dict[str, List[str]]:
    s = SETTINGS[check.device]
    common = ["--device", check.device, "--image-size", *s["size"], "--batch-size", "1",
              "--no-flops"]
    ab = ["--config-file", s["a"], "--compare-config", s["b"]]
    rows = {
        "stageinteractor_vs_adamixer": ab + common + ["--train", "--iters", s["iters"],
                                                       "--warmup", s["warmup"], *s["extra"]],
        "stageinteractor_vs_adamixer_amp": ab + common + ["--train", "--amp", "--iters",
                                                           s["iters"], "--warmup", s["warmup"],
                                                           *s["extra"]],
        "decoder_only": ab + common + ["--decoder-only", "--iters", s["dec_iters"], "--warmup",
                                       s["warmup"], *s["extra"][2:]],
    }
    dino = dino_config()
    if dino:
        rows["stageinteractor_vs_dino"] = ["--config-file", s["a"], "--compare-config", dino,
                                           "--device", check.device, "--image-size",
                                           *s["dino_size"], "--batch-size", "1", "--no-flops",
                                           "--iters", s["dino_iters"], "--warmup", s["warmup"],
                                           *s["extra"][2:]]
    rows["compile"] = ["--config-file", s["a"], *common, "--compile", "--iters", s["iters"],
                       "--warmup", "1", *s["extra"][2:]]
    return rows


def figures(res: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of a benchmark JSON that the speed table reports."""
    out: Dict[str, Any] = {}
    for side in ("a", "b"):
        r = res.get(side) or {}
        for key in ("inference_images_per_s", "train_step_s", "train_peak_memory_bytes",
                    "decoder_only_s"):
            if r.get(key) is not None:
                out[f"{side}.{key}"] = r[key]
    for key, v in (res.get("ratios") or {}).items():
        if v is not None and not key.endswith(("_cpu", "_paired")):
            out[f"ratio.{key}"] = v
    return out


def run_rows(check: Check, only: Optional[List[str]]) -> None:
    rows = bench_rows(check)
    if not dino_config():
        check.result["rows"]["stageinteractor_vs_dino"] = {
            "status": "skipped", "reason": "detrex's DINO config not found"}
    for name, args in rows.items():
        if only and name not in only:
            continue
        json_path = os.path.join(check.out_dir, f"bench_{name}.json")
        cmd = [sys.executable, "tools/benchmark.py", *args, "--json", json_path]
        row: Dict[str, Any] = {"command": " ".join(["python3", *cmd[1:]])}
        env = None
        if name == "compile" and check.device == "cpu":
            # the CPU inductor build of the decoder takes minutes: the dry run checks the
            # command path with torch.compile switched off (figures are eager ones)
            env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
            row["note"] = "dry run: TORCHDYNAMO_DISABLE=1 (eager)"
        if check.left() < MIN_START[check.device]:
            row.update(status="skipped", reason=f"budget ({check.left():.0f}s left)")
            check.log(f"row {name}: skipped, budget")
        else:
            rc, out, wall = check.run(cmd, check.left() - 2.0, env)
            row["wall_s"] = wall
            if rc == 0 and os.path.isfile(json_path):
                with open(json_path) as f:
                    res = json.load(f)
                row.update(status="ok", figures=figures(res), json=json_path)
            else:
                row.update(status="timeout" if rc == "timeout" else "failed",
                           reason=out.strip().splitlines()[-1] if out.strip() else str(rc))
        check.result["rows"][name] = row
        check.write()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu (the dry run)")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--skip-tests", action="store_true", help="no pytest step")
    p.add_argument("--skip-syncs", action="store_true", help="no host-sync step")
    p.add_argument("--rows", nargs="*", default=None, metavar="NAME",
                   help="only these benchmark rows (default all; none: --rows with no name)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but CUDA is not available")
    check = Check(args.output_dir, args.budget_s, device)
    env = environment(device)
    check.result["env"] = env
    check.log("environment: " + json.dumps(env))
    check.write()
    if args.skip_tests:
        check.result["tests"] = {"status": "skipped", "reason": "--skip-tests", "ok": True}
    else:
        check.result["tests"] = gpu_tests(check)
    check.write()
    no_d2 = None if env.get("detectron2") else "detectron2 not importable (run make setup)"
    if args.skip_syncs or no_d2:
        check.result["host_syncs"] = {"status": "skipped", "reason": no_d2 or "--skip-syncs"}
    else:
        check.result["host_syncs"] = host_syncs(check)
    check.write()
    if no_d2:
        check.log(f"benchmark rows skipped: {no_d2}")
    elif args.rows is None or args.rows:
        run_rows(check, args.rows)
    rows = check.result["rows"]
    failed = [n for n, r in rows.items() if r["status"] in ("failed", "timeout")]
    syncs_failed = [n for n, r in check.result["host_syncs"].items()
                    if isinstance(r, dict) and r.get("status") == "failed"]
    check.result["ok"] = bool(check.result["tests"].get("ok")) and not failed \
        and not syncs_failed
    check.write()
    tests = {k: v for k, v in check.result["tests"].items() if k != "skip_reasons"}
    check.log(f"tests: {json.dumps(tests)}")
    for n, r in rows.items():
        figs = json.dumps(r.get("figures", {}))
        check.log(f"row {n}: {r['status']} {r.get('reason', '')} {figs}")
    check.log(f"{'OK' if check.result['ok'] else 'NOT OK'}: wall {check.result['wall_s']:.0f}s "
              f"of {check.budget_s:.0f}s; log {check.log_path}")
    check.log_file.close()
    return 0 if check.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
