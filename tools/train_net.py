#!/usr/bin/env python3
r"""Train / evaluate a LazyConfig model on detectron2's engine (StageInteractor and detrex).

    python tools/train_net.py --config-file configs/demo/stageinteractor_demo.py \
        [--num-gpus N] [--resume] [--eval-only] [key=value ...] [+new.key=value ...]

Works unchanged for detrex configs (``train.clip_grad``, ``train.model_ema``,
``train.fast_dev_run``, ``train.device``), on CUDA and on CPU: ``--num-gpus N`` on a machine
without CUDA starts N CPU processes that talk over gloo. Unlike detrex's script it never
asserts CUDA: a config asking for ``cuda`` on a CPU-only machine falls back to ``cpu`` with a
warning.

Before anything is written (and before worker processes start) the command-line front
(``stageinteractor.d2.cli``) checks, failing with ONE line ``train_net: error: ...`` and exit
status 2: the config file, the overrides (unknown key -> "did you mean"), the decoder switch
values (-> the key and the allowed values), ``train.init_checkpoint`` (missing / corrupt /
truncated file, the authors' unconverted layout -> the converter command, a URL that cannot be
downloaded -> which file to put where), on ``--resume`` the latest checkpoint (corrupt -> the
newest intact one), the datasets the run reads (``--eval-only``: only the test split; see
``stageinteractor.d2.data.validate``; ``train.validate_data=False`` skips the dataset scan) and
the model's ``num_classes`` against the train datasets' categories. Nothing a later
``--resume`` could mistake for progress is written by a failed start. On the CPU the log says
how many torch threads the run uses (on a busy machine, fewer threads can be much faster:
``OMP_NUM_THREADS=1``).

Checkpoints are atomic (``stageinteractor.d2.engine.AtomicCheckpointer``). ``--resume``
restores model, optimizer, LR scheduler, iteration, grad scaler, EMA and the seed; with our
``ResumableTrainLoader`` the data stream continues at the resumed iteration and the model's
RNG is re-seeded per iteration, so a killed-and-resumed run reproduces the uninterrupted run
(``metrics.json`` is truncated to the resume point and logs raw, unsmoothed losses).
"""
import logging
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from stageinteractor.requirements import require  # noqa: E402

require("tools/train_net.py", "detectron2")


def _add_detrex_root() -> None:
    """Put detrex's repository root on sys.path so ``projects.<name>.modeling`` imports."""
    root = os.environ.get("DETREX_ROOT")
    if not root:
        try:
            import detrex

            root = os.path.dirname(os.path.dirname(os.path.abspath(detrex.__file__)))
        except ImportError:
            return
    if os.path.isdir(os.path.join(root, "projects")) and root not in sys.path:
        sys.path.append(root)


_add_detrex_root()

import torch  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, hooks, launch  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.events import (  # noqa: E402
    CommonMetricPrinter,
    JSONWriter,
    TensorboardXWriter,
)

from stageinteractor.d2.checkpoint_files import check_checkpoint, check_resume  # noqa: E402
from stageinteractor.d2.cli import (  # noqa: E402
    ConfigError,
    cfg_get as _get,
    check_num_classes,
    load_config,
    run_tool,
    split_overrides,
)
from stageinteractor.d2.data.validate import (  # noqa: E402
    dataset_names,
    validate_registered_dataset,
)
from stageinteractor.d2.engine import (  # noqa: E402
    AtomicCheckpointer,
    Trainer,
    create_ddp_model,
    truncate_metrics,
)

logger = logging.getLogger("stageinteractor.train_net")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def setup_cfg(args):
    """Load the config (strict overrides, switch check: stageinteractor.d2.cli), resolve the
    device."""
    cfg = load_config(args.config_file, args.opts)
    for key in ("model", "train"):
        if key not in cfg:
            raise ConfigError(f"config {args.config_file} has no top-level '{key}'")
    want = str(_get(cfg, "train.device", "") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if want.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("train.device=%s but CUDA is not available: "
                                            "using cpu", want)
        want = "cpu"
    cfg.train.device = want
    if "device" in cfg.model and str(cfg.model.device).startswith("cuda") and want == "cpu":
        cfg.model.device = "cpu"
    if _get(cfg, "train.fast_dev_run.enabled", False):
        cfg.train.max_iter, cfg.train.eval_period, cfg.train.log_period = 20, 10, 1
    return cfg


def preflight(args, cfg) -> None:
    """Checks that must pass before anything is written (run once, before workers start)."""
    ckpt = _get(cfg, "train.init_checkpoint", "")
    out = _get(cfg, "train.output_dir", "")
    resuming = bool(args.resume and not args.eval_only and out and os.path.isdir(out)
                    and check_resume(out))
    if ckpt and not resuming:
        local = check_checkpoint(ckpt, config_file=args.config_file)
        if local != ckpt:  # a URL, now in the download cache: workers load the file itself
            args.opts = list(args.opts) + [f"train.init_checkpoint={local}"]
    if _get(cfg, "train.validate_data", True):
        for name in dataset_names(cfg, eval_only=args.eval_only):
            stats = validate_registered_dataset(name)
            print(f"[train_net] dataset '{name}' ok: {stats}", flush=True)
    if not args.eval_only:
        check_num_classes(cfg, dataset_names(cfg, train_only=True))


# ----------------------------------------------------------------------------------------------
# evaluation / training
# ----------------------------------------------------------------------------------------------
def _ema():
    try:
        from detrex.modeling import ema
    except ImportError:
        raise ConfigError("train.model_ema.enabled=True needs detrex (detrex.modeling.ema)")
    return ema


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                               instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    if _get(cfg, "train.model_ema.enabled", False):
        with _ema().apply_model_ema_and_restore(model):
            ema_ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                                           instantiate(cfg.dataloader.evaluator))
            if comm.is_main_process():
                print_csv_format(ema_ret)
            ret.update(ema_ret)
    return ret


def _effective_seed(cfg) -> int:
    seed = int(_get(cfg, "train.seed", -1))
    if seed < 0:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        seed = comm.all_gather(seed)[0]  # rank 0's choice everywhere
    return seed


def do_train(args, cfg):
    device = cfg.train.device
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **_get(cfg, "train.ddp", {}))

    use_ema = bool(_get(cfg, "train.model_ema.enabled", False))
    ema_ckpt = {}
    if use_ema:
        _ema().may_build_model_ema(cfg, model)
        ema_ckpt = _ema().may_get_ema_checkpointer(cfg, model)

    clip = _get(cfg, "train.clip_grad", None)
    clip_params = dict(clip.params) if clip is not None and clip.get("enabled", False) else None
    trainer = Trainer(model, train_loader, optimizer, device=device,
                      amp=bool(_get(cfg, "train.amp.enabled", False)), clip_grad=clip_params,
                      seed=_effective_seed(cfg))
    output_dir = cfg.train.output_dir
    checkpointer = AtomicCheckpointer(model, output_dir, trainer=trainer, **ema_ckpt)

    ckpt_cfg = dict(_get(cfg, "train.checkpointer", {}) or {})
    eval_period = int(_get(cfg, "train.eval_period", 0) or 0)
    trainer.register_hooks([
        hooks.IterationTimer(),
        _ema().EMAHook(cfg, model) if use_ema else None,
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **ckpt_cfg) if comm.is_main_process() else None,
        hooks.EvalHook(eval_period, lambda: do_test(cfg, model)) if eval_period > 0 else None,
    ])

    checkpointer.resume_or_load(_get(cfg, "train.init_checkpoint", ""), resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if hasattr(train_loader, "set_start_iter"):
        train_loader.set_start_iter(start_iter, seed=trainer.seed)
    elif start_iter > 0:
        logger.warning("the train loader (%s) cannot skip to iteration %d: the data order "
                       "after resume differs from an uninterrupted run",
                       type(train_loader).__name__, start_iter)
    if comm.is_main_process():
        # drop records of iterations that will run again, then open the writers (append)
        os.makedirs(output_dir, exist_ok=True)
        n = truncate_metrics(os.path.join(output_dir, "metrics.json"), start_iter)
        if n:
            logger.info("dropped %d metrics.json records at/after iteration %d", n, start_iter)
        # window_size=1: metrics.json holds the raw (unsmoothed) value of each logged iteration
        writers = [CommonMetricPrinter(cfg.train.max_iter),
                   JSONWriter(os.path.join(output_dir, "metrics.json"), window_size=1),
                   TensorboardXWriter(output_dir)]
        if _get(cfg, "train.wandb.enabled", False):
            logger.warning("train.wandb is not supported by this train_net; ignored")
        trainer.register_hooks(
            [hooks.PeriodicWriter(writers, period=int(_get(cfg, "train.log_period", 20)))])
    comm.synchronize()
    trainer.train(start_iter, cfg.train.max_iter)
    _check_ranks_agree(model)


def _check_ranks_agree(model) -> None:
    """Log whether all processes ended with bit-identical parameters (DDP sanity check)."""
    if comm.get_world_size() == 1:
        return
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digests = comm.all_gather(h.hexdigest())
    if comm.is_main_process():
        if len(set(digests)) == 1:
            logger.info("parameters identical on all %d processes (sha256 %s)",
                        len(digests), digests[0][:16])
        else:
            logger.warning("parameters DIFFER across processes: %s", digests)


def main(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    setup_logger(_get(cfg, "train.output_dir", None), distributed_rank=comm.get_rank(),
                 name="stageinteractor", abbrev_name="si")
    if str(cfg.train.device) == "cpu":
        logger.info("torch threads: %d of %s CPU cores (on a busy machine fewer threads can be "
                    "much faster: OMP_NUM_THREADS=1, see the README)", torch.get_num_threads(),
                    os.cpu_count())
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        use_ema = bool(_get(cfg, "train.model_ema.enabled", False))
        extra = {}
        if use_ema:
            _ema().may_build_model_ema(cfg, model)
            extra = _ema().may_get_ema_checkpointer(cfg, model)
        AtomicCheckpointer(model, **extra).load(_get(cfg, "train.init_checkpoint", ""))
        if use_ema and _get(cfg, "train.model_ema.use_ema_weights_for_eval_only", False):
            _ema().apply_model_ema(model)
        return do_test(cfg, model)
    do_train(args, cfg)


def parse_args(argv=None):
    """detectron2's parser; flags may also follow the ``key=value`` overrides."""
    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    return default_argument_parser().parse_args(flags + overrides)


def _start(argv) -> int:
    args = parse_args(argv)
    cfg = setup_cfg(args)
    preflight(args, cfg)
    del cfg
    launch(main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    return 0


def cli(argv=None) -> int:
    """The command line: a user mistake ends in one line ``train_net: error: ...`` (status 2)."""
    return run_tool(_start, argv, tool="train_net")


if __name__ == "__main__":
    sys.exit(cli())
