"""Training engine pieces used by ``tools/train_net.py``.

* :class:`AtomicCheckpointer`: detectron2's ``DetectionCheckpointer`` whose checkpoint files and
  ``last_checkpoint`` tag are written atomically (temporary file, fsync, ``os.replace``), the tag
  only after the checkpoint file is complete. A checkpoint killed mid-write is therefore never
  the one ``--resume`` picks, and a tag pointing at a missing file is ignored.
* :class:`Trainer`: detectron2's ``SimpleTrainer`` plus AMP (CUDA float16 with a GradScaler, or
  CPU bfloat16 autocast), global-L2 gradient clipping, one device->host copy per step for all
  logged scalars (losses, the model's diagnostics, gradient norm), and per-iteration
  re-seeding: before step ``i`` the torch/numpy/python RNGs are seeded from
  ``(seed, i, rank)``, so any randomness in the model is a function of the iteration and a
  resumed run reproduces an uninterrupted one.
* :func:`create_ddp_model`: DistributedDataParallel that also works for CPU (gloo) processes.
* :func:`truncate_metrics`: drop ``metrics.json`` records at or after the resume iteration.

The command-line checks (strict overrides, switch values, checkpoint files, ``--resume``) are
the tools' front: :mod:`stageinteractor.d2.cli` and :mod:`stageinteractor.d2.checkpoint_files`;
the user-error types are in :mod:`stageinteractor.errors`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm

from stageinteractor.errors import CheckpointFileError

from .checkpoint import ImageNetInitMixin
from .deferred_scalars import deferring, take_pending, write_scalars

__all__ = ["AtomicCheckpointer", "Trainer", "make_grad_scaler", "create_ddp_model",
           "truncate_metrics", "atomic_write_bytes", "swin_optimizer_params", "build_adamw",
           "fused_adamw_supported",
           "authors_parameter_names", "SWIN_NO_DECAY_KEYS"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# atomic files and checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicCheckpointer(ImageNetInitMixin, DetectionCheckpointer):
    """``DetectionCheckpointer`` with crash-safe ``save`` and ``last_checkpoint`` handling.

    ImageNet backbone checkpoints given as ``train.init_checkpoint`` (detectron2 ``R-50.pkl``,
    torchvision, open-mmlab ResNeXt, official Swin) are key-mapped on load by
    :class:`~stageinteractor.d2.checkpoint.ImageNetInitMixin`; every key is accounted for."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        tmp = f"{save_file}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, save_file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"),
                           last_filename_basename.encode())

    def has_checkpoint(self) -> bool:
        if not super().has_checkpoint():
            return False
        path = self.get_checkpoint_file()
        if not path or not os.path.isfile(path):
            self.logger.warning(f"last_checkpoint in {self.save_dir} names {path!r}, which "
                                f"does not exist; ignoring it")
            return False
        return True

    def _load_file(self, f: str) -> Dict[str, Any]:
        try:
            return super()._load_file(f)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointFileError(
                f"cannot load checkpoint {f}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
def make_grad_scaler(device_type: str = "cuda"):
    """A GradScaler for ``device_type`` across the torch versions pyproject.toml allows:
    ``torch.amp.GradScaler(device_type)`` (torch >= 2.3), else ``torch.cuda.amp.GradScaler()``
    (CUDA only; older torch has no CPU scaler)."""
    scaler_cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler_cls is not None:
        return scaler_cls(device_type)
    if device_type == "cuda":
        return torch.cuda.amp.GradScaler()
    raise RuntimeError(f"torch {torch.__version__} has no GradScaler for {device_type!r} "
                       "(torch.amp.GradScaler needs torch >= 2.3)")


def _iteration_seeds(seed: int, iteration: int, rank: int) -> np.ndarray:
    return np.random.SeedSequence([int(seed), int(iteration), int(rank)]).generate_state(3)


class Trainer(SimpleTrainer):
    """``SimpleTrainer`` + AMP + gradient clipping + per-iteration seeding (see module doc).

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``; the model returns a dict of
            already-weighted scalar losses whose **sum** is optimised.
        device: "cuda" or "cpu" (selects the AMP flavour).
        amp: enable mixed precision (CUDA: float16 + GradScaler; CPU: bfloat16 autocast).
        clip_grad: ``None`` or kwargs of ``torch.nn.utils.clip_grad_norm_`` (``max_norm``,
            ``norm_type``), applied to all parameters (global norm).
        seed: base seed of the per-iteration re-seeding; ``None`` disables it.
        grad_scaler: with ``amp``, whether to scale the loss with a GradScaler
            (:func:`make_grad_scaler`); ``None`` (default): on CUDA only. ``True`` on the CPU
            runs the CUDA step's code path there (the host-sync counter's dry run uses it).
    """

    def __init__(self, model, data_loader, optimizer, *, device: str = "cpu",
                 amp: bool = False, clip_grad: Optional[Dict[str, Any]] = None,
                 seed: Optional[int] = None, grad_scaler: Optional[bool] = None):
        super().__init__(model, data_loader, optimizer)
        self.device_type = "cuda" if str(device).startswith("cuda") else "cpu"
        self.amp = bool(amp)
        self.clip_grad = dict(clip_grad) if clip_grad else None
        self.seed = seed
        self.grad_scaler = None
        if self.amp and (self.device_type == "cuda" if grad_scaler is None else grad_scaler):
            self.grad_scaler = make_grad_scaler(self.device_type)

    def _reseed(self) -> None:
        s = _iteration_seeds(self.seed, self.iter, comm.get_rank())
        torch.manual_seed(int(s[0]))
        np.random.seed(int(s[1]))
        random.seed(int(s[2]))

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def run_step(self):
        assert self.model.training, "[Trainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # after fetching: creating the loader iterator (worker seeds) consumes torch RNG
        if self.seed is not None:
            self._reseed()

        with self._autocast(), deferring():  # the model's device scalars wait for one copy
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
            self._pending_scalars = take_pending()

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()

        if self.clip_grad is not None:
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, **self.clip_grad)
                self._pending_scalars.append((["grad_norm"], norm.detach().reshape(1), False))

        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _write_metrics(self, loss_dict, data_time: float, prefix: str = "",
                       iter: Optional[int] = None) -> None:
        """detectron2's metrics (losses, ``total_loss``, ``data_time``, the non-finite loss
        check) plus the step's queued device scalars (diagnostics, ``grad_norm``), with ONE
        device->host copy for all of them (detectron2 copies each loss on its own)."""
        pending, self._pending_scalars = getattr(self, "_pending_scalars", []), []
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period != 0:
            return
        names = list(loss_dict)
        parts = [torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])]
        parts += [v.float() for _, v, _ in pending]
        host = torch.cat([p.to(parts[0].device) for p in parts]).cpu().tolist()
        # host tensors: detectron2's `.cpu().item()` on them is free
        host_losses = {n: torch.tensor(host[i], dtype=torch.float64) for i, n in enumerate(names)}
        try:
            SimpleTrainer.write_metrics(host_losses, data_time, iter, prefix)
        except Exception:
            logger.exception("Exception in writing metrics: ")
            raise
        k = len(names)
        for extra_names, values, hint in pending:
            write_scalars(extra_names, host[k:k + len(extra_names)], hint)
            k += len(extra_names)

    def state_dict(self):
        ret = super().state_dict()
        ret["seed"] = self.seed
        # plain python/tensor types only, so torch.load(weights_only=True) accepts it
        np_state = np.random.get_state()
        ret["rng"] = {"torch": torch.get_rng_state(),
                      "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                      "python": random.getstate()}
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if state_dict.get("seed") is not None:
            self.seed = state_dict["seed"]
        rng = state_dict.get("rng")
        if rng is not None and comm.get_world_size() == 1:
            torch.set_rng_state(rng["torch"])
            kind, keys, *rest = rng["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
            random.setstate(rng["python"])
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def _cpu_process_group():
    """The process group for all-reducing CPU tensors: the default one unless it is NCCL
    (detectron2's ``launch`` picks NCCL whenever CUDA is available, also for
    ``train.device=cpu``; NCCL cannot reduce CPU tensors), then a gloo group of all ranks."""
    import torch.distributed as dist

    if dist.get_backend() != "nccl":
        return None
    logger.info("CPU model under an NCCL process group: DDP all-reduces over a gloo group")
    return dist.new_group(backend="gloo")  # collective: every rank builds its DDP model here


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs):
    """Wrap in DistributedDataParallel when there are several processes (CUDA, or CPU over
    gloo -- also when the default process group is NCCL, as on a GPU machine with
    ``train.device=cpu``)."""
    if comm.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    if not on_cuda and "process_group" not in kwargs:
        kwargs["process_group"] = _cpu_process_group()
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression and on_cuda:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


# ----------------------------------------------------------------------------------------------
# optimiser parameters
# ----------------------------------------------------------------------------------------------
# Swin-S (spec §6): mmcv ``paramwise_cfg`` custom_keys, matched by substring of the full name
# of the parameter *in the authors' model* (see authors_parameter_names)
SWIN_NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


def authors_parameter_names(model: torch.nn.Module) -> Dict[str, str]:
    """Our parameter name -> its name in the authors' model, for the decoder parameters that
    the authors name differently (``decoder.stages.{s}.cls_norm.weight`` ->
    ``roi_head.bbox_head.{s}.cls_fcs.1.weight``; a fused generator of ours -> its official
    parts joined by ``+``). Backbone and neck names are not in the dict: ours carry the same
    ``norm`` / ``relative_position_bias_table`` substrings as the authors' (the checkpoint
    converter's renames only touch other parts of those names)."""
    from stageinteractor.official.layout import DecoderHParams, FusedMap, decoder_key_maps

    decoder = getattr(model, "decoder", None)
    stages = getattr(decoder, "stages", None)
    if stages is None:
        return {}
    out = {}
    for m in decoder_key_maps(DecoderHParams(num_stages=len(stages))):
        if m.ours is not None:
            theirs = "+".join(m.officials) if isinstance(m, FusedMap) else m.official
            out["decoder." + m.ours] = theirs
    return out


def fused_adamw_supported(params: Any) -> bool:
    """Whether this torch has a fused (single multi-tensor kernel) AdamW for the device of every
    tensor in ``params`` (tensors or param-group dicts): CUDA since torch 2.0, CPU since 2.4."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # torch < 2.1: fused kernels on CUDA only
        supported = {"cuda"}
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(t.device.type in supported and t.is_floating_point() for t in tensors)


def build_adamw(params: Any, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2, fused: Any = "auto") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (same update rule and state dict), by default with the fused
    implementation where this torch has it for the parameters' device (``fused="auto"``;
    True / False force it). The fused step does the same arithmetic as the per-tensor loop
    (equal up to float round-off) in one multi-tensor kernel: on the CPU 6x faster for the
    137 M parameters of R50-100q (docs/BENCHMARKS.md)."""
    params = list(params)
    if fused == "auto":
        fused = fused_adamw_supported(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=bool(fused) or None)


def swin_optimizer_params(model: torch.nn.Module, base_lr: float, weight_decay: float,
                          keys: Sequence[str] = SWIN_NO_DECAY_KEYS) -> List[Dict[str, Any]]:
    """Two param groups: weight decay 0 for parameters whose full name in the authors' model
    (:func:`authors_parameter_names`, else our name) contains one of ``keys``, as mmcv's
    ``custom_keys`` decide it; ``weight_decay`` for the rest. Frozen parameters are skipped.

    So the decoder LayerNorms ``attention_norm``, ``ffn_norm`` and ``mixing.out_norm``
    (``Wv_layer_norm``) get no decay, while ``cls_norm`` / ``reg_norm`` (the authors'
    ``cls_fcs.1`` / ``reg_fcs.1``) are decayed, as in the authors' Swin-S run."""
    theirs = authors_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            official = theirs.get(name, name)
            (no_decay if any(k in official for k in keys) else decay).append(p)
    return [{"params": decay, "lr": base_lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": base_lr, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def truncate_metrics(path: str, start_iter: int) -> int:
    """Keep only the records of ``metrics.json`` with ``iteration < start_iter`` (and drop a
    line cut by a crash). Returns the number of dropped lines."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(rec, dict) and rec.get("iteration", -1) >= start_iter:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_bytes(path, "".join(kept).encode())
    return dropped
