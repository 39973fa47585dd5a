"""ONNX export of the whole StageInteractor detector, and onnxruntime parity checks.

The exported graph is the meta-architecture's own inference path, wrapped by the thin
:class:`ExportableStageInteractor` (no copy of the model):

    image (uint8/float, 0-255, ``model.input_format`` channel order)
      -> ``(image - model.pixel_mean) / model.pixel_std``, zero beyond ``image_size``
         (= what ``ImageList.from_tensors`` does to padding) and zero-padded bottom/right to a
         multiple of ``model.size_divisibility``
      -> ``model.inference_tensors`` (backbone, neck, decoder, top-k of the last stage)
      -> boxes rescaled from the network-input frame to the original image (no clipping, as
         ``StageInteractor.postprocess``).

Graph inputs:

* ``image``: (1, 3, H, W) uint8 (or float32), the test-pipeline-resized image at the top-left
  of the canvas; pixels beyond ``image_size`` are ignored;
* ``image_size``: (2,) int64, (h, w) of the resized image inside the canvas (h <= H, w <= W);
* ``orig_size``: (2,) int64, (height, width) of the original image.

Graph outputs: ``boxes`` (k, 4) float32 xyxy in original-image pixels, ``scores`` (k,) float32
sorted descending, ``classes`` (k,) int64, k = ``model.max_detections_per_image``.

With ``dynamic_size=True`` H and W are symbolic (the decoder takes the padded size from the traced
shape, see ``StageInteractorDecoder.forward``); otherwise the graph accepts one canvas size only.
Padding changes the GroupNorm statistics of backbone/neck (as batching does in detectron2), so the
output for a canvas larger than the image's own padded size differs slightly from
``model(batched_inputs)``; with ``image`` = the resized image itself both are the same.

Exporter: the TorchScript exporter (``torch.onnx.export(dynamo=False)``). With torch 2.14.1 the
``dynamo=True`` exporter needs the extra package ``onnxscript`` and, with onnxscript 0.7.2,
fails at its FX-decomposition step (a ``view`` of the non-contiguous attention output), so it is
not used. ``grid_sample`` needs opset >= 16. torchvision 0.29's ``deform_conv2d`` (X101-DCN
backbone) has no ONNX symbolic registered (``UnsupportedOperatorError`` at opsets 17 and 19,
although ONNX has ``DeformConv`` from opset 19): exporting the X101-DCN model raises a clear error.
"""

import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MIN_OPSET",
    "ExportableStageInteractor",
    "export_onnx",
    "OnnxDetector",
    "compare_detections",
    "torch_reference",
    "place_on_canvas",
]

MIN_OPSET = 16  # GridSample
INPUT_NAMES = ["image", "image_size", "orig_size"]
OUTPUT_NAMES = ["boxes", "scores", "classes"]


class ExportableStageInteractor(nn.Module):
    """Tensor-in/tensor-out view of a ``StageInteractor`` (see the module docstring).

    ``forward(image, image_size, orig_size)``: image (1, 3, H, W), image_size (2,) (h, w),
    orig_size (2,) (height, width) -> boxes (k, 4), scores (k,), classes (k,) long.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for attr in ("pixel_mean", "pixel_std", "size_divisibility", "inference_tensors"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"ExportableStageInteractor: the model ({type(model).__name__}) has no "
                    f"'{attr}'; expected a stageinteractor.d2.meta_arch.StageInteractor"
                )
        self.model = model

    def forward(
        self, image: Tensor, image_size: Tensor, orig_size: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.model
        x = (image.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std  # (1, 3, H, W)
        hw = image_size.to(x.dtype).view(1, 2)
        # zero (in normalised space) beyond the image, like ImageList padding; cumsum keeps the
        # canvas size symbolic in the traced graph
        rows = torch.ones_like(x[0, 0, :, 0]).cumsum(0) <= hw[0, 0]
        cols = torch.ones_like(x[0, 0, 0, :]).cumsum(0) <= hw[0, 1]
        x = x * (rows[:, None] & cols[None, :]).to(x.dtype)
        d = int(m.size_divisibility)
        if d > 1:
            H, W = x.shape[-2], x.shape[-1]
            x = F.pad(x, [0, (W + d - 1) // d * d - W, 0, (H + d - 1) // d * d - H])
        boxes, scores, classes = m.inference_tensors(x, hw)
        # network-input frame -> original frame: (w0/w, h0/h, w0/w, h0/h), no clipping
        scale = (orig_size.to(x.dtype) / hw[0]).flip(0).repeat(2)
        return boxes[0] * scale, scores[0], classes[0]


def export_onnx(
    model: nn.Module,
    path: str,
    *,
    image_size: Sequence[int] = (320, 320),
    dynamic_size: bool = False,
    opset: int = 17,
    input_dtype: str = "uint8",
) -> str:
    """Export ``model`` (a ``StageInteractor``, eval mode is set here) to ``path``.

    Args:
        image_size: (H, W) of the example canvas; the only accepted size unless ``dynamic_size``.
        dynamic_size: make H and W of ``image`` symbolic.
        opset: ONNX opset (>= 16 for grid_sample).
        input_dtype: "uint8" or "float32" (dtype of the ``image`` input).
    Returns ``path``.
    """
    if int(opset) < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be >= {MIN_OPSET} (grid_sample), got {opset}")
    if input_dtype not in ("uint8", "float32"):
        raise ValueError(
            f"export_onnx: input_dtype must be 'uint8' or 'float32', got {input_dtype!r}"
        )
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(
            f"export_onnx: image_size must be (H, W) positive ints, got {list(image_size)}"
        )
    H, W = (int(s) for s in image_size)
    wrapper = ExportableStageInteractor(model.eval()).eval()
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, H, W), generator=gen).to(dtype)
    inputs = (image, torch.tensor([H, W]), torch.tensor([H, W]))
    dynamic_axes = {"image": {2: "height", 3: "width"}} if dynamic_size else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shape-dependent python branches of the decoder (stage layout, k) are static by design
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                inputs,
                path,
                dynamo=False,
                opset_version=int(opset),
                input_names=INPUT_NAMES,
                output_names=OUTPUT_NAMES,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except Exception as e:
        if any("deform" in type(mod).__name__.lower() for mod in model.modules()):
            raise RuntimeError(
                f"export_onnx: export failed ({type(e).__name__}: {e}); the model has deformable "
                "convolutions (torchvision deform_conv2d, X101-DCN), for which torchvision "
                "registers no ONNX symbolic; export a backbone without DCN"
            ) from e
        raise
    import onnx

    onnx.checker.check_model(path)
    return path


class OnnxDetector:
    """onnxruntime session of an exported graph (CPU).

    ``__call__(image, image_size, orig_size)`` with numpy/torch inputs (see the module docstring)
    returns a dict of numpy ``boxes`` (k, 4), ``scores`` (k,), ``classes`` (k,).
    """

    def __init__(self, path: str, *, num_threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.image_dtype = (
            np.uint8 if self.session.get_inputs()[0].type == "tensor(uint8)" else np.float32
        )

    def __call__(self, image, image_size, orig_size) -> Dict[str, np.ndarray]:
        feeds = {
            "image": np.ascontiguousarray(np.asarray(image).astype(self.image_dtype)),
            "image_size": np.asarray(image_size, dtype=np.int64).reshape(2),
            "orig_size": np.asarray(orig_size, dtype=np.int64).reshape(2),
        }
        return dict(zip(OUTPUT_NAMES, self.session.run(OUTPUT_NAMES, feeds)))


@torch.no_grad()
def torch_reference(
    model: nn.Module, image: Tensor, orig_size: Sequence[int]
) -> Dict[str, np.ndarray]:
    """The normal detectron2 inference path, ``model([{"image", "height", "width"}])``.

    ``image``: (3, h, w) uint8/float resized image (no extra canvas); returns numpy
    ``boxes``/``scores``/``classes`` like :class:`OnnxDetector`.
    """
    inst = model.eval()([{"image": image, "height": int(orig_size[0]), "width": int(orig_size[1])}])
    inst = inst[0]["instances"].to("cpu")
    return {
        "boxes": inst.pred_boxes.tensor.numpy(),
        "scores": inst.scores.numpy(),
        "classes": inst.pred_classes.numpy(),
    }


def compare_detections(
    ref: Dict[str, np.ndarray],
    out: Dict[str, np.ndarray],
    orig_size: Sequence[int],
    *,
    box_tol: float = 1e-3,
    score_tol: float = 1e-4,
) -> Dict[str, float]:
    """Compare two top-k detection lists.

    Detection i of ``ref`` is compared with detection i of ``out``; where the two differ in class
    or box only because near-equal scores (within ``score_tol``) were ordered differently, it is
    compared with the detection of the same class and closest box among those near-tied ones.
    Box error is reported in pixels and relative to the image size (max of original height and
    width); the check passes when relative box error <= ``box_tol``, score error <= ``score_tol``
    and every class agrees.

    Returns a dict: ``num``, ``max_box_px``, ``max_box_rel``, ``max_score``, ``class_mismatch``,
    ``ok`` (1.0 / 0.0).
    """
    rb, rs, rc = (np.asarray(ref[k], dtype=np.float64) for k in OUTPUT_NAMES)
    ob, os_, oc = (np.asarray(out[k], dtype=np.float64) for k in OUTPUT_NAMES)
    if rb.shape != ob.shape or rs.shape != os_.shape:
        raise ValueError(f"compare_detections: shapes differ: ref boxes {rb.shape} vs {ob.shape}")
    size = float(max(orig_size))
    max_px, max_score, mismatch = 0.0, 0.0, 0
    used = np.zeros(len(os_), dtype=bool)
    for i in range(len(rs)):
        cand = [i] if (not used[i] and oc[i] == rc[i]) else []
        if not cand or np.abs(ob[i] - rb[i]).max() > box_tol * size:
            near = np.nonzero((np.abs(os_ - rs[i]) <= score_tol) & (oc == rc[i]) & ~used)[0]
            cand = list(near) or cand
        if not cand:
            mismatch += 1
            continue
        j = min(cand, key=lambda c: np.abs(ob[c] - rb[i]).max())
        used[j] = True
        max_px = max(max_px, float(np.abs(ob[j] - rb[i]).max()))
        max_score = max(max_score, float(abs(os_[j] - rs[i])), float(abs(os_[i] - rs[i])))
    rel = max_px / size
    ok = rel <= box_tol and max_score <= score_tol and mismatch == 0
    return {
        "num": float(len(rs)),
        "max_box_px": max_px,
        "max_box_rel": rel,
        "max_score": max_score,
        "class_mismatch": float(mismatch),
        "ok": 1.0 if ok else 0.0,
    }


def place_on_canvas(image: np.ndarray, canvas: Optional[Sequence[int]]) -> np.ndarray:
    """(3, h, w) image -> (1, 3, H, W) with the image at the top-left (zeros elsewhere);
    ``canvas=None`` keeps (h, w)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"place_on_canvas: expected a (3, h, w) image, got shape {image.shape}")
    if canvas is None:
        return image[None]
    H, W = int(canvas[0]), int(canvas[1])
    h, w = image.shape[1:]
    if h > H or w > W:
        raise ValueError(
            f"place_on_canvas: image of {h}x{w} does not fit the exported size {H}x{W}; export "
            "with a larger --image-size or with --dynamic-size"
        )
    out = np.zeros((1, 3, H, W), dtype=image.dtype)
    out[0, :, :h, :w] = image
    return out
