"""tools/run_demo.py (what ``make demo`` runs): end to end with 2 iterations, and its helpers.

The end-to-end test trains the StageInteractor demo config for 2 iterations, evaluates on the
first 4 val images, re-evaluates the final checkpoint with --eval-only (which must reproduce
the training-time numbers exactly) and draws 1 val image. The demo dataset is the default one
(``$DETECTRON2_DATASETS`` or ``<repo>/datasets``), generated on first use.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("_run_demo_under_test",
                                                  REPO / "tools" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "tools/run_demo.py", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
def test_run_demo_end_to_end_two_iterations(tmp_path):
    out = tmp_path / "demo"
    rc, log = _run(["--output-dir", str(out), "--max-iter", "2", "--val-images", "4",
                    "--num-images", "1"])
    assert rc == 0, log[-4000:]
    model_dir = out / "stageinteractor"
    assert (model_dir / "model_final.pth").is_file()
    # the final table, the reproduction check and the pictures are reported
    assert "| model | AP | AP50 | AP75 | APs | APm | APl |" in log
    assert "--eval-only reproduces the training-time evaluation exactly" in log
    assert sorted(os.listdir(model_dir / "vis")) == ["000000.jpg", "000000_points.jpg"]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary) == ["stageinteractor"]
    assert summary["stageinteractor"]["reproduced"] is True
    assert set(summary["stageinteractor"]["results"]) >= {"AP", "AP50", "AP75"}
    # training ran exactly 2 iterations (iterations 0 and 1 log losses), then the evaluation
    records = [json.loads(line) for line in
               (model_dir / "metrics.json").read_text().splitlines() if line.strip()]
    assert max(r["iteration"] for r in records if "total_loss" in r) == 1
    assert any("bbox/AP50" in r for r in records)


def test_skip_train_without_checkpoint_names_the_file(tmp_path):
    rc, log = _run(["--output-dir", str(tmp_path), "--skip-train", "--num-images", "0"])
    assert rc != 0
    assert str(tmp_path / "stageinteractor" / "model_final.pth") in log
    assert "--skip-train" in log


@pytest.mark.parametrize("args, message", [
    (["--max-iter", "0"], "--max-iter must be >= 1, got 0"),
    (["--model", "detr"], "invalid choice: 'detr'"),
    (["--val-images", "0"], "--val-images must be >= 1, got 0"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        _tool().parse_args(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_training_eval_reads_the_last_bbox_record(tmp_path):
    records = [{"iteration": 0, "total_loss": 3.0},
               {"iteration": 4, "bbox/AP": 1.0, "bbox/AP50": 2.0},
               {"iteration": 9, "total_loss": 1.0},
               {"iteration": 9, "bbox/AP": 10.5, "bbox/AP50": 30.25, "bbox/APl": float("nan")}]
    (tmp_path / "metrics.json").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n")
    got = _tool().training_eval(str(tmp_path))
    assert got["AP"] == 10.5 and got["AP50"] == 30.25 and math.isnan(got["APl"])
    assert set(got) == {"AP", "AP50", "APl"}


def test_training_eval_without_evaluation_is_an_error(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1}) + "\n")
    with pytest.raises(RuntimeError, match="no bbox/AP record"):
        _tool().training_eval(str(tmp_path))


def test_same_results_is_exact_and_nan_aware():
    t = _tool()
    nan = float("nan")
    assert t.same_results({"AP": 1.25, "APl": nan}, {"AP": 1.25, "APl": nan})
    assert not t.same_results({"AP": 1.25}, {"AP": 1.2500001})
    assert not t.same_results({"AP": 1.25}, {"AP": 1.25, "AP50": 2.0})
    assert not t.same_results({"APl": nan}, {"APl": 0.0})


def test_format_table():
    table = _tool().format_table({"m": {"AP": 1.0, "AP50": 2.5, "AP75": 0.0, "APs": 0.125,
                                        "APm": 3.0}})
    assert table.splitlines() == [
        "| model | AP | AP50 | AP75 | APs | APm | APl |",
        "|---|---|---|---|---|---|---|",
        "| m | 1.00 | 2.50 | 0.00 | 0.12 | 3.00 | nan |",
    ]
