"""tools/gpu_check.py (issue 14): its CPU dry run is what CI runs of the GPU check.

The dry run runs the same steps as the GPU run -- the gpu tests (on the CPU), the host-sync
counts, every benchmark row (demo configs, 128x160, one iteration) -- and writes the same log
and JSON. The GPU rows themselves are checked for the figures of issue 14 point 3.
"""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", REPO / "tools/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out, *args, timeout=600):
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu",
                        "--output-dir", str(out), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    rc, log = _run(tmp_path, "--budget-s", "400")
    assert rc == 0, log[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    text = (tmp_path / "gpu_check.log").read_text()
    assert "OK: wall" in text and "environment:" in text
    assert res["ok"] is True and res["device"] == "cpu"
    assert res["env"]["torch"] and "cuda_available" in res["env"]
    tests = res["tests"]
    assert tests["ok"] and tests["dry_run"] and tests["passed"] >= 6 and not tests.get("failed")
    syncs = res["host_syncs"]["demo"]
    assert syncs["status"] == "ok"
    assert syncs["train_step"]["total"] == 2 and syncs["inference"]["total"] == 0
    rows = res["rows"]
    expected = {"stageinteractor_vs_adamixer", "stageinteractor_vs_adamixer_amp",
                "decoder_only", "stageinteractor_vs_dino", "compile"}
    assert set(rows) == expected
    for name, row in rows.items():
        if name == "stageinteractor_vs_dino" and row["status"] == "skipped":
            continue  # detrex not installed
        assert row["status"] == "ok", (name, row)
        assert Path(row["json"]).is_file()
    f = rows["stageinteractor_vs_adamixer"]["figures"]
    assert {"a.inference_images_per_s", "b.inference_images_per_s", "a.train_step_s",
            "ratio.inference_images_per_s", "ratio.train_step_s"} <= set(f)
    assert "ratio.decoder_only_images_per_s" in rows["decoder_only"]["figures"]
    assert "--amp" in rows["stageinteractor_vs_adamixer_amp"]["command"]
    assert res["wall_s"] < 400


def test_rows_that_do_not_fit_the_budget_are_skipped(tmp_path):
    rc, log = _run(tmp_path, "--budget-s", "1", "--skip-tests", "--skip-syncs")
    assert rc == 0, log[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["tests"]["status"] == "skipped" and res["ok"] is True
    for name, row in res["rows"].items():
        assert row["status"] == "skipped", name
        assert row["reason"].startswith(("budget", "detrex")), row


def test_gpu_rows_are_the_issue_figures(tool):
    rows = tool.bench_rows(types.SimpleNamespace(device="cuda"))
    ab = rows["stageinteractor_vs_adamixer"]
    assert ab[:4] == ["--config-file", tool.R50, "--compare-config", tool.ADAMIXER_R50]
    for args in rows.values():
        joined = " ".join(args)
        assert "--device cuda" in joined and "--batch-size 1" in joined
        assert "--image-size 800 1216" in joined
    assert "--train" in ab and "--amp" in rows["stageinteractor_vs_adamixer_amp"]
    assert "--decoder-only" in rows["decoder_only"] and "--compile" in rows["compile"]
    assert list(rows)[-1] == "compile"  # the longest (inductor build) runs last
    assert tool.parse_args(["--output-dir", "x"]).budget_s == 420.0


# ------------------------------------------------------------------ issue 21 items 3 and 7
from stageinteractor.benchmark import gpu_check as gc  # noqa: E402

PYTEST_OUT = """\
...s.s
SKIPPED [1] tests/detrex/test_cuda_detrex.py:19: could not import 'detrex': No module named 'detrex'
SKIPPED [1] tests/d2/test_cuda_backbone_ddp.py:53: needs 2 CUDA devices
7 passed, 2 skipped in 80.1s
"""


def test_pytest_output_parsed():
    res = gc.parse_pytest(PYTEST_OUT)
    assert res["passed"] == 7 and res["skipped"] == 2 and "failed" not in res
    assert res["skips"] == [
        ("tests/d2/test_cuda_backbone_ddp.py", "needs 2 CUDA devices"),
        ("tests/detrex/test_cuda_detrex.py", "could not import 'detrex': No module named 'detrex'"),
    ]


def test_skips_on_a_gpu_machine_fail_except_multi_gpu_ones():
    """Item 7: detrex's gpu tests skipped on a GPU machine passed silently; the NCCL test's skip
    with one GPU was not reported."""
    skips = gc.parse_pytest(PYTEST_OUT)["skips"]
    bad, not_run = gc.judge_skips(skips, "cuda", gpu_count=1)
    assert bad == ["tests/detrex/test_cuda_detrex.py: skipped on a GPU machine: could not "
                   "import 'detrex': No module named 'detrex'"]
    assert not_run == ["tests/d2/test_cuda_backbone_ddp.py: needs 2 CUDA devices "
                       "(this machine has 1)"]
    bad2, not_run2 = gc.judge_skips(skips[:1], "cuda", gpu_count=2)  # 2 GPUs: a real skip
    assert len(bad2) == 1 and not not_run2
    assert gc.judge_skips(skips, "cpu", gpu_count=0) == ([], [])  # the dry run allows skips


def test_dino_row_without_detrex_fails_on_cuda_only():
    env = {"detrex": None, "detrex_error": "ModuleNotFoundError: No module named 'detrex'"}
    row = gc.missing_dino_row("cuda", env)
    assert row["status"] == "failed" and "No module named 'detrex'" in row["reason"]
    assert gc.missing_dino_row("cpu", env)["status"] == "skipped"
    res = {"tests": {"ok": True}, "rows": {"stageinteractor_vs_dino": row}, "host_syncs": {}}
    assert gc.verdict(res)["ok"] is False


def _counts(to_cpu_train=2, to_cpu_inf=0, warn=None, total_inf=0):
    zero = {"scalar": 0, "to_gpu": 0, "data_dep": 0, "device_mismatch": 0}
    return {"train_step": dict(zero, to_cpu=to_cpu_train, total=to_cpu_train,
                               cuda_sync_warnings=None),
            "inference": dict(zero, to_cpu=to_cpu_inf, total=total_inf, cuda_sync_warnings=warn)}


def test_host_sync_step_asserts_the_budget():
    """Item 7: the host-sync step recorded counts and asserted nothing."""
    assert gc.judge_host_syncs(_counts()) == []
    assert gc.judge_host_syncs(_counts(to_cpu_train=3)) == ["train_step: to_cpu 3 > budget 2"]
    assert gc.judge_host_syncs(_counts(warn=0)) == []
    assert gc.judge_host_syncs(_counts(warn=1)) == [
        "inference: PyTorch's sync-debug mode saw 1 syncs, the counter 0 "
        "(the counter misses syncs)"]
    only_train = {"train_step": _counts()["train_step"]}
    assert gc.judge_host_syncs(only_train) == ["inference: not counted"]
    res = {"tests": {"ok": True}, "rows": {}, "host_syncs": {"demo": {"status": "failed"}}}
    assert gc.verdict(res) == {"ok": False, "failed_rows": [], "failed_host_syncs": ["demo"],
                               "timeouts": []}


def test_host_sync_budget_is_the_tests():
    """One budget: the check's is tests/d2/test_host_sync_budget.py's."""
    import importlib.util

    path = REPO / "tests/d2/test_host_sync_budget.py"
    spec = importlib.util.spec_from_file_location("budget", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    expected = {"train_step": mod.TRAIN_BUDGET, "inference": mod.INFERENCE_BUDGET}
    assert gc.HOST_SYNC_BUDGET == expected


class _Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_compile_row_has_a_reserved_budget(tmp_path):
    """Item 3: the compile row started with whatever budget was left."""
    clock = _Clock()
    check = gc.Check(str(tmp_path), 420.0, "cuda", reserve_s=150.0, clock=clock)
    assert check.timeout_for("tests") == 270.0 and check.timeout_for("compile") == 420.0
    clock.t = 250.0  # 170 s left: 20 s for the others (< 30 to start), all of it for compile
    assert check.timeout_for("decoder_only") is None and check.timeout_for("compile") == 170.0
    check.log_file.close()


def test_a_timed_out_row_is_a_timeout_not_a_failure(tmp_path, monkeypatch):
    check = gc.Check(str(tmp_path), 420.0, "cuda", reserve_s=150.0)
    monkeypatch.setattr(check, "run", lambda cmd, timeout, env=None: ("timeout", "", timeout))
    row = gc._run_row(check, "compile", ["--compile"])
    assert row["status"] == "timeout" and "not a failure of the model" in row["reason"]
    check.log_file.close()
    rows = {"compile": row, "decoder_only": {"status": "ok"}}
    v = gc.verdict({"tests": {"ok": True}, "rows": rows, "host_syncs": {"demo": {"status": "ok"}}})
    assert v == {"ok": True, "failed_rows": [], "failed_host_syncs": [], "timeouts": ["compile"]}
