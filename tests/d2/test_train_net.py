"""tools/train_net.py end to end with a tiny model (tests/d2/configs/tiny_train.py) on CPU.

Subprocess tests: resume after SIGKILL equals an uninterrupted run (weights and the losses in
metrics.json), two CPU processes (gloo) end with identical weights, bad inputs fail before
training with one message and leave nothing --resume could pick up, --eval-only runs COCO
evaluation. In-process tests: atomic checkpoints, strict overrides, gradient clipping.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig
from detectron2.utils.events import EventStorage

from stageinteractor.d2.cli import apply_overrides_strict
from stageinteractor.d2.engine import AtomicCheckpointer, Trainer, truncate_metrics
from stageinteractor.errors import CheckpointFileError, ConfigError

REPO = Path(__file__).resolve().parents[2]
CFG = "tests/d2/configs/tiny_train.py"
COMMON = ["train.max_iter=10", "train.checkpointer.period=3"]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return tmp_path_factory.mktemp("d2datasets")


def _env(root, **extra):
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cmd(*args):
    return [sys.executable, "tools/train_net.py", "--config-file", CFG, *args]


def _run(args, env, timeout=300):
    p = subprocess.run(_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _losses(out_dir):
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    return [(r["iteration"], r["total_loss"], r["loss_box"], r["loss_cls"], r["lr"])
            for r in recs if "total_loss" in r]


@pytest.fixture(scope="module")
def reference_run(datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    rc, log = _run([f"train.output_dir={out}", *COMMON], _env(datasets_root))
    assert rc == 0, log[-3000:]
    return out


@pytest.mark.slow
def test_demo_dataset_generated_lazily(reference_run, datasets_root):
    done = datasets_root / "stageinteractor_demo" / "DONE"
    assert done.is_file()
    assert json.loads(done.read_text())["stats"]["train"]["images"] == 600
    assert not [p for p in os.listdir(datasets_root) if p.startswith(".")]  # no temp dirs


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(reference_run, datasets_root, tmp_path):
    out = tmp_path / "killed"
    # slower steps and 2 loader workers (the reference used 0: the stream must not care)
    env = _env(datasets_root, TINY_WORKERS=2)
    proc = subprocess.Popen(_cmd(f"train.output_dir={out}", *COMMON, "model.step_sleep=0.25"),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "model_0000005.pth").exists():
            assert proc.poll() is None, "training ended before the kill"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model_final.pth").exists()
    tagged = (out / "last_checkpoint").read_text().strip()
    resume_from = int(tagged[len("model_"):-len(".pth")]) + 1
    # a checkpoint killed mid-write: a partial temporary file must never be picked
    (out / "model_0000008.pth.tmp-99999").write_bytes(b"PK\x03\x04 truncated")

    rc, log = _run([f"train.output_dir={out}", *COMMON, "--resume"], env)
    assert rc == 0, log[-3000:]
    assert f"Starting training from iteration {resume_from}" in log

    ref_w, w = _weights(reference_run / "model_final.pth"), _weights(out / "model_final.pth")
    assert ref_w.keys() == w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], w[k]), k
    ref_l, got = _losses(reference_run), _losses(out)
    assert [r[0] for r in ref_l] == list(range(10))
    assert got == ref_l


@pytest.mark.slow
def test_two_cpu_processes_agree(datasets_root, tmp_path):
    out = tmp_path / "ddp"
    rc, log = _run(["--num-gpus", "2", "--dist-url", "auto", f"train.output_dir={out}",
                    "train.max_iter=4", "train.checkpointer.period=2"], _env(datasets_root))
    assert rc == 0, log[-3000:]
    assert "World size: 2" in log
    assert "parameters identical on all 2 processes" in log
    assert (out / "model_final.pth").is_file() and (out / "log.txt.rank1").is_file()


@pytest.mark.slow
def test_eval_only_runs_coco_evaluation(reference_run, datasets_root):
    rc, log = _run(["--eval-only", f"train.output_dir={reference_run}/eval",
                    f"train.init_checkpoint={reference_run}/model_final.pth"],
                   _env(datasets_root))
    assert rc == 0, log[-3000:]
    assert "AP50" in log and "stageinteractor_demo_val" in log


def _bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [], "annotations": [{"id": 1, "image_id": 1')
    return p


def _train_net_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_net_under_test",
                                                  REPO / "tools" / "train_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["unknown_key", "corrupt_checkpoint", "missing_checkpoint",
                                  "bad_dataset"])
def test_bad_input_fails_before_training(case, datasets_root, tmp_path, monkeypatch, capsys):
    """In-process ``cli()`` (the same code the script runs before launching workers)."""
    out = tmp_path / "out"
    args = [f"train.output_dir={out}"]
    if case == "unknown_key":
        args.append("train.max_itr=3")
        expect = ["unknown config key 'train.max_itr'", "train.max_iter"]
    elif case == "corrupt_checkpoint":
        ck = tmp_path / "half.pth"
        ck.write_bytes(b"\x80\x02garbage" * 10)
        args.append(f"train.init_checkpoint={ck}")
        expect = [f"checkpoint file {ck} is corrupt"]
    elif case == "missing_checkpoint":
        args.append(f"train.init_checkpoint={tmp_path}/nope.pth")
        expect = [f"checkpoint file {tmp_path}/nope.pth does not exist"]
    else:
        bad = _bad_json(tmp_path)
        monkeypatch.setenv("TINY_JSON", str(bad))
        monkeypatch.setenv("TINY_IMAGES", str(tmp_path))
        expect = [f"{bad}: malformed JSON"]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_root))
    monkeypatch.chdir(REPO)
    rc = _train_net_module().cli(["--config-file", CFG, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("train_net: error:")]
    assert len(errors) == 1, err
    for e in expect:
        assert e in errors[0]
    assert not out.exists() or not (list(out.glob("*.pth*")) + list(out.glob("last_checkpoint")))


@pytest.mark.slow
def test_bad_input_subprocess_exit_status(datasets_root, tmp_path):
    out = tmp_path / "out"
    rc, log = _run([f"train.output_dir={out}", "model.nonexistent_knob=1"], _env(datasets_root))
    assert rc == 2 and "Traceback" not in log
    assert "train_net: error: unknown config key 'model.nonexistent_knob'" in log
    assert not out.exists()


# ------------------------------------------------------------------------------ in-process
def _model():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_atomic_checkpointer_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    m = _model()
    ck = AtomicCheckpointer(m, str(tmp_path))
    ck.save("model_0000001")
    good = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000003")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]

    m2 = nn.Linear(3, 2)
    AtomicCheckpointer(m2, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, good[k])


def test_checkpointer_ignores_dangling_tag_and_names_corrupt_file(tmp_path):
    m = _model()
    ck = AtomicCheckpointer(m, str(tmp_path))
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    assert not ck.has_checkpoint()
    (tmp_path / "model_0000009.pth").write_bytes(b"not a checkpoint")
    assert ck.has_checkpoint()
    with pytest.raises(CheckpointFileError, match="model_0000009.pth"):
        ck.resume_or_load("", resume=True)


def test_strict_overrides():
    cfg = LazyConfig.load(str(REPO / "configs/common/train.py"))
    cfg = apply_overrides_strict(cfg, ["train.max_iter=5"])
    assert cfg.train.max_iter == 5
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.checkpointer\.perod'.*"
                                          r"'train\.checkpointer\.period'"):
        apply_overrides_strict(cfg, ["train.checkpointer.perod=3"])
    cfg = apply_overrides_strict(cfg, ["+train.extra=7"])
    assert cfg.train.extra == 7
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        apply_overrides_strict(cfg, ["+nope.x=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides_strict(cfg, ["train.max_iter"])


def test_truncate_metrics(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text("".join(json.dumps({"iteration": i, "x": i}) + "\n" for i in range(6))
                 + '{"iteration": 6, "x"')  # last line cut by a crash
    assert truncate_metrics(str(p), 4) == 3
    assert [json.loads(line)["iteration"] for line in p.read_text().splitlines()] == [0, 1, 2, 3]


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 4.0]))

    def forward(self, batch):
        return {"loss_a": (self.w * torch.tensor([10.0, 10.0])).sum()}  # grad = (10, 10)


def test_trainer_clips_global_grad_norm():
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tr = Trainer(model, [[{}]] * 3, opt, clip_grad={"max_norm": 1.0, "norm_type": 2}, seed=0)
    with EventStorage(0) as storage:
        tr.iter = 0
        tr.run_step()
        # |g| = 10*sqrt(2) -> clipped to 1: step = g / |g| = (1/sqrt2, 1/sqrt2)
        expect = torch.tensor([3.0, 4.0]) - torch.tensor([1.0, 1.0]) / 2 ** 0.5
        assert torch.allclose(model.w.detach(), expect, atol=1e-6)
        assert abs(storage.latest()["grad_norm"][0] - 10 * 2 ** 0.5) < 1e-4


def test_trainer_reseeds_per_iteration():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(64))
            self.draws = []

        def forward(self, batch):
            self.draws.append(torch.rand(3))
            return {"loss": self.w.sum() * 0}

    def run(start):
        m = Drop()
        tr = Trainer(m, [[{}]] * 10, torch.optim.SGD(m.parameters(), lr=0.1), seed=5)
        with EventStorage(start):
            for it in range(start, 4):
                tr.iter = it
                tr.run_step()
        return m.draws

    full, resumed = run(0), run(2)
    assert torch.equal(torch.stack(full[2:]), torch.stack(resumed))


# ------------------------------------------------------------------------- common configs
def test_common_schedule_values():
    from detectron2.config import instantiate

    sched = LazyConfig.load(str(REPO / "configs/common/schedule.py"))
    s1x = instantiate(sched.lr_multiplier_1x)
    total = 12 * 7330
    assert abs(s1x(0.0) - 0.001) < 1e-9  # warm-up starts at 0.001 * lr
    assert abs(s1x(250 / total) - (0.001 + 0.999 * 0.5)) < 1e-3  # linear, half-way
    assert s1x(500 / total) == 1.0
    assert s1x((8 * 7330 - 1) / total) == 1.0 and abs(s1x(8 * 7330 / total) - 0.1) < 1e-12
    assert abs(s1x(11 * 7330 / total) - 0.01) < 1e-12
    s3c = instantiate(sched.lr_multiplier_3x_crop)
    assert s3c((24 * 7330 - 1) / (36 * 7330)) == 1.0
    assert abs(s3c(24 * 7330 / (36 * 7330)) - 0.1) < 1e-12
    swin = instantiate(sched.lr_multiplier_3x_crop_swin)
    assert swin(999 / (36 * 7330)) < 1.0 and swin(1000 / (36 * 7330)) == 1.0


def test_common_optimizers_decay_rules():
    from detectron2.config import instantiate

    optim = LazyConfig.load(str(REPO / "configs/common/optim.py"))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.attention_norm = nn.LayerNorm(4)
            self.cls_fcs = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.relative_position_bias_table = nn.Parameter(torch.zeros(3))

    m = M()
    cfg = optim.AdamW
    cfg.params.model = m
    opt = instantiate(cfg)
    assert opt.defaults["lr"] == 2.5e-5 and opt.defaults["betas"] == (0.9, 0.999)
    n = 0
    for g in opt.param_groups:  # every parameter decayed, norms and biases included
        assert g["weight_decay"] == 1e-4 and g["lr"] == 2.5e-5
        n += len(g["params"])
    assert n == len(list(m.parameters()))
    cfg = optim.AdamW_swin
    cfg.params.model = m
    opt = instantiate(cfg)
    names = {id(p): k for k, p in m.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {"attention_norm.weight", "attention_norm.bias",
                        "relative_position_bias_table"}  # cls_fcs.1.* keep decay (numeric name)


def test_trainer_cpu_bf16_autocast_step():
    model = nn.Sequential(nn.Linear(4, 4))
    seen = []

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, batch):
            y = self.m(torch.ones(2, 4))
            seen.append(y.dtype)
            return {"loss": y.float().pow(2).mean()}

    w = Wrap()
    tr = Trainer(w, [[{}]] * 2, torch.optim.SGD(w.parameters(), lr=0.1), device="cpu", amp=True,
                 clip_grad={"max_norm": 1.0})
    before = model[0].weight.detach().clone()
    with EventStorage(0):
        tr.iter = 0
        tr.run_step()
    assert seen == [torch.bfloat16] and tr.grad_scaler is None
    assert not torch.equal(before, model[0].weight)
