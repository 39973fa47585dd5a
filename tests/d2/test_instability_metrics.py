"""Label instability reaches metrics.json: tools/train_net.py on the demo StageInteractor config.

A 4-iteration run of ``configs/demo/stageinteractor_demo.py`` with a tiny model (3 decoder
stages, so 2 consecutive stage pairs) must write, for every logged iteration, the event-storage
scalars ``diag/label_instability_s0_s1`` and ``diag/label_instability_s1_s2`` (the meta-arch puts
``criterion.last_stats`` into the storage with the prefix ``diag/``), each a fraction in [0, 1].
The value itself is checked against hand-made matches in tests/core/test_diagnostics.py and
tests/core/test_criterion.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.backbone.widths=[8,8,16,16]",
    "model.neck.in_channels=[8,8,16,16]",
    "model.neck.out_channels=32",
    "model.neck.num_groups=4",
    "model.decoder.num_queries=8",
    "model.decoder.num_stages=3",
    "model.decoder.query_dim=32",
    "model.decoder.num_heads=2",
    "model.decoder.ffn_dim=32",
    "model.decoder.out_points=4",
    "model.max_detections_per_image=8",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.train.mapper.augmentations.ms_short_edges=[64]",
    "dataloader.train.mapper.augmentations.max_size=96",
    "train.max_iter=4",
    "train.log_period=1",
    "train.eval_period=0",
    "train.checkpointer.period=1000",
    "train.validate_data=False",
]


def test_demo_run_logs_instability_per_stage_pair(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "tools/train_net.py",
        "--config-file",
        "configs/demo/stageinteractor_demo.py",
        f"train.output_dir={out}",
        *TINY,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.json") if line.strip()]
    train = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in train] == [0, 1, 2, 3]
    keys = {"diag/label_instability_s0_s1", "diag/label_instability_s1_s2"}
    for r in train:
        assert keys <= set(r), sorted(r)
        assert all(0.0 <= r[k] <= 1.0 for k in keys)
        # only consecutive pairs of the 3 stages
        assert not [k for k in r if "instability" in k and k not in keys]
    assert (out / "config.yaml").is_file()
