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
    assert syncs["train_step"]["total"] == 3 and syncs["inference"]["total"] == 1
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
