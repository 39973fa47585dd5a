"""tools/plot_instability.py on synthetic training output folders (metrics.json, log.txt)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "plot_instability", REPO / "tools" / "plot_instability.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, records, config_file=None):
    folder.mkdir(parents=True)
    with open(folder / "metrics.json", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if config_file:
        (folder / "log.txt").write_text(
            "[d2] Command line arguments: Namespace(config_file='%s', resume=False)\n" % config_file
        )
    return folder


def test_parse_key_both_naming_schemes():
    tool = _tool()
    assert tool.parse_key("diag/label_instability_s0_s1") == (0, 1)
    assert tool.parse_key("csla/instability_s4_s5") == (4, 5)
    assert tool.parse_key("instability_s2_s3") == (2, 3)
    assert tool.parse_key("diag/num_pos_s0") is None
    assert tool.parse_key("diag/label_instability_s0_s1_x") is None


def test_moving_average_hand_computed():
    tool = _tool()
    v = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(tool.moving_average(v, 1), v)
    np.testing.assert_allclose(tool.moving_average(v, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(tool.moving_average(v, 3), [1.0, 2.0, 3.0, 5.0])
    with pytest.raises(ValueError, match="smooth"):
        tool.moving_average(v, 0)


def test_load_metrics_resume_duplicates_and_missing_keys(tmp_path):
    tool = _tool()
    recs = [
        {"iteration": 0, "total_loss": 1.0, "diag/label_instability_s0_s1": 0.5},
        {"iteration": 1, "total_loss": 1.0, "diag/label_instability_s0_s1": 0.4},
        {"iteration": 1, "total_loss": 1.0, "diag/label_instability_s0_s1": 0.3},  # resumed
        {"iteration": 1, "bbox/AP": 3.0},  # evaluation record, no instability
    ]
    series = tool.load_metrics(str(_run(tmp_path / "a", recs)))
    iters, vals = series[(0, 1)]
    assert iters.tolist() == [0, 1] and vals.tolist() == [0.5, 0.3]
    _run(tmp_path / "b", [{"iteration": 0, "total_loss": 1.0}])
    with pytest.raises(ValueError, match="no label-instability scalars"):
        tool.load_metrics(str(tmp_path / "b"))
    # H-DETR with CSLA on both branches: csla/ by default, csla_one2many/ on request
    _run(
        tmp_path / "h",
        [{"iteration": 0, "csla_one2many/instability_s0_s1": 0.9, "csla/instability_s0_s1": 0.2}],
    )
    assert tool.key_group("csla_one2many/instability_s0_s1") == "csla_one2many/"
    assert tool.load_metrics(str(tmp_path / "h"))[(0, 1)][1].tolist() == [0.2]
    assert tool.load_metrics(str(tmp_path / "h"), "csla_one2many/")[(0, 1)][1].tolist() == [0.9]
    with pytest.raises(ValueError, match="prefix 'diag/'"):
        tool.load_metrics(str(tmp_path / "h"), "diag/")
    with pytest.raises(tool.MetricsError, match="no metrics.json"):
        tool.load_metrics(str(tmp_path / "missing"))


def test_plot_two_runs(tmp_path, capsys):
    tool = _tool()
    rng = np.random.default_rng(0)
    a = _run(
        tmp_path / "out_si",
        [
            {
                "iteration": i,
                "diag/label_instability_s0_s1": float(rng.uniform(0.2, 0.4)),
                "diag/label_instability_s1_s2": 0.1,
                "diag/label_instability_s2_s3": 0.05,
            }
            for i in range(0, 100, 5)
        ],
        config_file="configs/demo/stageinteractor_demo.py",
    )
    b = _run(
        tmp_path / "out_csla",
        [
            {"iteration": i, "csla/instability_s0_s1": 0.6, "csla/instability_s1_s2": 0.3}
            for i in range(0, 100, 10)
        ],
    )
    assert tool.run_label(str(a)) == "stageinteractor_demo"
    assert tool.run_label(str(b)) == "out_csla"
    png = tmp_path / "fig" / "instability.png"
    assert tool.main([str(a), str(b), "--output", str(png), "--smooth", "3"]) == 0
    text = capsys.readouterr().out
    assert "3 stage pairs, 2 runs" in text
    assert "out_csla: 10 points; last values: s0-s1 0.600, s1-s2 0.300" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 2 * h  # three subplots side by side
    assert tool.main([str(a), str(b), "--output", str(png), "--labels", "one"]) == 2
    assert capsys.readouterr().err == "plot_instability: error: --labels: got 1 labels for 2 runs\n"
