"""Steps, budget and verdicts of ``tools/gpu_check.py`` (one prepared check of the CUDA path).

A :class:`Check` holds the wall-clock budget, the log and the JSON of one run. Each step gets a
timeout from the budget left, minus the time **reserved for the compile row** (the inductor
build of the decoder takes minutes: it must not start with whatever the other steps left), so a
row that cannot start with enough time is recorded as skipped ("budget").

Verdicts (``ok`` of the JSON), so that nothing passes silently on a GPU machine:

* gpu tests: exit 0 with no failures/errors; on CUDA every skip is a failure ("skipped on a GPU
  machine", e.g. detrex not importable), except a test needing more GPUs than the machine has,
  which is reported as not run (``tests.not_run``) and named in the summary;
* host syncs: every count within :data:`HOST_SYNC_BUDGET` (the budget of
  ``tests/d2/test_host_sync_budget.py``), and on CUDA PyTorch's sync-debug warnings no more than
  the counter's total (more would mean the counter misses syncs);
* rows: ``failed`` fails the check; ``timeout`` is reported as a timeout (the budget ran out, not
  a failure of the model) and listed in ``timeouts``; the DINO row on CUDA without detrex's
  DINO config is a failure (on the CPU dry run it is skipped).
"""

import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
#: minimum seconds a step needs to be worth starting, per device
MIN_START = {"cuda": 30.0, "cpu": 3.0}
#: seconds kept for the compile row (inductor build + iterations) while the others run
COMPILE_RESERVE = {"cuda": 150.0, "cpu": 5.0}
#: most host syncs per training step / inference (tests/d2/test_host_sync_budget.py)
HOST_SYNC_BUDGET = {
    "train_step": {"scalar": 0, "to_cpu": 2, "to_gpu": 0, "data_dep": 0, "device_mismatch": 0},
    "inference": {"scalar": 0, "to_cpu": 0, "to_gpu": 0, "data_dep": 0, "device_mismatch": 0},
}
#: a skip of a test that needs more GPUs than the machine has (e.g. the NCCL test)
MULTI_GPU_SKIP = re.compile(r"needs? (\d+|two) (CUDA devices|GPUs)", re.I)

__all__ = ["Check", "environment", "parse_pytest", "judge_skips", "gpu_tests", "judge_host_syncs",
           "host_syncs", "dino_config", "bench_rows", "figures", "run_rows", "verdict"]


class Check:
    """Budget, log and JSON of one run. ``reserve_s``: seconds kept for the compile row until it
    runs (:meth:`timeout_for`); ``clock``: seconds (tests pass a fake one)."""

    def __init__(self, out_dir: str, budget_s: float, device: str, reserve_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.out_dir, self.budget_s, self.device = out_dir, float(budget_s), device
        self.reserve_s, self.clock = float(reserve_s), clock
        self.t0 = clock()
        os.makedirs(out_dir, exist_ok=True)
        self.log_path = os.path.join(out_dir, "gpu_check.log")
        self.log_file = open(self.log_path, "w")
        self.result: Dict[str, Any] = {"device": device, "budget_s": self.budget_s, "rows": {},
                                       "compile_reserve_s": self.reserve_s}

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.t0)

    def timeout_for(self, step: str) -> Optional[float]:
        """Seconds ``step`` may run (every step but ``compile`` leaves the reserve), or None when
        it cannot start (fewer than ``MIN_START`` seconds)."""
        t = self.left() - (0.0 if step == "compile" else self.reserve_s)
        return None if t < MIN_START[self.device] else t

    def log(self, msg: str, raw: bool = False) -> None:
        line = msg if raw else f"[gpu_check {self.clock() - self.t0:6.1f}s] {msg}"
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
            rc, out = "timeout", _text(e.stdout) + _text(e.stderr)
        wall = time.perf_counter() - t
        self.log(out, raw=True)
        self.log(f"exit {rc} after {wall:.1f}s")
        return rc, out, wall

    def write(self) -> None:
        self.result["wall_s"] = self.clock() - self.t0
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump(self.result, f, indent=1, default=str)


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def environment(device: str) -> Dict[str, Any]:
    """Versions, device names and memory, and which of torchvision/detectron2/detrex import."""
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


# ------------------------------------------------------------------------------------ gpu tests
def parse_pytest(out: str) -> Dict[str, Any]:
    """Counts (``passed``, ``failed``, ``skipped``, ``errors``) of pytest's last summary line and
    the ``-rs`` skips as ``skips`` = [[location, reason], ...] (sorted, unique)."""
    res: Dict[str, Any] = {}
    for key in ("passed", "failed", "skipped", "error", "errors"):
        m = re.findall(rf"(\d+) {key}\b", out)
        if m:
            res["errors" if key == "error" else key] = int(m[-1])
    skips = re.findall(r"SKIPPED \[\d+\] ([^\s:]+)(?::\d+)?: (.*)", out)
    res["skips"] = sorted({(loc, reason.strip()) for loc, reason in skips})
    res["skip_reasons"] = sorted({reason for _, reason in res["skips"]})
    return res


def judge_skips(skips: Sequence[Tuple[str, str]], device: str,
                gpu_count: int) -> Tuple[List[str], List[str]]:
    """(silent skips = failures, not-run notes) of the gpu tests' skips. The CPU dry run allows
    every skip. On CUDA a skip is a failure unless it is a multi-GPU test on a machine with fewer
    GPUs (then a note naming the test, its need and the machine's count)."""
    if device != "cuda":
        return [], []
    bad, not_run = [], []
    for loc, reason in skips:
        m = MULTI_GPU_SKIP.search(reason)
        need = (2 if m.group(1).lower() == "two" else int(m.group(1))) if m else None
        if need is not None and gpu_count < need:
            not_run.append(f"{loc}: {reason} (this machine has {gpu_count})")
        else:
            bad.append(f"{loc}: skipped on a GPU machine: {reason}")
    return bad, not_run


def gpu_tests(check: Check, gpu_count: int = 0) -> Dict[str, Any]:
    """The ``gpu``-marked tests of ``tests/*/test_cuda_*.py`` in a pytest subprocess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if check.device == "cpu":
        env["STAGEINTERACTOR_GPU_DRY_RUN"] = "1"
    xml = os.path.join(check.out_dir, "gpu_tests.xml")
    # the dry run leaves out the slow ones (R50-size models and X101-DCN on a small CPU)
    marker_args = ["-m", "gpu and not slow"] if check.device == "cpu" else ["-m", "gpu"]
    files = sorted(os.path.relpath(f, REPO)
                   for f in glob.glob(os.path.join(REPO, "tests", "*", "test_cuda_*.py")))
    timeout = check.timeout_for("tests")
    if timeout is None:
        return {"status": "skipped", "reason": "budget", "ok": False}
    # R50 decoder/model checks, detrex, backbone: about 2 minutes on one GPU
    rc, out, wall = check.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
         "-rs", f"--junitxml={xml}", *marker_args], min(timeout, 300.0), env)
    res: Dict[str, Any] = {"returncode": rc, "wall_s": wall, "dry_run": check.device == "cpu"}
    res.update(parse_pytest(out))
    res["silent_skips"], res["not_run"] = judge_skips(res.pop("skips"), check.device, gpu_count)
    res["ok"] = (rc == 0 and not res.get("failed") and not res.get("errors")
                 and not res["silent_skips"])
    return res


# ------------------------------------------------------------------------------------ host syncs
def judge_host_syncs(counts: Dict[str, Dict[str, Any]],
                     budget: Dict[str, Dict[str, int]] = HOST_SYNC_BUDGET) -> List[str]:
    """What is wrong with one model's counts (``{"train_step": summary, "inference": summary}``
    of ``count_host_syncs``): a category over its budget, a missing count, or PyTorch's
    sync-debug warnings (when counted) above the counter's total. Empty: within budget."""
    problems = []
    for what, limits in budget.items():
        c = counts.get(what)
        if c is None:
            problems.append(f"{what}: not counted")
            continue
        for cat, most in limits.items():
            if c.get(cat, 0) > most:
                problems.append(f"{what}: {cat} {c[cat]} > budget {most}")
        warned = c.get("cuda_sync_warnings")
        if warned is not None and warned > c["total"]:
            problems.append(f"{what}: PyTorch's sync-debug mode saw {warned} syncs, the counter "
                            f"{c['total']} (the counter misses syncs)")
    return problems


def host_syncs(check: Check) -> Dict[str, Any]:
    """In-process counts of the demo (and on CUDA the R50-100q) config, judged against the
    budget (a GPU run also gets PyTorch's sync-debug count)."""
    import torch

    from stageinteractor.d2.sync_count import count_host_syncs

    from .models import build_model, make_batch

    cuda = check.device == "cuda"
    cases = [("demo", DEMO, (128, 160))] + ([("r50_100q", R50, (512, 640))] if cuda else [])
    out: Dict[str, Any] = {}
    for name, cfg, (h, w) in cases:
        if check.timeout_for("syncs") is None:
            out[name] = {"status": "skipped", "reason": "budget"}
            continue
        t = time.perf_counter()
        try:
            torch.manual_seed(0)
            model, _ = build_model(os.path.join(REPO, cfg), [], check.device)
            res = count_host_syncs(model, make_batch(model, 2, h, w), cuda_sync_debug=cuda)
            del model
        except Exception as e:  # noqa: BLE001 - recorded, the check goes on
            out[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            check.log(f"host syncs {name}: FAILED {type(e).__name__}: {e}")
            continue
        problems = judge_host_syncs(res)
        out[name] = {"status": "failed" if problems else "ok", "image_size": [h, w], "batch": 2,
                     **res, "wall_s": time.perf_counter() - t}
        if problems:
            out[name]["reason"] = "; ".join(problems)
        for what, c in res.items():
            check.log(f"host syncs {name} {what}: total {c['total']} (scalar {c['scalar']}, "
                      f"to_cpu {c['to_cpu']}, to_gpu {c['to_gpu']}, data_dep {c['data_dep']};"
                      f" non-blocking copies {c['to_gpu_async']}; cuda sync-debug warnings "
                      f"{c['cuda_sync_warnings']})")
        check.log(f"host syncs {name}: {out[name]['status']} {out[name].get('reason', '')}")
        if cuda:
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ rows
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


def missing_dino_row(device: str, env: Dict[str, Any]) -> Dict[str, Any]:
    """The DINO row when detrex's DINO config is not found: a failure on CUDA (the GPU run must
    measure it; detrex's import error named), skipped on the CPU dry run."""
    reason = "detrex's DINO config not found"
    if env.get("detrex_error"):
        reason += f" (detrex: {env['detrex_error']})"
    if device == "cuda":
        return {"status": "failed", "reason": reason + " on a GPU machine: run make setup"}
    return {"status": "skipped", "reason": reason}


def bench_rows(check) -> Dict[str, List[str]]:
    """Row name -> ``tools/benchmark.py`` arguments (``compile`` last: the longest)."""
    s = SETTINGS[check.device]
    common = ["--device", check.device, "--image-size", *s["size"], "--batch-size", "1",
              "--no-flops"]
    ab = ["--config-file", s["a"], "--compare-config", s["b"]]
    timed = ["--iters", s["iters"], "--warmup", s["warmup"]]
    rows = {
        "stageinteractor_vs_adamixer": ab + common + ["--train", *timed, *s["extra"]],
        "stageinteractor_vs_adamixer_amp": ab + common + ["--train", "--amp", *timed, *s["extra"]],
        "decoder_only": ab + common + ["--decoder-only", "--iters", s["dec_iters"], "--warmup",
                                       s["warmup"], *s["extra"][2:]],
    }
    dino = dino_config()
    if dino:
        rows["stageinteractor_vs_dino"] = [
            "--config-file", s["a"], "--compare-config", dino, "--device", check.device,
            "--image-size", *s["dino_size"], "--batch-size", "1", "--no-flops",
            "--iters", s["dino_iters"], "--warmup", s["warmup"], *s["extra"][2:]]
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


def _run_row(check: Check, name: str, args: List[str]) -> Dict[str, Any]:
    json_path = os.path.join(check.out_dir, f"bench_{name}.json")
    cmd = [sys.executable, "tools/benchmark.py", *args, "--json", json_path]
    row: Dict[str, Any] = {"command": " ".join(["python3", *cmd[1:]])}
    env = None
    if name == "compile" and check.device == "cpu":
        # the CPU inductor build of the decoder takes minutes: the dry run checks the command
        # path with torch.compile switched off (figures are eager ones)
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
        row["note"] = "dry run: TORCHDYNAMO_DISABLE=1 (eager)"
    timeout = check.timeout_for(name)
    if timeout is None:
        row.update(status="skipped", reason=f"budget ({check.left():.0f}s left)")
        check.log(f"row {name}: skipped, budget")
        return row
    rc, out, wall = check.run(cmd, timeout - 2.0, env)
    row["wall_s"] = wall
    if rc == 0 and os.path.isfile(json_path):
        with open(json_path) as f:
            row.update(status="ok", figures=figures(json.load(f)), json=json_path)
    elif rc == "timeout":
        row.update(status="timeout", reason=f"did not finish in its {timeout - 2.0:.0f}s "
                   f"(budget; not a failure of the model)")
    else:
        row.update(status="failed", reason=out.strip().splitlines()[-1] if out.strip() else str(rc))
    return row


def run_rows(check: Check, only: Optional[List[str]], env: Dict[str, Any]) -> None:
    """The benchmark rows in order, each with its timeout from :meth:`Check.timeout_for`."""
    rows = bench_rows(check)
    if "stageinteractor_vs_dino" not in rows and (not only or "stageinteractor_vs_dino" in only):
        check.result["rows"]["stageinteractor_vs_dino"] = missing_dino_row(check.device, env)
    for name, args in rows.items():
        if only and name not in only:
            continue
        check.result["rows"][name] = _run_row(check, name, args)
        check.write()


def verdict(result: Dict[str, Any]) -> Dict[str, Any]:
    """``ok`` (tests ok, no failed row, no failed host-sync count), ``failed`` rows and syncs,
    ``timeouts`` (rows that ran out of budget: reported, not failures)."""
    rows = result.get("rows", {})
    failed = [n for n, r in rows.items() if r["status"] == "failed"]
    timeouts = [n for n, r in rows.items() if r["status"] == "timeout"]
    syncs = [n for n, r in (result.get("host_syncs") or {}).items()
             if isinstance(r, dict) and r.get("status") == "failed"]
    ok = bool((result.get("tests") or {}).get("ok")) and not failed and not syncs
    return {"ok": ok, "failed_rows": failed, "failed_host_syncs": syncs, "timeouts": timeouts}
