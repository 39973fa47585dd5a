"""The empty-environment CI phase (.ci/clean_env.sh) judges skips by their reason.

It must let through exactly the reason tests/conftest.py gives to ``gpu`` tests on a machine without
CUDA, and nothing else: a mismatch fails every CPU-only CI run (it did once) or, the other way, lets a
layer skip unnoticed.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLEAN_ENV = REPO / ".ci" / "clean_env.sh"
ROOT_CONFTEST = REPO / "tests" / "conftest.py"
# tests/core/conftest.py shadows the root one for a bare `import conftest`: read the constant
_m = re.search(r'^GPU_SKIP_REASON = "([^"]*)"', ROOT_CONFTEST.read_text(), re.M)
assert _m, f"{ROOT_CONFTEST}: no GPU_SKIP_REASON constant"
GPU_SKIP_REASON = _m.group(1)


def _filter_lines() -> tuple[str, str]:
    text = CLEAN_ENV.read_text()
    reason = re.search(r'^GPU_SKIP_REASON="([^"]*)"$', text, re.M)
    bad = re.search(r"^BAD_SKIPS=\$\((.*)\)$", text, re.M)
    assert reason and bad, f"{CLEAN_ENV}: GPU_SKIP_REASON= or BAD_SKIPS=$(...) line not found"
    return reason.group(1), bad.group(1)


def test_allowed_reason_is_conftest_gpu_reason():
    reason, _ = _filter_lines()
    assert reason == GPU_SKIP_REASON
    assert "pytest.mark.skip(reason=GPU_SKIP_REASON)" in ROOT_CONFTEST.read_text()


def test_filter_keeps_every_other_skip(tmp_path):
    reason, pipeline = _filter_lines()
    log = tmp_path / "test.log"
    gpu = [
        f"SKIPPED [4] tests/core/test_cuda_decoder.py:64: {GPU_SKIP_REASON}",
        f"SKIPPED [1] tests/d2/test_cuda_meta_arch.py: {GPU_SKIP_REASON}",
    ]
    other = [
        "SKIPPED [13] tests/core/test_official_parity.py:30: official parity fixture not found",
        "SKIPPED [1] tests/d2/test_export_onnx.py:12: could not import 'onnx': No module named 'onnx'",
        f"SKIPPED [2] tests/detrex/test_x.py:9: {GPU_SKIP_REASON} and detrex missing",
    ]
    log.write_text("\n".join(["collected 9 items", *gpu, *other, "== 3 passed =="]) + "\n")
    script = f'LOGS="{tmp_path}"\nGPU_SKIP_REASON="{reason}"\necho "$({pipeline})"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == other
