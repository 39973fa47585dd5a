"""tools/benchmark.py (issues 6 and 10) and the FLOP handles of stageinteractor.d2.flops.

No timings are checked: the tool runs end to end on the demo config with tiny sizes and writes
JSON with the required keys; the FLOPs of the R50-100q decoder's matrix products equal a count
by hand from the architecture; the parts of ``stageinteractor.benchmark`` that need detectron2
(models, memory worker, training's AMP) behave. The parts that need no detectron2 are checked in
tests/core/test_benchmark_parts.py.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate

from stageinteractor.d2.flops import flop_analysis, matrix_product_flops
from stageinteractor.official.reference_client import OfficialReference

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo/stageinteractor_demo.py")
# tiny demo model: 10 queries, 3 stages (stage 2 reuses filters), 64x96 images
TINY = [
    "model.decoder.num_queries=10",
    "model.decoder.num_stages=3",
    "model.max_detections_per_image=10",
]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools/benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODEL_KEYS = {
    "params",
    "flops",
    "inference_images_per_s",
    "train_step_s",
    "train_peak_memory_bytes",
    "decoder_aten_calls",
    "decoder_aten_calls_train",
    "decoder_aten_calls_by_op",
    "load_info",
}


def test_end_to_end_compare_json(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--config-file",
            DEMO,
            "--image-size",
            "64",
            "96",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--train",
            "--count-ops",
            "--memory-repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
            "--compare-opts",
            *TINY,
            "model.criterion.assigner.enabled=False",
            "--",
            *TINY,
        ]
    )
    data = json.loads(out.read_text())
    assert {"a", "b", "ratios", "load", "settings"} <= set(data)
    for side in ("a", "b"):
        r = data[side]
        assert MODEL_KEYS <= set(r), MODEL_KEYS - set(r)
        assert r["params"]["total"] == sum(r["params"]["modules"].values())
        assert len(r["params"]["decoder_stages"]) == 3 and len(r["flops"]["decoder_stages"]) == 3
        assert r["flops"]["total"] > 0 and r["flops"]["decoder"] <= r["flops"]["total"]
        assert r["inference_images_per_s"] > 0 and r["train_step_s"] > 0
        assert r["train_peak_memory_bytes"] >= 0 and r["train_peak_memory_spread"]["n"] == 1
        by_stage = r["decoder_aten_calls_by_stage"]
        assert {"stage0", "stage1", "stage2", "postprocess"} <= set(by_stage)
        assert (
            sum(by_stage.values())
            == r["decoder_aten_calls"]
            == sum(r["decoder_aten_calls_by_op"].values())
        )
        assert "criterion" in r["decoder_aten_calls_train_by_stage"]
        assert "other_processes_cpu_share" in r["load_info"]["load"]
    assert data["a"]["csla_enabled"] is True and data["b"]["csla_enabled"] is False
    assert data["b"]["load_info"]["opts"][-1] == "model.criterion.assigner.enabled=False"
    for key in ("inference_images_per_s", "train_step_s", "train_peak_memory_bytes"):
        assert key in data["ratios"]
    assert data["ratios"]["params"] == 1.0


def test_decoder_only_and_stress(bench, tmp_path):
    out = tmp_path / "dec.json"
    bench.main(
        [
            "--config-file",
            DEMO,
            "--image-size",
            "64",
            "96",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--decoder-only",
            "--stress",
            "1",
            "--no-flops",
            "--threads",
            "1",
            "--json",
            str(out),
            *TINY,
        ]
    )
    data = json.loads(out.read_text())
    assert data["b"] is None and data["a"]["decoder_only_s"] > 0
    assert data["a"]["inference_images_per_s"] is None  # whole model not timed with --decoder-only
    parts = data["stress"]["models"]["a"]
    assert set(parts) == {"decoder", "backbone"} and all(p["slowdown"] > 0 for p in parts.values())


def _r50_100q_decoder_matrix_product_flops_by_hand() -> int:
    """Multiply-adds of every matrix product of one batch-1 inference of the R50-100q decoder
    (configs/common/models/stageinteractor_r50.py), from the architecture dimensions."""
    N, D, G, H, FFN, K = 100, 256, 4, 8, 2048, 80  # queries, dim, groups, heads, FFN, classes
    C = D // G  # 64 channels per group
    P_OUT = 128
    total = 0
    for s in range(6):
        p = 64 if s == 0 else 32  # sampled points per group
        kb = 8 if p == 64 else 4  # spatial blocks K = 2^floor(log2 sqrt(P))
        sub = p // kb  # sub-points per block
        n = max(0, min(s - 2 + 1, 4))  # reused channel filters (reuse from stage 2, max 4)
        ns = 1 if s >= 2 else 0  # reused spatial filters
        cur = P_OUT // (ns + 1)  # generated spatial-filter rows
        # attention: in_proj (N x D -> 3D), QK^T and AV (H heads of D/H: N*N*D each), out_proj
        total += N * D * 3 * D + 2 * N * N * D + N * D * D
        # the fused generator GEMM: rows per group = offsets 3K, M C*C, S P*cur, b_M C, b_S P_out,
        # beta n*C, gates 2*n*C, and u (P_out - cur), v P when spatial reuse
        rows = (
            3 * kb
            + C * C
            + p * cur
            + C
            + P_OUT
            + n * C
            + 2 * n * C
            + ((P_OUT - cur) + p if ns else 0)
        )
        total += N * D * G * rows
        total += N * D * 3 * sub  # shared sub-point offsets gen_double_d (D -> 3S)
        mb = N * G  # independent mixing problems
        total += mb * p * C * C  # channel mixing with M_cur: (P, C) @ (C, C)
        total += n * mb * p * C * C  # cascade: one (P, C) @ (C, C) per reused filter
        total += n * (mb * kb * (sub * C) ** 2 + mb * sub * (kb * C) ** 2)  # static intra/inter
        total += mb * P_OUT * p * C  # spatial mixing (P_out, P) @ (P, C)
        total += N * (G * P_OUT * C) * D  # mixing out_proj
        total += 2 * N * D * FFN  # FFN
        total += N * D * D + N * D * K  # classification branch
        total += N * D * D + N * D * 4  # regression branch
    return total


def test_r50_decoder_flops_match_hand_count():
    cfg = LazyConfig.load(str(REPO / "configs/stageinteractor/stageinteractor_r50_100q_1x.py"))
    torch.manual_seed(0)
    decoder = instantiate(cfg.model.decoder).eval()

    class AllStages(
        nn.Module
    ):  # every stage's outputs kept (no dead-code elimination in the trace)
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, f0, f1, f2, f3, sizes):
            return tuple(
                o[k] for o in self.decoder([f0, f1, f2, f3], sizes) for k in ("logits", "boxes")
            )

    feats = [torch.randn(1, 256, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    with torch.no_grad():
        analysis = flop_analysis(AllStages(), (*feats, torch.tensor([[60.0, 90.0]])))
    expected = _r50_100q_decoder_matrix_product_flops_by_hand()
    assert expected == 18_838_528_000  # 18.84 GMAC of matrix products
    assert matrix_product_flops(analysis, "decoder") == expected
    ops = analysis.by_operator()
    assert ops["baddbmm"] > 0 and ops["scaled_dot_product_attention"] == 6 * 2 * 100 * 100 * 256


def test_matmul_handle_broadcasts():
    class Spatial(nn.Module):
        def forward(self, w, x):
            return torch.matmul(w, x)  # (P, P) @ (M, P, C): batch broadcast

    with torch.no_grad():
        a = flop_analysis(Spatial(), (torch.randn(8, 8), torch.randn(5, 8, 3)))
    assert a.total() == 5 * 8 * 8 * 3


# ------------------------------------------------------------------ same-run reference (issue 15)
FAKE_WORKER = r'''
import json, sys, time
args = sys.argv[1:]
threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 0
size = [int(args[args.index("--size") + 1]), int(args[args.index("--size") + 2])]
def reply(o):
    sys.stdout.write(json.dumps(o) + "\n"); sys.stdout.flush()
reply({"ready": True, "torch": "fake", "threads": threads, "size": size})
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
        reply({"bye": True}); break
    if cmd in ("decoder", "backbone", "whole"):
        time.sleep(0.001)
        reply({"wall_s": {"decoder": 0.5, "backbone": 0.25, "whole": 2.0}[cmd], "cpu_s": 0.4})
    elif cmd == "count":
        reply({"aten_calls": 2865, "by_op": {"aten.view": 733, "aten.mul": 306}})
    else:
        reply({"error": "unknown command " + cmd})
'''


def _fake_reference(tmp_path):
    worker = tmp_path / "fake_official.py"
    worker.write_text(FAKE_WORKER)
    repo = tmp_path / "official_repo"
    repo.mkdir()
    import sys

    return ["--official-python", sys.executable, "--official-repo", str(repo), "--official-worker", str(worker)]


def test_official_reference_protocol_ratios_and_roofline(bench, tmp_path):
    """A fake worker (fixed reported times) stands in for the authors' environment: the ratios are
    computed from the worker-reported times, interleaved with ours, also under --stress."""
    out = tmp_path / "off.json"
    bench.main(
        [
            "--config-file", DEMO, "--image-size", "64", "96", "--iters", "3", "--warmup", "0",
            "--decoder-only", "--count-ops", "--stress", "1", "--threads", "1", "--json", str(out),
            *_fake_reference(tmp_path), *TINY,
        ]
    )
    data = json.loads(out.read_text())
    off = data["official"]
    assert "skipped" not in off and off["threads"] == 1 and off["size"] == [64, 96]
    assert off["decoder_aten_calls"] == 2865
    assert off["decoder_s"]["median"] == 0.5 and off["decoder_cpu_s"]["median"] == 0.4
    ours = data["a"]["decoder_only_s_spread"]["values"]
    r = data["ratios_vs_official"]["decoder"]
    assert r["median"] == pytest.approx(0.5 / data["a"]["decoder_only_s"])
    assert r["paired"] == pytest.approx(sorted(0.5 / t for t in ours)[1])
    assert r["cpu"] == pytest.approx(0.4 / data["a"]["decoder_only_cpu_s_spread"]["median"])
    roof = data["roofline"]
    assert roof["sgemm_n"] == 2048 and roof["sgemm_macs_per_s"] > 1e8
    macs = data["a"]["flops"]["decoder"]
    assert roof["decoder_macs"] == macs > 0
    assert roof["decoder_fraction"] == pytest.approx(
        macs / data["a"]["decoder_only_s"] / roof["sgemm_macs_per_s"]
    )
    assert roof["official_decoder_fraction"] == pytest.approx(macs / 0.5 / roof["sgemm_macs_per_s"])
    st = data["stress"]
    assert set(st["models"]) == {"a", "official"} and st["models"]["official"]["decoder"]["slowdown"] == 1.0
    assert {"decoder_speedup_idle", "decoder_speedup_stressed", "backbone_speedup_stressed"} <= set(
        st["vs_official"]
    )
    assert st["roofline"]["sgemm_stressed_macs_per_s"] > 0


def test_official_reference_whole_model(bench, tmp_path):
    out = tmp_path / "whole.json"
    bench.main(
        [
            "--config-file", DEMO, "--image-size", "64", "96", "--iters", "2", "--warmup", "0",
            "--no-flops", "--no-roofline", "--threads", "1", "--json", str(out),
            *_fake_reference(tmp_path), *TINY,
        ]
    )
    data = json.loads(out.read_text())
    assert data["official"]["whole_s"]["median"] == 2.0
    ours = data["a"]["inference_s_spread"]["median"]
    assert data["ratios_vs_official"]["whole"]["median"] == pytest.approx(2.0 / ours)
    assert data["roofline"] == {"skipped": "--no-roofline"}


def test_official_reference_skipped_with_reason(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OFFICIAL_PY", raising=False)
    monkeypatch.delenv("OFFICIAL_REPO", raising=False)
    out = tmp_path / "skip.json"
    bench.main(
        [
            "--config-file", DEMO, "--image-size", "64", "96", "--iters", "1", "--warmup", "0",
            "--decoder-only", "--no-flops", "--no-roofline", "--threads", "1", "--json", str(out),
            *TINY,
        ]
    )
    data = json.loads(out.read_text())
    assert "not given" in data["official"]["skipped"] and data["ratios_vs_official"] == {}
    assert "authors' reference: skipped" in capsys.readouterr().out


def test_perturb_decoder_changes_only_the_decoder():
    from stageinteractor.benchmark.models import perturb_decoder

    cfg = LazyConfig.load(DEMO)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_decoder(model, 0.02)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)


def test_official_worker_gets_the_allocator_environment(tmp_path):
    """--malloc retain applies to both sides: the worker is started with glibc's variables."""
    from stageinteractor.cpu_allocator import GLIBC_ENV

    worker = tmp_path / "env_worker.py"
    worker.write_text(
        "import json, os, sys\n"
        "print(json.dumps({'ready': True, 'env': os.environ.get('MALLOC_MMAP_THRESHOLD_')}), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    import sys

    for env, expected in ((dict(GLIBC_ENV), GLIBC_ENV["MALLOC_MMAP_THRESHOLD_"]), (None, None)):
        ref = OfficialReference(sys.executable, str(tmp_path), 1, (64, 96), worker=str(worker),
                                env=env)
        try:
            assert ref.ready()["env"] == expected
        finally:
            ref.proc.kill()
            ref.proc.wait()


def test_load_monitor_counts_a_live_helper_as_own():
    """A running child's CPU time is not in os.times() until it is waited for: without its pid the
    monitor would report the authors' worker as 'other processes'."""
    import subprocess
    import sys
    import time

    from stageinteractor.benchmark.load import LoadMonitor, pid_cpu
    from stageinteractor.benchmark.stress import BUSY_LOOP

    child = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, "30"])
    try:
        time.sleep(0.3)
        with_pid, without = LoadMonitor(live_pids=(child.pid,)), LoadMonitor()
        c0 = pid_cpu(child.pid)
        time.sleep(1.5)
        r_with, r_without = with_pid.result(), without.result()
        c1 = pid_cpu(child.pid)
    finally:
        child.kill()
        child.wait()
    assert c1 - c0 > 0.5  # the child was busy
    diff = r_without["other_processes_cpu_share"] - r_with["other_processes_cpu_share"]
    expected = (c1 - c0) / (r_with["wall_s"] * r_with["cpus"])
    assert diff == pytest.approx(expected, abs=0.08)


# ------------------------------------------------------------------ issue 21 item 5, issue 22
@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_amp_autocast_is_the_trainers():
    """--amp times what training runs: the Trainer's autocast dtype on each device, and on CUDA
    its GradScaler (independent answer: stageinteractor.d2.engine.Trainer itself)."""
    from stageinteractor.benchmark.steps import TrainStep, autocast
    from stageinteractor.d2.engine import Trainer

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for device in ("cuda", "cpu"):
        trainer = Trainer(model, [None], opt, device=device, amp=True)
        assert autocast(device, True).fast_dtype == trainer._autocast().fast_dtype
        step = TrainStep(model, None, device, amp=True)
        assert (step.scaler is None) == (trainer.grad_scaler is None)
        assert type(step.scaler) is type(trainer.grad_scaler)


def test_missing_official_python_is_a_one_line_error(tmp_path):
    """Issue 22: a --official-python naming a missing file ended in 'skipped', exit 0."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--config-file", DEMO, "--image-size", "64", "96",
         "--iters", "1", "--warmup", "0", "--decoder-only", "--no-flops", "--no-roofline",
         "--threads", "1", "--official-python", str(tmp_path / "no_python"),
         "--official-repo", str(tmp_path), *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"benchmark: error: authors' reference: python '{tmp_path / 'no_python'}' does not exist")
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args, line", [
    (["--config-file", "configs/no_such.py"], "benchmark: error: config file "
     "'configs/no_such.py' does not exist"),
    (["--config-file", DEMO, "model.decoder.num_querys=10"], "did you mean"),
    (["--config-file", DEMO, "--compare-opts", "model.decoder.sampler=grouepd"], "grouepd"),
])
def test_config_mistakes_end_in_one_line(args, line):
    """Issue 22: the tools' front (stageinteractor.d2.cli) -- one line, exit 2, nothing run."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "tools/benchmark.py", *args, "--image-size", "64", "96",
                        "--iters", "1", "--decoder-only", "--no-flops", "--no-roofline"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and line in err[-1] and err[-1].startswith("benchmark: error: ")
    assert "Traceback" not in p.stderr and "decoder-only:" not in p.stderr


def test_memory_worker_reports_a_positive_peak():
    """The fresh-process CPU memory measurement (python -m stageinteractor.benchmark.memory):
    the float32 weights of the tiny demo model at least."""
    from stageinteractor.benchmark.memory import measure_memory_cpu
    from stageinteractor.benchmark.models import build_model, param_counts

    res = measure_memory_cpu({"a": (DEMO, TINY)}, repeats=1, image_size=(64, 96), batch_size=1,
                             threads=1)
    model, _ = build_model(DEMO, TINY, "cpu")
    params = param_counts(model)["total"]
    assert len(res["a"]) == 1 and res["a"][0] >= 4 * params  # float32 weights at least


# ------------------------------------------------------------------ issue 23 item 5
FAKE_TRAIN_WORKER = r'''
import json, sys
args = sys.argv[1:]
if "--memory" in args:
    print("MEMORY_RESULT " + json.dumps({"train_peak_memory_bytes": 3 * 2**20}), flush=True)
    sys.exit(0)
batch = int(args[args.index("--batch") + 1])
print(json.dumps({"ready": True, "torch": "fake", "threads": 1, "size": [64, 96], "batch": batch}),
      flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
        print(json.dumps({"bye": True}), flush=True)
        break
    print(json.dumps({"wall_s": 3.0, "cpu_s": 2.0} if cmd == "train" else {"error": cmd}),
          flush=True)
'''


def test_training_step_against_the_authors(bench, tmp_path):
    """--train with the authors' environment: their training step (a fake worker reporting 3 s,
    2 s CPU, 3 MiB) timed interleaved with ours, batch 2 (the inference reference is batch 1
    only: not started), our step clipped like theirs, peak memories side by side."""
    train_worker = tmp_path / "fake_train.py"
    train_worker.write_text(FAKE_TRAIN_WORKER)
    out = tmp_path / "train.json"
    bench.main(["--config-file", DEMO, "--image-size", "64", "96", "--iters", "2", "--warmup", "0",
                "--train", "--batch-size", "2", "--no-flops", "--no-roofline", "--threads", "1",
                "--memory-repeats", "1", "--json", str(out), *_fake_reference(tmp_path),
                "--official-train-worker", str(train_worker), *TINY])
    data = json.loads(out.read_text())
    off, vs, a = data["official"], data["ratios_vs_official"], data["a"]
    assert off["train_batch"] == 2 and "batch 1" in off["inference_skipped"]
    assert off["train_s"]["median"] == 3.0 and off["train_cpu_s"]["median"] == 2.0
    assert vs["train"]["median"] == pytest.approx(3.0 / a["train_step_s"])
    assert vs["train"]["cpu"] == pytest.approx(2.0 / a["train_cpu_s_spread"]["median"])
    assert off["train_peak_memory_bytes"] == 3 * 2**20
    assert vs["train_peak_memory_bytes"] == pytest.approx(3 * 2**20 / a["train_peak_memory_bytes"])
    assert data["settings"]["clip_grad"] == 1.0 and "whole" not in vs


def test_training_step_clips_the_global_gradient_norm():
    """--clip-grad: the gradient (3, 4, 0) (norm 5) is scaled to norm 1 before the step."""
    from stageinteractor.benchmark.steps import TrainStep

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x):
            return {"loss": (self.w * x).sum()}

    model = Lin()
    TrainStep(model, torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64), "cpu", False, clip=1.0)()
    assert torch.allclose(model.w.grad, torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64))
    TrainStep(model, torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64), "cpu", False, clip=1.0)()
    assert torch.allclose(model.w.grad, torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64))


def test_authors_training_batch_by_hand():
    """The authors' training worker's batch (no mmdet needed): 8 boxes per image inside it,
    labels in [0, 80), metas of the padded size."""
    from stageinteractor.official.train_worker import training_batch

    img, metas, boxes, labels = training_batch(2, 64, 96, seed=0)
    assert img.shape == (2, 3, 64, 96) and len(metas) == len(boxes) == len(labels) == 2
    for b, lab, m in zip(boxes, labels, metas):
        assert b.shape == (8, 4) and bool((b[:, 2:] > b[:, :2]).all())
        assert bool((b[:, 0] >= 0).all()) and bool((b[:, 2] <= 96 * (0.7 + 0.3)).all())
        assert bool((b[:, 3] <= 64 * (0.7 + 0.3)).all()) and lab.max() < 80 and lab.min() >= 0
        assert m["pad_shape"] == (64, 96, 3) and m["batch_input_shape"] == (64, 96)
