"""A resumable, deterministic training data loader.

detectron2's ``TrainingSampler`` is an infinite seeded stream, but after ``--resume`` the stream
restarts from its beginning, aspect-ratio grouping keeps unflushed buffers, and the
augmentation RNG of each worker depends on process state. This loader makes the content of
every batch a pure function of ``(seed, iteration)``:

* **Order.** Epoch ``e`` is the permutation ``default_rng([seed, e]).permutation(n)``. With
  aspect-ratio grouping, the permutation is split stably into landscape (w >= h) and portrait
  images, each part is cut into full batches of ``total_batch_size`` (remainders dropped), and
  the batch order is shuffled with the same epoch generator. Without grouping, global batch
  ``b`` is items ``[b*B, (b+1)*B)`` of the concatenated epoch permutations.
* **Sharding.** Process ``r`` of ``W`` takes items ``[r*B/W, (r+1)*B/W)`` of each global batch;
  dataloader worker ``k`` of ``K`` produces global batches ``b`` with ``b % K == k``, and torch's
  in-order worker round-robin yields them in order ``start_iter, start_iter + 1, ...``.
* **Augmentation.** The mapper of item ``j`` of global batch ``b`` runs with numpy's and
  python's global RNGs seeded from ``(seed, b, j)`` (restored afterwards), so the augmentation
  of a sample does not depend on the worker, the world size or the resume point.
* **Resume.** :meth:`ResumableTrainLoader.set_start_iter` (called by ``tools/train_net.py``
  after loading a checkpoint) makes the next ``iter()`` start at global batch ``start_iter``.

A mapper returning ``None`` (skip) is retried with the next item of a deterministic fallback
sequence.

**Pinned memory.** With ``pin_memory`` (default: when CUDA is available) the tensors of every
batch (images, and the fields of ``Instances``) are in page-locked memory, so that the model's
``non_blocking`` host->device copies are real asynchronous DMA transfers instead of copies
staged through a pageable buffer. Pinned in the training process as each batch is taken.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils import data as torchdata

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader", "global_batch_indices",
           "pin_batch"]

logger = logging.getLogger(__name__)


def pin_batch(x):
    """``x`` (nested lists / tuples / dicts of tensors, objects with ``get_fields()`` such as
    detectron2 ``Instances``, objects with a ``tensor`` such as ``Boxes``) with every tensor in
    pinned memory (in place for Instances / Boxes)."""
    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, dict):
        return {k: pin_batch(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(pin_batch(v) for v in x)
    if hasattr(x, "get_fields"):
        for k, v in list(x.get_fields().items()):
            x.set(k, pin_batch(v))
        return x
    if isinstance(getattr(x, "tensor", None), torch.Tensor):
        x.tensor = x.tensor.pin_memory()
    return x


def _identity(x):
    return x


class _BatchSchedule:
    """Global batch ``b`` -> list of dataset indices (length ``total_batch_size``)."""

    def __init__(self, aspect_landscape: np.ndarray, total_batch_size: int, seed: int,
                 aspect_ratio_grouping: bool):
        self.n = len(aspect_landscape)
        if self.n == 0:
            raise ValueError("the training dataset is empty")
        self.B = int(total_batch_size)
        self.seed = int(seed)
        self.landscape = aspect_landscape.astype(bool)
        n_land = int(self.landscape.sum())
        self.grouped = bool(aspect_ratio_grouping) and (
            n_land // self.B + (self.n - n_land) // self.B) > 0
        self.batches_per_epoch = (n_land // self.B + (self.n - n_land) // self.B
                                  if self.grouped else None)
        self._cache_epoch = None
        self._cache = None

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def _grouped_epoch(self, epoch: int) -> List[np.ndarray]:
        if self._cache_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n)
            batches = []
            for part in (perm[self.landscape[perm]], perm[~self.landscape[perm]]):
                for k in range(len(part) // self.B):
                    batches.append(part[k * self.B:(k + 1) * self.B])
            order = rng.permutation(len(batches))
            self._cache = [batches[i] for i in order]
            self._cache_epoch = epoch
        return self._cache

    def __call__(self, b: int) -> List[int]:
        if self.grouped:
            epoch, k = divmod(b, self.batches_per_epoch)
            return [int(i) for i in self._grouped_epoch(epoch)[k]]
        out = []
        pos = b * self.B
        while len(out) < self.B:
            epoch, off = divmod(pos, self.n)
            if self._cache_epoch != epoch:
                self._cache, self._cache_epoch = self._perm(epoch), epoch
            take = min(self.B - len(out), self.n - off)
            out.extend(int(i) for i in self._cache[off:off + take])
            pos += take
        return out


def global_batch_indices(dataset: Sequence[Dict], total_batch_size: int, seed: int, b: int,
                         aspect_ratio_grouping: bool = True) -> List[int]:
    """The dataset indices of global batch ``b`` (a pure function; used by tests)."""
    return _BatchSchedule(_landscape(dataset), total_batch_size, seed, aspect_ratio_grouping)(b)


def _landscape(dataset: Sequence[Dict]) -> np.ndarray:
    return np.array([d.get("width", 1) >= d.get("height", 1) for d in dataset], dtype=bool)


class _SeededRNG:
    """Seed numpy's and python's global RNGs for one mapper call, then restore them."""

    def __init__(self, *key: int):
        self.key = [int(k) for k in key]

    def __enter__(self):
        self._np, self._py = np.random.get_state(), random.getstate()
        s = np.random.SeedSequence(self.key).generate_state(2)
        np.random.seed(int(s[0]))
        random.seed(int(s[1]))

    def __exit__(self, *exc):
        np.random.set_state(self._np)
        random.setstate(self._py)
        return False


class _BatchStream(torchdata.IterableDataset):
    def __init__(self, dataset, mapper, schedule: _BatchSchedule, rank: int, world_size: int,
                 start_iter: int):
        self.dataset, self.mapper, self.schedule = dataset, mapper, schedule
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self.per_rank = schedule.B // world_size

    def _map(self, b: int, j: int, idx: int):
        for attempt in range(100):
            with _SeededRNG(self.schedule.seed, b, j, attempt):
                out = self.mapper(self.dataset[idx]) if self.mapper is not None \
                    else self.dataset[idx]
            if out is not None:
                return out
            idx = int(np.random.default_rng([self.schedule.seed, b, j, attempt]).integers(
                len(self.dataset)))
        raise RuntimeError(f"the mapper skipped 100 samples in a row (global batch {b})")

    def __iter__(self) -> Iterator[List[Dict]]:
        info = torchdata.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start_iter + wid
        lo = self.rank * self.per_rank
        while True:
            idxs = self.schedule(b)[lo:lo + self.per_rank]
            yield [self._map(b, lo + k, i) for k, i in enumerate(idxs)]
            b += nw


class ResumableTrainLoader:
    """Iterable of per-process batches (``List[dict]``); see the module docstring."""

    def __init__(self, *, dataset: Sequence[Dict], mapper: Optional[Callable],
                 total_batch_size: int, num_workers: int = 0, seed: Optional[int] = None,
                 aspect_ratio_grouping: bool = True, start_iter: int = 0,
                 pin_memory: Optional[bool] = None):
        from detectron2.utils import comm

        self.world_size, self.rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % self.world_size != 0:
            raise ValueError(f"total_batch_size={total_batch_size} must be a positive multiple "
                             f"of the number of processes ({self.world_size})")
        self.dataset = list(dataset)
        self.mapper = mapper
        self.total_batch_size = int(total_batch_size)
        self.num_workers = int(num_workers)
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.seed = 0 if seed is None or seed < 0 else int(seed)
        self.start_iter = int(start_iter)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._landscape = _landscape(self.dataset)
        logger.info("ResumableTrainLoader: %d images, total batch %d (%d per process), "
                    "%d workers", len(self.dataset), total_batch_size,
                    total_batch_size // self.world_size, num_workers)

    def set_start_iter(self, start_iter: int, seed: Optional[int] = None) -> None:
        """The next ``iter()`` yields global batches ``start_iter, start_iter + 1, ...``."""
        self.start_iter = int(start_iter)
        if seed is not None and seed >= 0:
            self.seed = int(seed)

    def __iter__(self) -> Iterator[List[Dict]]:
        schedule = _BatchSchedule(self._landscape, self.total_batch_size, self.seed,
                                  self.aspect_ratio_grouping)
        stream = _BatchStream(self.dataset, self.mapper, schedule, self.rank, self.world_size,
                              self.start_iter)
        if self.num_workers == 0:
            return map(pin_batch, stream) if self.pin_memory else iter(stream)
        # DataLoader pins only tensors and containers: Instances go through pin_batch
        loader = torchdata.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, persistent_workers=False,
                                      pin_memory=False)
        return map(pin_batch, loader) if self.pin_memory else iter(loader)


def build_resumable_train_loader(*, dataset, mapper, total_batch_size: int,
                                 num_workers: int = 0, seed: Optional[int] = None,
                                 aspect_ratio_grouping: bool = True,
                                 pin_memory: Optional[bool] = None) -> ResumableTrainLoader:
    """LazyConfig entry point; ``dataset`` is typically ``L(get_detection_dataset_dicts)``."""
    return ResumableTrainLoader(dataset=dataset, mapper=mapper, total_batch_size=total_batch_size,
                                num_workers=num_workers, seed=seed,
                                aspect_ratio_grouping=aspect_ratio_grouping,
                                pin_memory=pin_memory)
