"""Whether the running forward is being captured as a graph, in one place for every module.

Two questions, because the answers differ for ``torch.compile``:

* :func:`is_exporting` -- TorchScript tracing/scripting or ONNX export. The captured graph must
  not depend on data-dependent Python branches or on ops the exporters lack (the CPU gather
  sampling kernel, the column-blocked GEMM), so those paths step aside.
* :func:`is_tracing` -- the above, or ``torch.compile``'s graph capture. Host-side input checks
  (which read tensor values) are skipped; the compiled graph may still use every CPU kernel.
"""
import torch

__all__ = ["is_exporting", "is_tracing"]


def is_exporting() -> bool:
    """True under ``torch.jit.trace`` / ``torch.jit.script`` or ``torch.onnx.export``."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover - very old torch
        return False


def is_tracing() -> bool:
    """True when :func:`is_exporting`, or while ``torch.compile`` captures the graph."""
    if is_exporting():
        return True
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        return False
