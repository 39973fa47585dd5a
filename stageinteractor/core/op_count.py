"""Counting aten operator calls of the decoder (issue 10) and host syncs (issue 14).

A :class:`OpCounter` is a ``TorchDispatchMode``: every aten call dispatched while it is active is
counted once (views and in-place ops included, as the dispatcher sees them), attributed to the
current *section*. :func:`stage_sections` installs forward hooks that switch the section to
``"stage{s}"`` while decoder stage s runs (``"decoder"`` outside the stages: query generator,
filter-bank bookkeeping, input checks).

This is the one counter implementation of the project: the op-budget test
(``tests/core/test_decoder_opcount.py``) and ``tools/benchmark.py --count-ops`` both use it.
The count is a property of the code path, not of tensor sizes (it does not depend on B, N, D
as long as the same branches run).

:class:`HostSyncCounter` counts the points where a GPU training step or inference would wait for
the device or move data between host and device (see its docstring); it also runs on the CPU,
deterministically, by tracking which tensors would live on the host.
"""

import collections
import contextlib
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "OpCounter",
    "stage_sections",
    "count_decoder_inference",
    "count_decoder_training",
    "HostSyncCounter",
    "SYNC_CATEGORIES",
]


class OpCounter(TorchDispatchMode):
    """Counts aten calls by (section, op overload packet).

    Attributes:
        section: name the next calls are attributed to (set it directly or with
            :meth:`in_section`).
        counts: ``Counter`` of ``(section, op_name)`` -> calls.
    """

    def __init__(self, section: str = "main"):
        super().__init__()
        self.section = section
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.section, str(func.overloadpacket))] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def in_section(self, name: str) -> Iterator[None]:
        prev, self.section = self.section, name
        try:
            yield
        finally:
            self.section = prev

    # ---------------------------------------------------------------- summaries
    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_section(self) -> Dict[str, int]:
        out: Dict[str, int] = collections.OrderedDict()
        for (sec, _), n in self.counts.items():
            out[sec] = out.get(sec, 0) + n
        return dict(out)

    def by_op(self) -> Dict[str, int]:
        c: collections.Counter = collections.Counter()
        for (_, op), n in self.counts.items():
            c[op] += n
        return dict(c.most_common())

    def summary(self) -> Dict[str, object]:
        """``{"total": int, "by_section": {...}, "by_op": {...}}`` (plain python, JSON-ready)."""
        return {"total": self.total, "by_section": self.by_section(), "by_op": self.by_op()}


@contextlib.contextmanager
def stage_sections(
    counter: OpCounter, stages: nn.ModuleList, outside: str = "decoder"
) -> Iterator[None]:
    """While active, calls inside ``stages[s].forward`` count under ``"stage{s}"``; after each
    stage the section returns to ``outside``."""
    handles = []
    for s, stage in enumerate(stages):
        handles.append(
            stage.register_forward_pre_hook(
                lambda m, a, s=s: setattr(counter, "section", f"stage{s}")
            )
        )
        handles.append(
            stage.register_forward_hook(lambda m, a, o: setattr(counter, "section", outside))
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _postprocess_default(outputs: List[Dict[str, Tensor]]) -> object:
    from .postprocess import topk_detections

    last = outputs[-1]
    return topk_detections(last["logits"], last["boxes"])


def count_decoder_inference(
    decoder: nn.Module,
    features: List[Tensor],
    image_sizes: Tensor,
    *,
    postprocess: Optional[Callable[[List[Dict[str, Tensor]]], object]] = None,
    warmup: bool = True,
) -> Dict[str, object]:
    """aten calls of one ``torch.no_grad()`` inference: decoder (query generator, all stages,
    input checks) + post-processing (default: :func:`~.postprocess.topk_detections` of the last
    stage). Sections: ``decoder``, ``stage0..``, ``postprocess``. Returns :meth:`OpCounter.summary`.
    """
    postprocess = postprocess or _postprocess_default
    with torch.no_grad():
        if warmup:  # lazy kernel / cache initialisation must not be counted
            postprocess(decoder(features, image_sizes))
        counter = OpCounter("decoder")
        with stage_sections(counter, decoder.stages), counter:
            out = decoder(features, image_sizes)
            with counter.in_section("postprocess"):
                postprocess(out)
    return counter.summary()


def count_decoder_training(
    decoder: nn.Module,
    criterion: Callable[..., Dict[str, Tensor]],
    features: List[Tensor],
    image_sizes: Tensor,
    targets: Dict[str, Tensor],
    *,
    warmup: bool = True,
) -> Dict[str, object]:
    """aten calls of the forward of one training step: decoder (grad enabled) + criterion +
    the sum of the losses (no backward). ``targets``: ``gt_boxes``, ``gt_classes``, ``gt_mask``
    (DESIGN.md). Sections: ``decoder``, ``stage0..``, ``criterion``."""

    def run():
        out = decoder(features, image_sizes)
        with counter.in_section("criterion"):
            losses = criterion(
                out, targets["gt_boxes"], targets["gt_classes"], targets["gt_mask"], image_sizes
            )
            return sum(losses.values())

    counter = OpCounter("decoder")
    if warmup:
        with torch.enable_grad():
            run()
    counter = OpCounter("decoder")
    with torch.enable_grad(), stage_sections(counter, decoder.stages), counter:
        run()
    return counter.summary()


# ==================================================================================== host syncs
#: The four counted kinds of host sync, in report order.
SYNC_CATEGORIES = ("scalar", "to_cpu", "to_gpu", "data_dep")

# aten ops whose output shape depends on tensor values (the host must wait for the device)
_DATA_DEP_OPS = frozenset(
    ["nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
     "unique_dim_consecutive"]
)
_INDEX_OPS = frozenset(["index", "index_put", "index_put_", "_index_put_impl_"])
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_THIS_FILE))) + os.sep


def _call_site() -> str:
    """``path:line`` of the innermost caller outside torch and this file (repo-relative)."""
    f = sys._getframe(2)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR) and "contextlib" not in path:
            break
        f = f.f_back
    if f is None:
        return "?"
    path = os.path.abspath(f.f_code.co_filename)
    if path.startswith(_PKG_ROOT):
        path = path[len(_PKG_ROOT):]
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    return f"{path}:{f.f_lineno}"


def _tensors(tree) -> List[Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


def _copy_target(args, kwargs):
    """Target of ``Tensor.to(...)`` / ``torch.as_tensor(..., device=)``: (device or tensor or
    None, non_blocking)."""
    target = kwargs.get("device")
    non_blocking = bool(kwargs.get("non_blocking", False))
    if isinstance(kwargs.get("other"), Tensor):
        target = kwargs["other"]
    for a in args:
        if isinstance(a, bool):
            non_blocking = non_blocking or a  # positional non_blocking (after the dtype)
            break
        if isinstance(a, Tensor) or (
            target is None and isinstance(a, (str, torch.device, int))
        ):
            target = a
    return target, non_blocking


class _SyncFunctionMode(TorchFunctionMode):
    """Sees every torch function / Tensor method call with its arguments as written."""

    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        name = getattr(func, "__name__", "")
        if name == "__get__":  # attribute access (.shape, .device, .grad): no copy
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and c.is_host(args[0]):
                c._mark(out, True)
            return out
        handler = getattr(self, "_on_" + name.strip("_"), None) if name in _SPECIAL else None
        if handler is not None:
            return handler(func, args, kwargs)
        out = func(*args, **kwargs)
        if c.simulate:
            ins = _tensors((args, kwargs))
            if ins:
                hosts = [c.is_host(t) for t in ins]
                host_out = all(hosts)
                if not host_out and any(h and t.dim() > 0 for h, t in zip(hosts, ins)):
                    c._event("device_mismatch", name)  # would fail on a GPU
            else:  # a factory: on the host unless a device is named
                host_out = kwargs.get("device") is None
            if host_out:
                for t in _tensors(out):
                    c._mark(t, True)
        return out

    # -------------------------------------------------------------- copies
    def _on_cpu(self, func, args, kwargs):
        src = args[0]
        if not self.c.is_host(src):
            self.c._event("to_cpu", "cpu")
        out = self._distinct(src, func(*args, **kwargs), True)
        self.c._mark(out, True)
        return out

    def _distinct(self, src: Tensor, out: Any, host: bool) -> Any:
        """In the dry run a copy to the same device returns ``src`` itself; when the copy
        changes host/device, return a view instead so that ``src`` keeps its own placement."""
        if self.c.simulate and out is src and self.c.is_host(src) != host:
            return src.view_as(src)
        return out

    def _on_tolist(self, func, args, kwargs):
        if not self.c.is_host(args[0]):
            self.c._event("to_cpu", func.__name__)
        return func(*args, **kwargs)

    _on_numpy = _on_tolist

    def _to_device(self, src: Tensor, target, non_blocking: bool, what: str) -> Optional[bool]:
        """Count a copy of ``src`` to ``target``; returns whether the result is on the host
        (None: unchanged)."""
        c = self.c
        if target is None:
            return None
        src_host = c.is_host(src)
        if isinstance(target, Tensor):
            dst_host = c.is_host(target)
        else:
            dev = torch.device(target) if not isinstance(target, int) else torch.device("cuda", target)
            dst_host = dev.type == "cpu"
            if c.simulate and dst_host:
                # dry run: the device *is* the CPU, so ``.to(x.device)`` and ``.to("cpu")`` look
                # alike. A host tensor moved "to the CPU" is taken as moved to the device; a
                # device tensor stays on it (D2H copies are written .cpu()/.tolist()/.numpy()).
                dst_host = False
        if src_host and not dst_host:
            c._event("to_gpu_async" if non_blocking else "to_gpu", what)
        elif dst_host and not src_host:
            c._event("to_cpu", what)
        return dst_host

    def _on_to(self, func, args, kwargs):
        target, non_blocking = _copy_target(args[1:], kwargs)
        dst_host = self._to_device(args[0], target, non_blocking, func.__name__)
        host = self.c.is_host(args[0]) if dst_host is None else dst_host
        out = self._distinct(args[0], func(*args, **kwargs), host)
        self.c._mark(out, host)
        return out

    def _on_cuda(self, func, args, kwargs):
        non_blocking = bool(kwargs.get("non_blocking", False))
        if self.c.is_host(args[0]):
            self.c._event("to_gpu_async" if non_blocking else "to_gpu", "cuda")
        out = self._distinct(args[0], func(*args, **kwargs), False)
        self.c._mark(out, False)
        return out

    def _on_tensor(self, func, args, kwargs):
        """``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor``."""
        c = self.c
        method = func.__name__ == "new_tensor"
        data = args[1] if method else (args[0] if args else kwargs.get("data"))
        device = kwargs.get("device")
        if len(args) > (3 if method else 2):  # positional device of as_tensor(data, dtype, device)
            device = args[3 if method else 2]
        if isinstance(data, Tensor) and not method:
            dst_host = self._to_device(data, device, False, func.__name__)
            host = c.is_host(data) if dst_host is None else dst_host
            out = self._distinct(data, func(*args, **kwargs), host)
            c._mark(out, host)
            return out
        # from python data (or a copy of a tensor for new_tensor): built on the host, then
        # copied to the target device (a blocking copy)
        if device is not None:
            dst_host = torch.device(device).type == "cpu" and not c.simulate
        else:
            dst_host = c.is_host(args[0]) if method else True
        out = func(*args, **kwargs)
        if not dst_host:
            c._event("to_gpu", func.__name__)
        c._mark(out, dst_host)
        return out

    _on_as_tensor = _on_tensor
    _on_new_tensor = _on_tensor

    def _on_copy(self, func, args, kwargs):
        """``dst.copy_(src, non_blocking)``."""
        dst, src = args[0], args[1]
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        self._pair(dst, [src], non_blocking, "copy_")
        return func(*args, **kwargs)

    def _on_setitem(self, func, args, kwargs):
        """``dst[index] = value``: host values or index tensors are copied to dst's device."""
        dst, index, value = args
        self._pair(dst, _tensors(index) + _tensors(value), False, "__setitem__")
        return func(*args, **kwargs)

    def _on_getitem(self, func, args, kwargs):
        src, index = args
        idx = [t for t in _tensors(index) if t.dim() > 0]
        self._pair(src, idx, False, "__getitem__", to_cpu=False)
        out = func(*args, **kwargs)
        if self.c.is_host(src):
            for t in _tensors(out):
                self.c._mark(t, True)
        return out

    def _pair(self, dst: Tensor, srcs: List[Tensor], non_blocking: bool, what: str,
              to_cpu: bool = True) -> None:
        c = self.c
        dst_host = c.is_host(dst)
        for s in srcs:
            s_host = c.is_host(s)
            if s_host and not dst_host:
                c._event("to_gpu_async" if non_blocking else "to_gpu", what)
            elif dst_host and not s_host and to_cpu:
                c._event("to_cpu", what)


_SPECIAL = frozenset(
    ["cpu", "tolist", "numpy", "to", "cuda", "tensor", "as_tensor", "new_tensor", "copy_",
     "__setitem__", "__getitem__"]
)


class _SyncDispatchMode(TorchDispatchMode):
    """Sees every aten call: scalar reads and data-dependent shapes, whatever the caller."""

    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket).split(".")[-1]
        c = self.c
        if name == "_local_scalar_dense":
            if not c.is_host(args[0]):
                c._event("scalar", "item")
        elif name in _DATA_DEP_OPS or name in _INDEX_OPS or name == "repeat_interleave":
            first = _tensors(args)
            dep = name in _DATA_DEP_OPS
            if name in _INDEX_OPS:
                dep = any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1]))
            elif name == "repeat_interleave":
                dep = kwargs.get("output_size") is None and len(first) > 0
            if dep and first and not c.is_host(first[0]):
                c._event("data_dep", name)
        return func(*args, **kwargs)


class HostSyncCounter:
    """Counts host syncs: the calls that make the host wait for a GPU, or copy between them.

    Categories (:data:`SYNC_CATEGORIES`; ``total`` is their sum):

    * ``scalar``: a device value read on the host: ``aten._local_scalar_dense`` (``.item()``,
      ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``, f-string formatting);
    * ``to_cpu``: a device->host copy: ``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to(host)``,
      ``host.copy_(dev)``, ``host[i] = dev``;
    * ``to_gpu``: a **blocking** host->device copy: ``.to(device)``/``.cuda()`` of a host tensor
      without ``non_blocking=True``, ``torch.tensor(data, device=...)``,
      ``dev.new_tensor(data)``, ``dev[i] = host`` / ``dev.copy_(host)``, a host index tensor;
    * ``data_dep``: an op whose output shape depends on device values (``nonzero``,
      ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without
      ``output_size``).

    Reported besides, not in ``total``: ``to_gpu_async`` (host->device copies with
    ``non_blocking=True``: no stream sync) and ``device_mismatch`` (dry run only: an op that
    mixes a non-scalar host tensor with device tensors, which would fail on a GPU).
    ``sites`` maps ``"category path:line (what)"`` to counts (the innermost caller outside
    torch), to find each sync.

    Host or device: on a GPU run (``device`` not CPU) a tensor is on the host iff it is a CPU
    tensor. In the CPU **dry run** (``device="cpu"``) every tensor is a CPU tensor, so the
    counter tracks which ones would be on the host: tensors passed to :meth:`mark_host` (the
    data loader's output), results of ``torch.from_numpy``, of ``.cpu()``, of
    ``torch.tensor``/``as_tensor`` without ``device``, of factories (``torch.zeros``,
    ``arange``, ...) called without ``device``, and results of ops whose tensor inputs are all
    on the host. Everything else (parameters, buffers, model outputs) is on the device. Limits
    of the dry run: ``x.to(cpu)`` of a device tensor is taken as staying on the device (write
    device->host copies as ``.cpu()``), ``.to(d)`` of a host tensor as a copy to the device,
    and ``torch.tensor(..., device=d)`` as a copy to the device. The counts are deterministic
    (code path only, not timing or sizes, as long as the same branches run).

    Use::

        counter = HostSyncCounter(device)
        counter.mark_host(batched_inputs)
        with counter:
            step()
        counter.summary()  # {"total": 5, "scalar": 0, "to_cpu": 3, ...}

    With ``cuda_sync_debug=True`` on a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` is on
    while counting and its warnings are counted as ``cuda_sync_warnings`` (PyTorch's own
    count of synchronising CUDA calls, a cross-check).
    """

    def __init__(self, device="cpu", *, cuda_sync_debug: bool = False):
        self.device = torch.device(device)
        self.simulate = self.device.type == "cpu"
        self.cuda_sync_debug = bool(cuda_sync_debug) and self.device.type == "cuda"
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.cuda_sync_warnings: Optional[int] = None
        self._host = WeakIdKeyDictionary()
        self._stack: Optional[contextlib.ExitStack] = None

    # -------------------------------------------------------------- host tracking
    def is_host(self, t: Any) -> bool:
        """Whether tensor ``t`` is (or, in the dry run, would be) in host memory."""
        if not isinstance(t, Tensor):
            return True
        if t.device.type != "cpu":
            return False
        return (t in self._host) if self.simulate else True

    def _mark(self, t: Any, host: bool) -> None:
        if not self.simulate or not isinstance(t, Tensor):
            return
        if host:
            self._host[t] = True
        else:
            self._host.pop(t, None)

    def mark_host(self, *trees: Any) -> None:
        """Mark every tensor in ``trees`` (nested lists/dicts/tuples, objects with a
        ``get_fields()`` such as detectron2 ``Instances``, or objects with a ``tensor``
        attribute such as ``Boxes``) as host memory (the data loader's output)."""
        for tree in trees:
            self._mark_tree(tree)

    def _mark_tree(self, x: Any) -> None:
        if isinstance(x, Tensor):
            self._mark(x, True)
        elif isinstance(x, dict):
            for v in x.values():
                self._mark_tree(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                self._mark_tree(v)
        elif hasattr(x, "get_fields"):
            self._mark_tree(dict(x.get_fields()))
        elif isinstance(getattr(x, "tensor", None), Tensor):
            self._mark(x.tensor, True)

    # -------------------------------------------------------------- events
    def _event(self, category: str, what: str) -> None:
        self.counts[category] += 1
        self.sites[f"{category} {_call_site()} ({what})"] += 1

    def __enter__(self) -> "HostSyncCounter":
        stack = contextlib.ExitStack()
        if self.simulate:
            orig = torch.from_numpy

            def from_numpy(array):
                out = orig(array)
                self._mark(out, True)
                return out

            torch.from_numpy = from_numpy
            stack.callback(setattr, torch, "from_numpy", orig)
        if self.cuda_sync_debug:
            import warnings

            records = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")

            def done():
                torch.cuda.set_sync_debug_mode(prev)
                self.cuda_sync_warnings = (self.cuda_sync_warnings or 0) + sum(
                    "synchroniz" in str(r.message) for r in records
                )

            stack.callback(done)
        stack.enter_context(_SyncFunctionMode(self))
        stack.enter_context(_SyncDispatchMode(self))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        stack.__exit__(*exc)

    # -------------------------------------------------------------- summaries
    @property
    def total(self) -> int:
        return sum(self.counts[c] for c in SYNC_CATEGORIES)

    def summary(self) -> Dict[str, Any]:
        """``{"total", "scalar", "to_cpu", "to_gpu", "data_dep", "to_gpu_async",
        "device_mismatch", "sites", "dry_run", "cuda_sync_warnings"}`` (JSON-ready)."""
        out: Dict[str, Any] = {"total": self.total}
        for c in SYNC_CATEGORIES + ("to_gpu_async", "device_mismatch"):
            out[c] = self.counts[c]
        out["sites"] = dict(sorted(self.sites.items()))
        out["dry_run"] = self.simulate
        out["cuda_sync_warnings"] = self.cuda_sync_warnings
        return out

    def over_budget(self, budget: Dict[str, int]) -> List[str]:
        """The categories whose count exceeds ``budget`` (missing keys are not limited), with
        their sites, one line each; empty when within budget."""
        lines = []
        for cat, limit in budget.items():
            if self.counts[cat] > limit:
                where = [s for s in self.sites if s.startswith(cat + " ")]
                lines.append(f"{cat}: {self.counts[cat]} > {limit} at {where}")
        return lines
