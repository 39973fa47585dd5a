"""Checkpoint files as the tools meet them, checked before anything starts.

One function per question a tool asks about a checkpoint path, each answering with a
:class:`~stageinteractor.errors.CheckpointFileError` whose message is one line naming the file
and what to do:

* :func:`check_checkpoint` -- is ``train.init_checkpoint`` usable? A local file must exist,
  deserialise, and not be in the authors' (mmdet) layout (-> the converter's command); a URL
  (``detectron2://``, ``https://``...) is downloaded into iopath's cache now, in the main
  process, so that an offline machine learns at once which file to download and where to put
  it (no 0-byte ``.lock`` file is left in the cache).
* :func:`check_resume` -- can ``--resume`` continue from ``<output_dir>/last_checkpoint``?
  When the tagged checkpoint is corrupt it names the newest intact one.
* :func:`newest_intact_checkpoint` -- the newest ``model_*.pth`` of a folder that loads.
* :func:`load_weights` -- check, then load a checkpoint into a model (the tools' inference
  path: ``tools/demo.py``, ``tools/export_onnx.py``).
* :func:`official_layout_hint` -- ``None``, or why a loaded object is the authors' layout.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import torch

from stageinteractor.errors import CheckpointFileError

__all__ = ["check_checkpoint", "check_resume", "newest_intact_checkpoint", "load_weights",
           "official_layout_hint", "url_cache_path", "CONVERTER"]

CONVERTER = "tools/convert_official_checkpoint.py"
_OFFICIAL_PREFIXES = ("rpn_head.", "roi_head.")  # the authors' query generator and decoder
_PERIODIC = re.compile(r"model_(\d+)\.pth$")


def _one_line(e: BaseException) -> str:
    """``"Type: first sentence of the message"`` on one line."""
    text = " ".join(str(e).split()).split(". ")[0]
    return f"{type(e).__name__}: {text[:300]}"


def _load_object(path: str) -> Any:
    """Deserialise ``path`` (``.pkl``: pickle, else ``torch.load`` on the CPU)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def official_layout_hint(obj: Any) -> Optional[str]:
    """If ``obj`` (a loaded checkpoint) is the authors' mmdet layout, say why; else None.

    The authors' checkpoints are ``{"meta": dict, "state_dict": {...}, "optimizer": ...}`` (or a
    bare state dict) whose keys include ``rpn_head.*`` / ``roi_head.*``; an open-mmlab ImageNet
    backbone in the same wrapper has no such key and is not matched (the checkpointer maps it).
    """
    if not isinstance(obj, Mapping):
        return None
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        return None
    heads = sorted({k.split(".", 1)[0] for k in sd if isinstance(k, str)
                    and k.startswith(_OFFICIAL_PREFIXES)})
    if not heads:
        return None
    wrapper = "'state_dict' + 'meta'" if isinstance(obj.get("meta"), Mapping) else "state dict"
    return f"mmdet layout: {wrapper}, keys {'/'.join(h + '.*' for h in heads)}"


def _converter_command(path: str, config_file: Optional[str]):
    """(the converter command for ``path``, the file it writes)"""
    out = os.path.splitext(path)[0] + "_converted.pth"
    cfg = f" --config {config_file}" if config_file else ""
    return f"python {CONVERTER} {path} {out}{cfg}", out


def _check_local(path: str, config_file: Optional[str]) -> None:
    if not os.path.isfile(path):
        where = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise CheckpointFileError(f"checkpoint file {path} {where}")
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(f"checkpoint file {path} is empty (0 bytes)")
    try:
        obj = _load_object(path)
    except Exception as e:  # noqa: BLE001 - any deserialisation failure is a bad file
        raise CheckpointFileError(f"checkpoint file {path} is corrupt or truncated "
                                  f"({_one_line(e)})") from None
    hint = official_layout_hint(obj)
    if hint:
        cmd, out = _converter_command(path, config_file)
        raise CheckpointFileError(
            f"checkpoint file {path} is a checkpoint of the authors' code ({hint}); convert it "
            f"first: `{cmd}`, then use train.init_checkpoint={out}")


def _http_url(url: str) -> Optional[str]:
    """The http(s) URL behind ``url`` (detectron2:// is detectron2's file server)."""
    from detectron2.utils.file_io import Detectron2Handler

    if url.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX):]
    if url.startswith(("http://", "https://", "ftp://")):
        return url
    return None


def url_cache_path(url: str) -> Optional[str]:
    """Where iopath caches the download of ``url`` (``$FVCORE_CACHE`` or
    ``~/.torch/iopath_cache`` + the URL's path), or None for a scheme without a cache."""
    from iopath.common.file_io import get_cache_dir

    http = _http_url(url)
    if http is None:
        return None
    parsed = urlparse(http)
    return os.path.join(get_cache_dir(), os.path.dirname(parsed.path.lstrip("/")),
                        http.split("/")[-1])


def _probe(http: str, timeout: float = 15.0) -> None:
    """Ask the server for ``http`` (HEAD) so that an offline machine or a wrong URL fails before
    the download starts; a server that refuses HEAD (other HTTP errors) gets the download."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(http, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise
    # URLError (no network, unknown host, refused) and 404 propagate to _fetch


def _fetch(url: str) -> str:
    """Download ``url`` into iopath's cache (once) and return the local path."""
    from detectron2.utils.file_io import PathManager

    cached = url_cache_path(url)
    if cached and os.path.isfile(cached):
        return cached
    lock = f"{cached}.lock" if cached else None
    had_lock = bool(lock) and os.path.exists(lock)
    quiet = logging.getLogger("iopath.common.download")  # its "Failed to download" line
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if cached:
            _probe(_http_url(url))
        return PathManager.get_local_path(url)
    except Exception as e:  # noqa: BLE001 - offline, refused, 404...: the user's to fix
        where = (f"download {_http_url(url)} yourself and put it at {cached}" if cached
                 else "download it yourself")
        raise CheckpointFileError(f"cannot download checkpoint {url} ({_one_line(e)}): "
                                  f"{where}, or set train.init_checkpoint to a local copy") \
            from None
    finally:  # iopath's file lock leaves an empty `<file>.lock` behind, also on failure
        quiet.setLevel(level)
        if lock and not had_lock and os.path.isfile(lock) and os.path.getsize(lock) == 0:
            os.remove(lock)


def check_checkpoint(path: str, *, config_file: Optional[str] = None) -> str:
    """Check ``path`` (a local file or a URL) before start-up; return the local file.

    Raises :class:`CheckpointFileError` (one line) when the file is missing, empty, corrupt or
    truncated, in the authors' layout (the message gives the converter command, with
    ``--config config_file`` when given), or a URL that cannot be downloaded (the message names
    the URL to fetch and the cache path to put it at). An empty ``path`` returns "".
    """
    if not path:
        return ""
    local = _fetch(path) if "://" in path else path
    _check_local(local, config_file)
    return local


def _candidates(folder: str):
    """``model_*.pth`` files of ``folder``, newest first (``model_final.pth`` before the
    periodic ones, those by iteration)."""
    names = [n for n in os.listdir(folder) if n == "model_final.pth" or _PERIODIC.match(n)]

    def order(n):
        m = _PERIODIC.match(n)
        return (1, 0) if m is None else (0, int(m.group(1)))

    return [os.path.join(folder, n) for n in sorted(names, key=order, reverse=True)]


def newest_intact_checkpoint(folder: str, *, exclude: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint of ``folder`` (see :func:`_candidates`) that deserialises."""
    for path in _candidates(folder):
        if exclude and os.path.abspath(path) == os.path.abspath(exclude):
            continue
        try:
            _load_object(path)
        except Exception:  # noqa: BLE001 - corrupt: try the next older one
            continue
        return path
    return None


def check_resume(output_dir: str) -> Optional[str]:
    """Check the checkpoint that ``--resume`` would load from ``output_dir``; return it.

    None when there is nothing to resume (no ``last_checkpoint`` tag, or a tag naming a missing
    file: the checkpointer then starts from scratch with a warning). A corrupt or truncated
    tagged checkpoint raises :class:`CheckpointFileError` naming the newest intact checkpoint
    of the folder and how to resume from it.
    """
    tag = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        path = os.path.join(output_dir, f.read().strip())
    if not os.path.isfile(path):
        return None
    try:
        _load_object(path)
    except Exception as e:  # noqa: BLE001
        intact = newest_intact_checkpoint(output_dir, exclude=path)
        head = f"--resume: the latest checkpoint {path} is corrupt or truncated ({_one_line(e)})"
        if intact is None:
            raise CheckpointFileError(f"{head}; no other checkpoint in {output_dir} is intact: "
                                      f"train again without --resume") from None
        raise CheckpointFileError(
            f"{head}; the newest intact checkpoint is {intact}: resume from it with "
            f"`echo {os.path.basename(intact)} > {tag}` and --resume again") from None
    return path


def load_weights(model: torch.nn.Module, path: str, *,
                 config_file: Optional[str] = None) -> None:
    """Check ``path`` (:func:`check_checkpoint`) and load it into ``model`` with the project's
    checkpointer (detectron2 checkpoints and ImageNet backbones in every supported layout)."""
    from .checkpoint import StageInteractorCheckpointer

    local = check_checkpoint(path, config_file=config_file)
    StageInteractorCheckpointer(model).load(local)
