"""The parts of the measuring package ``stageinteractor.benchmark`` that need no detectron2,
each against answers computed by hand: statistics, load arithmetic, the stress summary, the
interleaved and on/off timing (fake clocks), the roofline figures and its device, the A/B and
vs-the-authors ratios, training's AMP in the timed training step, and the reference client's
settings and line protocol (a worker written here)."""

import sys

import pytest
import torch
from torch import nn

from stageinteractor.benchmark import load, report, roofline, stats, steps, stress, timing
from stageinteractor.official import reference_client as rc


# ------------------------------------------------------------------ stats
def test_spread_quartiles_and_single_value():
    s = stats.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["n"]) == (
        3.0, 2.0, 4.0, 2.0, 1.0, 5.0, 5)
    assert s["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    one = stats.spread([7])
    assert (one["q1"], one["q3"], one["iqr"]) == (7.0, 7.0, 0.0)
    assert stats.spread([]) is None


def test_ratios_and_speedups():
    assert stats.ratio(3, 4) == 0.75 and stats.ratio(None, 4) is None and stats.ratio(1, 0) is None
    sp = stats.speedups([2.0, 4.0, 9.0], [1.0, 2.0, 2.0])  # medians 4 / 2; pairs 2, 2, 4.5
    assert sp == {"median": 2.0, "paired": 2.0}
    assert stats.paired_median_ratio([1.0, 3.0, 8.0], [2.0, 1.0, 2.0]) == 3.0  # 0.5, 3, 4
    assert stats.paired_median_ratio([1.0, 3.0, 8.0], [2.0, 1.0, 2.0], invert=True) == 1 / 3


# ------------------------------------------------------------------ load
def test_proc_stat_parsing():
    # user nice system idle iowait irq softirq steal: busy = 100+20+30+6+7+8 ticks
    assert load.parse_proc_stat("cpu  100 20 30 400 50 6 7 8 0 0", 100) == pytest.approx(1.71)
    assert load.parse_proc_stat("cpu  100 20 30 400 50 6 7", 100) == pytest.approx(1.63)
    # a command name with spaces and ')' ; utime 250, stime 50 ticks
    text = "1234 (a b) c) S " + " ".join(str(i) for i in range(1, 11)) + " 250 50 0 0 20 0"
    assert load.parse_pid_stat(text, 100) == pytest.approx(3.0)


def test_other_processes_share_and_busy():
    assert load.others_share(3.0, 1.0, 2.0, 2) == 0.5  # (3 - 1) / (2 s x 2 cores)
    assert load.others_share(1.0, 1.5, 2.0, 2) == 0.0  # clamped
    assert load.others_share(None, 1.0, 2.0, 2) is None
    assert load.is_busy(0.25, [None, None], 2)
    assert load.is_busy(0.1, [1.6, None], 2)  # 1.6 > 0.75 x 2
    assert not load.is_busy(0.1, [1.4, 0.2], 2)
    assert not load.is_busy(None, [None], 2)


# ------------------------------------------------------------------ stress
def test_stress_summary_by_hand():
    idle = {"a.decoder": [1.0, 2.0, 3.0], "a.backbone": [2.0, 2.0, 2.0],
            "official.decoder": [4.0, 4.0, 4.0], "official.backbone": [6.0, 6.0, 6.0],
            "roofline.sgemm": [2.0, 2.0, 2.0]}
    busy = {k: [2 * x for x in v] for k, v in idle.items()}
    busy["a.backbone"] = [3.0, 3.0, 3.0]
    out = stress.stress_summary(idle, busy, workers=2, roofline_n=10)
    assert out["workers"] == 2 and set(out["models"]) == {"a", "official"}
    assert out["models"]["a"]["decoder"]["slowdown"] == 2.0
    assert out["models"]["a"]["backbone"]["slowdown"] == 1.5
    vs = out["vs_official"]
    assert vs["decoder_speedup_idle"] == {"median": 2.0, "paired": 2.0}  # 4 / (1, 2, 3)
    assert vs["backbone_speedup_stressed"]["median"] == 4.0  # 12 / 3
    assert out["roofline"] == {"sgemm_idle_macs_per_s": 500.0, "sgemm_stressed_macs_per_s": 250.0}


def test_stressor_stops_its_workers():
    with stress.Stressor(2, limit_s=30) as s:
        procs = list(s.procs)
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


# ------------------------------------------------------------------ timing
class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_interleaved_abba_order_times_and_reported_times():
    clock, calls = _FakeClock(), []

    def fn(name, dt):
        def run():
            calls.append(name)
            clock.t += dt
        return run

    def reported():
        calls.append("ref")
        clock.t += 100.0  # the pipe's time must not count: the worker's own times do
        return {"wall_s": 0.5, "cpu_s": 0.25}

    cpu = {}
    times = timing.interleaved({"a": fn("a", 1.0), "b": fn("b", 3.0), "ref": reported}, iters=2,
                               warmup=1, device="cpu", what="t", cpu_times=cpu, clock=clock,
                               cpu_clock=clock)
    assert calls == ["a", "b", "ref", "a", "b", "ref", "ref", "b", "a"]  # warm-up, A B C, C B A
    assert times == {"a": [1.0, 1.0], "b": [3.0, 3.0], "ref": [0.5, 0.5]}
    assert cpu == {"a": [1.0, 1.0], "b": [3.0, 3.0], "ref": [0.25, 0.25]}


def test_on_off_medians_exclude_warmup():
    clock, state = _FakeClock(), {"on": False, "n": 0}

    def run():
        state["n"] += 1
        clock.t += 50.0 if state["n"] <= 2 else (0.003 if state["on"] else 0.002)

    res = timing.on_off(lambda f: state.update(on=f), run, repeats=3, warmup=1, clock=clock)
    assert res["off_ms"] == pytest.approx(2.0) and res["on_ms"] == pytest.approx(3.0)
    assert res["extra_ms"] == pytest.approx(1.0) and res["extra_pct"] == pytest.approx(50.0)
    assert res["repeats"] == 3 and state["n"] == 8


# ------------------------------------------------------------------ roofline
def test_roofline_figures_by_hand():
    out = roofline.roofline_figures([2.0, 4.0, 6.0], 10, "decoder", 500, [1.0, 2.0, 3.0], [4.0])
    assert out["sgemm_macs_per_s"] == 250.0  # 10^3 / median 4
    assert out["decoder_macs"] == 500 and out["decoder_fraction"] == 1.0  # 500 / 2 / 250
    assert out["official_decoder_fraction"] == 0.5  # 500 / 4 / 250
    assert out["sgemm_s"]["median"] == 4.0 and out["sgemm_n"] == 10
    none = roofline.roofline_figures([1.0], 10, "whole", None, [1.0])
    assert none["whole_fraction"] is None and "no FLOP count" in none["note"]


def test_roofline_runs_on_the_measured_device_and_once_on_cuda():
    """Issue 21 item 8: GPU rows timed a CPU sgemm in every iteration."""
    assert roofline.interleave_roofline("cpu") and not roofline.interleave_roofline("cuda")
    assert not roofline.interleave_roofline("cuda:0")
    out = roofline.sgemm_fn(8, "meta")()  # the stand-in device: the product lives there
    assert out.device.type == "meta" and out.shape == (8, 8)
    a = roofline.sgemm_fn(8, "cpu")()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    assert torch.equal(a, x @ y)
    assert len(roofline.measure_once("cpu", 3, n=8)) == 3


# ------------------------------------------------------------------ report
def _side(inf, train, mem, dec, params, flops):
    r = report.empty_result({}, {"total": params})
    r.update(inference_images_per_s=inf, train_step_s=train, train_peak_memory_bytes=mem,
             decoder_only_s=dec, flops={"total": flops})
    return r


def test_ab_ratios_by_hand():
    a, b = _side(2.0, 3.0, 100, None, 10, 40), _side(4.0, 1.5, 50, None, 5, None)
    times = {"inference": {"a": [1.0, 2.0, 4.0], "b": [2.0, 1.0, 1.0]},
             "train": {"a": [3.0, 3.0, 3.0], "b": [1.0, 2.0, 1.5]}}
    a["inference_cpu_s_spread"], b["inference_cpu_s_spread"] = {"median": 0.5}, {"median": 1.0}
    r = report.ab_ratios(a, b, times)
    assert r["inference_images_per_s"] == 0.5 and r["train_step_s"] == 2.0
    assert r["train_peak_memory_bytes"] == 2.0 and r["params"] == 2.0 and r["flops"] is None
    assert r["decoder_only_s"] is None and "decoder_only_s_paired" not in r
    assert r["inference_images_per_s_paired"] == 0.5  # b/a per pair: 2, 0.5, 0.25
    assert r["train_step_s_paired"] == 2.0  # a/b per pair: 3, 1.5, 2
    assert r["inference_images_per_s_cpu"] == 2.0  # throughput: 1 / (0.5 / 1.0)


def test_official_ratios_and_side_figures():
    times = {"decoder_only": {"a": [1.0, 2.0, 3.0], "official": [4.0, 4.0, 9.0]}}
    cpu = {"decoder-only": {"a": [0.5, 0.5, 1.0], "official": [2.0, 2.0, 2.0]}}
    off = {}
    vs = report.official_ratios(times, cpu, off)
    assert vs == {"decoder": {"median": 2.0, "paired": 3.0, "cpu": 4.0}}
    assert off["decoder_s"]["median"] == 4.0 and off["decoder_cpu_s"]["median"] == 2.0
    r = report.empty_result({}, {"total": 1})
    report.side_figures(r, "a", times, cpu, batch_size=2)
    assert r["decoder_only_s"] == 2.0 and r["decoder_only_images_per_s"] == 1.0
    assert r["decoder_only_cpu_s_spread"]["median"] == 0.5 and r["inference_images_per_s"] is None


# ------------------------------------------------------------------ steps: training's AMP
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, batch):
        return {"loss": (self.w * batch).sum(), "note": 1.0}


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
def test_amp_is_trainings_float16_with_grad_scaler_on_cuda():
    """Issue 21 item 5: --amp on CUDA was bfloat16 without a GradScaler."""
    assert steps.amp_dtype("cuda") == torch.float16 and steps.amp_dtype("cuda:1") == torch.float16
    assert steps.amp_dtype("cpu") == torch.bfloat16
    model, x = _Tiny(), torch.ones(3, dtype=torch.float64)
    cuda_step = steps.train_fn(model, x, "cuda", amp=True)
    assert isinstance(cuda_step.scaler, torch.amp.GradScaler)
    assert steps.train_fn(model, x, "cuda", amp=False).scaler is None
    cpu_step = steps.train_fn(model, x, "cpu", amp=True)
    assert cpu_step.scaler is None
    cpu_step()  # AdamW, lr 1e-6: every weight moves by about -lr (gradient 1 > 0)
    expected = torch.full((3,), 1 - 1e-6 - 1e-6 * 1e-4, dtype=torch.float64)
    assert torch.allclose(model.w.detach(), expected, atol=1e-13, rtol=0)


# ------------------------------------------------------------------ reference client
def test_reference_settings(tmp_path):
    py, repo = sys.executable, str(tmp_path)
    kw = dict(device="cpu", amp=False, compile=False, batch_size=1)
    assert rc.resolve_reference(py, repo, environ={}, **kw) == (py, repo, None)
    assert "not given" in rc.resolve_reference(None, None, environ={}, **kw)[2]
    env = {"OFFICIAL_PY": py, "OFFICIAL_REPO": repo}
    assert rc.resolve_reference(None, None, environ=env, **kw) == (py, repo, None)
    with pytest.raises(rc.ReferenceSettingsError, match="does not exist"):
        rc.resolve_reference(str(tmp_path / "no_python"), repo, environ={}, **kw)
    with pytest.raises(rc.ReferenceSettingsError, match="not a directory"):
        rc.resolve_reference(py, str(tmp_path / "nope"), environ={}, **kw)
    with pytest.raises(rc.ReferenceSettingsError, match="--official-repo"):
        rc.resolve_reference(py, None, environ={}, **kw)
    gpu = dict(kw, device="cuda")
    with pytest.raises(rc.ReferenceSettingsError, match="float32 eager CPU"):
        rc.resolve_reference(py, repo, environ={}, **gpu)
    py2, _, why = rc.resolve_reference(None, None, environ=env, **gpu)  # a machine-wide default
    assert py2 is None and "not used" in why
    two = dict(kw, batch_size=2)
    with pytest.raises(rc.ReferenceSettingsError, match="batch 1"):
        rc.resolve_reference(py, repo, environ={}, **two)
    assert rc.resolve_reference(py, repo, environ={}, train=True, **two) == (py, repo, None)


ECHO_WORKER = r'''
import json, sys
args = sys.argv[1:]
size = [int(args[args.index("--size") + 1]), int(args[args.index("--size") + 2])]
threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 0
print(json.dumps({"ready": True, "torch": "x", "threads": threads, "size": size, "args": args}),
      flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
        print(json.dumps({"bye": True}), flush=True)
        break
    out = {"wall_s": 0.5, "cpu_s": 0.25} if cmd == "decoder" else {"error": "unknown " + cmd}
    print(json.dumps(out), flush=True)
'''


def test_reference_client_protocol(tmp_path):
    worker = tmp_path / "w.py"
    worker.write_text(ECHO_WORKER)
    with rc.OfficialReference(sys.executable, str(tmp_path), 2, (64, 96), worker=str(worker),
                              extra_args=["--seed", "3"]) as ref:
        info = ref.ready()
        assert info["threads"] == 2 and info["size"] == [64, 96]
        assert info["args"] == ["--repo", str(tmp_path), "--size", "64", "96", "--threads", "2",
                                "--seed", "3"]
        assert ref.fn("decoder")() == {"wall_s": 0.5, "cpu_s": 0.25}
        with pytest.raises(RuntimeError, match="unknown whole"):
            ref.call("whole")
        proc = ref.proc
    assert proc.poll() == 0  # `quit` answered and exited


def test_reference_worker_failure_names_its_stderr(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; sys.stderr.write('no mmdet here'); sys.exit(3)\n")
    ref = rc.OfficialReference(sys.executable, str(tmp_path), 1, (64, 96), worker=str(bad))
    with pytest.raises(RuntimeError, match="no mmdet here"):
        ref.ready()
    ref.close()
