"""StageInteractor meta-architecture: the detectron2 model interface around the core decoder.

``StageInteractor`` glues together

    backbone (detectron2 ``Backbone``)  ->  neck (``ChannelMapping``)  ->  core decoder
                                                                       ->  core criterion (training)
                                                                       ->  top-k post-processing (inference)

and speaks detectron2's model protocol (spec ``detrex_integration.md`` §5.6):

* input: ``List[dict]``, each with ``"image"`` (CHW uint8/float tensor in ``input_format`` channel
  order, already resized by the mapper), ``"height"``/``"width"`` (original image size, used for
  the output rescaling) and, in training, ``"instances"`` (``gt_boxes`` absolute xyxy in the
  resized frame, ``gt_classes``);
* training: returns the criterion's dict of already-weighted scalar losses (nothing else: every
  entry is summed into the optimised loss by detectron2's trainers). The criterion's diagnostics
  (``criterion.last_stats``) go to detectron2's event storage;
* inference: returns ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]`` in the
  original image's pixels.

Inference follows the official ``simple_test`` (spec §6): last stage only, sigmoid scores, top-k
over the flattened ``N x K`` (query, class) scores with ``k = max_detections_per_image`` (default
``N``), label = index % K, box = the refined box of query index // K, boxes rescaled to the
original image, no NMS and **no clipping**.

The top-k itself is ``stageinteractor.core.postprocess.topk_detections``. The tensor-only part of inference (:meth:`StageInteractor.inference_tensors`) takes a normalised
padded batch and the unpadded sizes and returns plain tensors. :meth:`forward` in eval mode calls
exactly that method, so an ONNX/TorchScript export traces the same code path.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage, has_event_storage

from ..core.postprocess import topk_detections
from .deferred_scalars import put_device_scalars

__all__ = ["StageInteractor", "rescale_boxes"]


def rescale_boxes(boxes: Tensor, input_size: Sequence[int], output_size: Sequence[int]) -> Tensor:
    """Map xyxy boxes from the network-input frame of one image to its original frame.

    ``input_size`` = (h, w) the image had when it entered the network (unpadded; padding is at the
    bottom/right so it does not move the origin); ``output_size`` = (height, width) wanted. No
    clipping (official inference does not clip).
    """
    in_h, in_w = float(input_size[0]), float(input_size[1])
    out_h, out_w = float(output_size[0]), float(output_size[1])
    # host-built factors, non-blocking copy (new_tensor would block the host on a GPU)
    scale = torch.tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], dtype=boxes.dtype)
    return boxes * scale.to(boxes.device, non_blocking=True)


class StageInteractor(nn.Module):
    """Query-based detector with cross-stage interaction (StageInteractor, ICCV 2023).

    Components are built by the config (see ``configs/common/models/stageinteractor_r50.py``):

    * ``backbone``: detectron2 ``Backbone`` mapping (B, 3, H, W) to a dict of feature maps;
    * ``neck``: maps the backbone output to a list of L_f maps (B, D, H_l, W_l) (``ChannelMapping``);
    * ``decoder``: ``StageInteractorDecoder``: ``decoder(features, image_sizes)`` -> list of stage
      dicts with ``"logits"`` (B, N, K) and ``"boxes"`` (B, N, 4) xyxy in padded-input pixels;
    * ``criterion``: ``StageInteractorCriterion``:
      ``criterion(stage_outputs, gt_boxes, gt_classes, gt_mask, image_sizes)`` -> loss dict, with
      diagnostics left in ``criterion.last_stats`` (dict of python floats).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        decoder: nn.Module,
        criterion: nn.Module,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        size_divisibility: int = 32,
        max_detections_per_image: Optional[int] = None,
        input_format: str = "RGB",
        stats_prefix: str = "diag/",
    ):
        """
        Args:
            backbone, neck, decoder, criterion: see the class docstring.
            pixel_mean, pixel_std: per-channel normalisation, in ``input_format`` order
                (default: mmdet's ImageNet RGB statistics on the 0-255 scale).
            size_divisibility: pad the batch to a multiple of this (32 for stride-32 features).
            max_detections_per_image: detections kept per image (top-k over N x K);
                ``None`` = the decoder's number of queries (official ``max_per_img = N``).
            input_format: channel order of ``"image"`` ("RGB" or "BGR"); informational for
                visualisation, the statistics must be given in the same order.
            stats_prefix: prefix of the event-storage names of the criterion's diagnostics.
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"StageInteractor: input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"StageInteractor: pixel_mean/pixel_std need 3 values, got {list(pixel_mean)} / "
                f"{list(pixel_std)}"
            )
        if any(float(s) <= 0 for s in pixel_std):
            raise ValueError(f"StageInteractor: pixel_std must be positive, got {list(pixel_std)}")
        if int(size_divisibility) < 0:
            raise ValueError(f"StageInteractor: size_divisibility must be >= 0, got {size_divisibility}")
        self.backbone = backbone
        self.neck = neck
        self.decoder = decoder
        self.criterion = criterion
        self.size_divisibility = int(size_divisibility)
        self.input_format = input_format
        self.stats_prefix = stats_prefix
        if max_detections_per_image is None:
            max_detections_per_image = getattr(decoder, "num_queries", None)
            if max_detections_per_image is None:
                raise ValueError(
                    "StageInteractor: max_detections_per_image is None and the decoder has no "
                    "'num_queries' attribute; set model.max_detections_per_image"
                )
        if int(max_detections_per_image) <= 0:
            raise ValueError(
                f"StageInteractor: max_detections_per_image must be > 0, got {max_detections_per_image}"
            )
        self.max_detections_per_image = int(max_detections_per_image)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ input handling
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise each image, then pad the batch (bottom/right, 0 in normalised space)."""
        images = []
        for i, x in enumerate(batched_inputs):
            if "image" not in x:
                raise KeyError(f"StageInteractor: batched_inputs[{i}] has no 'image' key")
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"StageInteractor: batched_inputs[{i}]['image'] must be a (3, H, W) tensor, "
                    f"got shape {tuple(img.shape)}"
                )
            # non-blocking copy of the uint8 image (no host sync), then float on the device
            img = img.to(self.device, non_blocking=True).to(torch.float32)
            images.append((img - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def prepare_targets(self, batched_inputs: List[Dict]) -> Tuple[Tensor, Tensor, Tensor]:
        """Pad the ground truths of a batch (DESIGN.md conventions).

        Returns ``gt_boxes`` (B, G, 4) float xyxy absolute, ``gt_classes`` (B, G) long,
        ``gt_mask`` (B, G) bool, with G = max objects in the batch (0 allowed).
        """
        # Padded on the host, sent in ONE non-blocking copy: (B, G, 6) = box, class, mask.
        # (Classes travel as float32: exact below 2**24.)
        per_image = []
        for i, x in enumerate(batched_inputs):
            if "instances" not in x:
                raise KeyError(
                    f"StageInteractor: training needs batched_inputs[{i}]['instances'] "
                    "(gt_boxes, gt_classes)"
                )
            inst = x["instances"]
            boxes = inst.gt_boxes.tensor if isinstance(inst.gt_boxes, Boxes) else inst.gt_boxes
            per_image.append((boxes, inst.gt_classes))
        num_images = len(per_image)
        max_gt = max((b.shape[0] for b, _ in per_image), default=0)
        packed = torch.zeros(num_images, max_gt, 6)
        for b, (boxes, classes) in enumerate(per_image):
            n = boxes.shape[0]
            packed[b, :n, :4] = boxes.cpu()  # no-op for the data loader's host tensors
            packed[b, :n, 4] = classes.cpu().to(torch.float32)
            packed[b, :n, 5] = 1.0
        packed = packed.to(self.device, non_blocking=True)
        gt_boxes = packed[..., :4].contiguous()
        gt_classes = packed[..., 4].long()
        gt_mask = packed[..., 5] > 0
        return gt_boxes, gt_classes, gt_mask

    @staticmethod
    def _image_sizes_tensor(images: ImageList) -> Tensor:
        sizes = torch.tensor([list(s) for s in images.image_sizes], dtype=torch.float32).view(-1, 2)
        return sizes.to(images.tensor.device, non_blocking=True)

    # ------------------------------------------------------------------ model
    def extract_features(self, images: Tensor) -> List[Tensor]:
        """(B, 3, H, W) normalised padded batch -> neck maps, finest first.

        CPU inference runs in channels-last memory format (values equal up to float round-off):
        oneDNN's convolutions are ~12 % faster on it, and the neck's maps come out channels-last,
        the layout in which the decoder's sampler reads them fastest (see ``ChannelMapping``)."""
        if not self.training and images.device.type == "cpu" and not torch.jit.is_tracing():
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        return list(self.neck(features))

    def run_decoder(self, images: Tensor, image_sizes: Tensor, **decoder_kwargs) -> List[Dict[str, Tensor]]:
        """Backbone + neck + decoder; returns the decoder's per-stage output dicts."""
        return self.decoder(self.extract_features(images), image_sizes, **decoder_kwargs)

    def inference_tensors(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Tensor-only inference (the export entry point; also used by :meth:`forward`).

        Args:
            images: (B, 3, H, W) normalised, padded batch.
            image_sizes: (B, 2) unpadded (h, w) of each image in the batch.

        Returns:
            ``boxes`` (B, k, 4) xyxy in network-input pixels, ``scores`` (B, k), ``classes``
            (B, k) long, with k = min(max_detections_per_image, N * K).
        """
        last = self.run_decoder(images, image_sizes)[-1]
        det = topk_detections(last["logits"].float(), last["boxes"].float(), self.max_detections_per_image)
        return det["boxes"], det["scores"], det["labels"]

    def forward_export(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Alias of :meth:`inference_tensors` (name used by export tools)."""
        return self.inference_tensors(images, image_sizes)

    def forward(self, batched_inputs: List[Dict]):
        if not isinstance(batched_inputs, (list, tuple)) or len(batched_inputs) == 0:
            raise ValueError("StageInteractor: forward expects a non-empty list of dataset dicts")
        images = self.preprocess_image(batched_inputs)
        image_sizes = self._image_sizes_tensor(images)
        if self.training:
            return self.forward_train(batched_inputs, images, image_sizes)
        boxes, scores, classes = self.inference_tensors(images.tensor, image_sizes)
        return self.postprocess(boxes, scores, classes, batched_inputs, images.image_sizes)

    def forward_train(self, batched_inputs: List[Dict], images: ImageList, image_sizes: Tensor) -> Dict[str, Tensor]:
        gt_boxes, gt_classes, gt_mask = self.prepare_targets(batched_inputs)
        stage_outputs = self.run_decoder(images.tensor, image_sizes)
        # Losses in fp32, outside any autocast region (AMP safety).
        stage_outputs = [
            {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
            for out in stage_outputs
        ]
        with torch.autocast(device_type=images.tensor.device.type, enabled=False):
            losses = self.criterion(stage_outputs, gt_boxes, gt_classes, gt_mask, image_sizes)
        self._log_stats()
        return losses

    def _log_stats(self) -> None:
        """Put ``criterion.last_stats`` into the event storage (never into the loss dict).

        Statistics still on the device (:class:`~stageinteractor.core.criterion.LazyStats`) go
        through :func:`~stageinteractor.d2.deferred_scalars.put_device_scalars`: the trainer
        copies them with the losses (no host sync here)."""
        stats = getattr(self.criterion, "last_stats", None)
        if not stats or not has_event_storage():
            return
        if isinstance(getattr(stats, "tensor", None), Tensor) and hasattr(stats, "names"):
            put_device_scalars([self.stats_prefix + str(n) for n in stats.names], stats.tensor)
            return
        scalars = {}
        for name, value in stats.items():
            if torch.is_tensor(value):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)):
                scalars[self.stats_prefix + str(name)] = float(value)
        if scalars:
            get_event_storage().put_scalars(**scalars, smoothing_hint=False)

    def postprocess(
        self,
        boxes: Tensor,
        scores: Tensor,
        classes: Tensor,
        batched_inputs: List[Dict],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Dict[str, Instances]]:
        """Wrap the top-k tensors into per-image ``Instances`` in original-image pixels."""
        results = []
        for i, (x, size) in enumerate(zip(batched_inputs, image_sizes)):
            height = int(x.get("height", size[0]))
            width = int(x.get("width", size[1]))
            inst = Instances((height, width))
            inst.pred_boxes = Boxes(rescale_boxes(boxes[i], size, (height, width)))
            inst.scores = scores[i]
            inst.pred_classes = classes[i]
            results.append({"instances": inst})
        return results
