"""The StageInteractor decoder: initial queries + L stages + cross-stage filter bank."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .filter_bank import FilterBank, update_bank
from .query_generator import InitialQueryGenerator
from .sampler import SAMPLING_KERNELS
from .stage import DecoderStage
from .switches import ADAMIXER_BASELINE, check_choice, resolve_switches
from .tracing import is_tracing

__all__ = ["StageInteractorDecoder"]


def _assert_async(ok: Tensor, msg: str) -> None:
    """``torch._assert_async`` with a message where this torch has the overload (>= 2.1)."""
    try:
        torch._assert_async(ok, msg)
    except TypeError:  # pragma: no cover - torch 2.0
        torch._assert_async(ok)


class StageInteractorDecoder(nn.Module):
    """Query generator + ``num_stages`` :class:`DecoderStage` s (spec §2.3-2.6).

    The module **includes** the query generator (``self.query_generator``, an
    ``Embedding(num_queries, query_dim)``: 25,600 params for 100 queries, official key
    ``rpn_head.init_content_features``); ``self.stages`` holds the official ``roi_head`` part.

    Stage s (0-based) samples ``first_stage_points`` points per group at s = 0 and
    ``num_points`` afterwards, reuses ``min(s - reuse_start + 1, max_reused_channel_filters)``
    channel filters and, for ``s >= reuse_start``, ``num_reused_spatial_filters`` spatial filters.
    Ablation switches: see :mod:`stageinteractor.core.switches`.
    ``StageInteractorDecoder.adamixer(**kw)`` builds the AdaMixer baseline (paper Tab. 6 row 1).

    Args (keyword only):
        num_classes, num_queries, num_stages: K (sigmoid classifier), N, L.
        feature_strides: strides of the input maps (C2..C5: 4, 8, 16, 32).
        query_dim, num_heads, num_groups, ffn_dim: D = feature channels, MHSA heads, channel
            groups G (D/G channels each), FFN hidden size.
        first_stage_points, num_points, out_points: P_in of stage 0 / later stages, P_out.
        sampler, subpoint_offsets, refine_mode, pe_residual, dynamic_bias, reuse, reuse_start,
        max_reused_channel_filters, num_reused_spatial_filters, filter_usage, static_mixing:
            the switches (``reuse_start`` is inert with ``reuse=False``).
        check_inputs: validate shapes and finiteness of the inputs in ``forward`` (skipped while
            tracing / compiling / exporting; about 10 extra aten ops). The finiteness check
            is a device-side assert (``torch._assert_async``), no host read: on an
            accelerator a failure surfaces as a CUDA error at the next synchronisation; on
            the CPU it raises ValueError naming the input at once.
        sampling_kernel: how the samplers read the maps, "auto" (gather on CPU with
            channels-last maps, else grid_sample), "grid_sample" or "gather" (same values; see
            :mod:`stageinteractor.core.sampler`).
    """

    def __init__(
        self,
        *,
        num_classes: int = 80,
        num_queries: int = 100,
        num_stages: int = 6,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        query_dim: int = 256,
        num_heads: int = 8,
        num_groups: int = 4,
        ffn_dim: int = 2048,
        first_stage_points: int = 64,
        num_points: int = 32,
        out_points: int = 128,
        sampler: str = "grouped",
        subpoint_offsets: str = "shared",
        refine_mode: str = "wh",
        pe_residual: str = "stream",
        dynamic_bias: bool = True,
        reuse: bool = True,
        reuse_start: int = 2,
        max_reused_channel_filters: Optional[int] = None,
        num_reused_spatial_filters: Optional[int] = None,
        filter_usage: Optional[str] = None,
        static_mixing: Optional[str] = None,
        check_inputs: bool = True,
        sampling_kernel: str = "auto",
    ):
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("num_queries", num_queries),
            ("num_stages", num_stages),
            ("num_points", num_points),
            ("out_points", out_points),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_choice("check_inputs", check_inputs, (True, False))
        check_choice("sampling_kernel", sampling_kernel, SAMPLING_KERNELS)
        sw = resolve_switches(
            num_stages=num_stages,
            sampler=sampler,
            subpoint_offsets=subpoint_offsets,
            refine_mode=refine_mode,
            pe_residual=pe_residual,
            dynamic_bias=dynamic_bias,
            first_stage_points=first_stage_points,
            reuse=reuse,
            reuse_start=reuse_start,
            max_reused_channel_filters=max_reused_channel_filters,
            num_reused_spatial_filters=num_reused_spatial_filters,
            filter_usage=filter_usage,
            static_mixing=static_mixing,
        )
        self.switches = sw
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.query_dim = query_dim
        self.feature_strides = tuple(int(s) for s in feature_strides)
        self.check_inputs = check_inputs
        self.query_generator = InitialQueryGenerator(num_queries=num_queries, query_dim=query_dim)
        self.register_buffer("one", torch.tensor(1.0), persistent=False)
        self.stage_points = [first_stage_points] + [num_points] * (num_stages - 1)
        self.stage_reused_channel = [
            min(max(s - sw.reuse_start + 1, 0), sw.max_reused_channel_filters) for s in range(num_stages)
        ]
        self.stage_reused_spatial = [
            sw.num_reused_spatial_filters if s >= sw.reuse_start else 0 for s in range(num_stages)
        ]
        if sw.num_reused_spatial_filters > 0 and sw.reuse_start < num_stages:
            # the reused stages and the stage that feeds them need the same number of points
            fed = self.stage_points[max(sw.reuse_start - 1, 0):]
            if len(set(fed)) != 1:
                raise ValueError(
                    "spatial filter reuse needs equal point counts from stage reuse_start-1 on; "
                    f"got {fed} (reuse_start={sw.reuse_start})"
                )
        self.stages = nn.ModuleList(
            DecoderStage(
                num_classes=num_classes,
                query_dim=query_dim,
                num_heads=num_heads,
                num_groups=num_groups,
                ffn_dim=ffn_dim,
                num_points=self.stage_points[s],
                out_points=out_points,
                strides=self.feature_strides,
                sampler=sw.sampler,
                subpoint_offsets=sw.subpoint_offsets,
                refine_mode=sw.refine_mode,
                pe_residual=sw.pe_residual,
                dynamic_bias=sw.dynamic_bias,
                num_reused_channel=self.stage_reused_channel[s],
                num_reused_spatial=self.stage_reused_spatial[s],
                filter_usage=sw.filter_usage,
                static_mixing=sw.static_mixing,
                sampling_kernel=sampling_kernel,
            )
            for s in range(num_stages)
        )
        # which stages must leave filters in the bank for a later stage
        self._keep_spatial = [
            any(self.stage_reused_spatial[t] > 0 for t in range(s + 1, s + 2) if t < num_stages)
            for s in range(num_stages)
        ]
        self._keep_bank = [
            any(self.stage_reused_channel[t] > 0 for t in range(s + 1, num_stages)) or self._keep_spatial[s]
            for s in range(num_stages)
        ]

    @classmethod
    def adamixer(cls, **overrides) -> "StageInteractorDecoder":
        """The AdaMixer baseline of paper Tab. 6 (row 1) as a setting of this decoder:
        3-D sampler, 2^z refinement, no reuse (no adapters/static layers), no dynamic biases,
        64 first-stage points. ``overrides`` replace any of these or add other arguments."""
        kwargs = dict(ADAMIXER_BASELINE)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------ input checks
    def _validate(self, features: List[Tensor], image_sizes: Tensor) -> None:
        if not isinstance(features, (list, tuple)) or len(features) != len(self.feature_strides):
            raise ValueError(
                f"features must be a list of {len(self.feature_strides)} maps (strides "
                f"{self.feature_strides}), got {type(features).__name__} of length "
                f"{len(features) if isinstance(features, (list, tuple)) else 'n/a'}"
            )
        f0 = features[0]
        if f0.dim() != 4:
            raise ValueError(f"features[0] must have shape (B, {self.query_dim}, H, W), got {tuple(f0.shape)}")
        B = f0.shape[0]
        pad_h, pad_w = f0.shape[2] * self.feature_strides[0], f0.shape[3] * self.feature_strides[0]
        for lvl, (f, s) in enumerate(zip(features, self.feature_strides)):
            exp_h, exp_w = -(-pad_h // s), -(-pad_w // s)
            if f.dim() != 4 or f.shape[0] != B or f.shape[1] != self.query_dim or abs(f.shape[2] - exp_h) > 1 or abs(f.shape[3] - exp_w) > 1:
                raise ValueError(
                    f"features[{lvl}] (stride {s}) must have shape (B={B}, C={self.query_dim}, "
                    f"H≈{exp_h}, W≈{exp_w}), got {tuple(f.shape)}"
                )
        if image_sizes.shape != (B, 2):
            raise ValueError(f"image_sizes must have shape (B={B}, 2) as (h, w), got {tuple(image_sizes.shape)}")
        # Finiteness without a host read (it would block the host before the decoder's
        # launches, issue 21): one float32 sum per tensor (NaN/Inf propagate; a float32 sum of
        # half-precision maps does not overflow) and one device-side assert. On an accelerator
        # it fails asynchronously (a CUDA error at the next synchronisation); on the CPU it
        # raises at once, and the inputs are then checked one by one to name the culprit (a
        # float32 sum that merely overflowed is not reported as NaN/Inf).
        sums = torch.stack([f.sum(dtype=torch.float32) for f in features]
                           + [image_sizes.sum(dtype=torch.float32)])
        try:
            _assert_async(torch.isfinite(sums).all(), "StageInteractorDecoder: features or "
                          "image_sizes contain NaN or Inf")
        except RuntimeError:
            if f0.device.type != "cpu":  # pragma: no cover - synchronous on a device
                raise
            for lvl, f in enumerate(features):
                if not bool(torch.isfinite(f).all()):
                    raise ValueError(f"features[{lvl}] contains NaN or Inf") from None
            if not bool(torch.isfinite(image_sizes).all()):
                raise ValueError("image_sizes contains NaN or Inf") from None

    # ------------------------------------------------------------------ forward
    def forward(
        self, features: List[Tensor], image_sizes: Tensor, *, return_sampling_points: bool = False
    ) -> List[Dict[str, Tensor]]:
        """
        Args:
            features: L maps (B, D, H_l, W_l) of the padded input, strides ``feature_strides``.
            image_sizes: (B, 2) unpadded (h, w) per image. Values are clamped to
                [1, padded size], so zero-area or out-of-image sizes give valid boxes.
            return_sampling_points: also return each stage's sampling points (B, N, G, P, 3)
                (x, y in pixels, z = log2 scale) under ``"sampling_points"``.
        Returns:
            one dict per stage: ``logits`` (B, N, K), ``xyzr`` (B, N, 4) refined, ``boxes``
            (B, N, 4) xyxy absolute, ``input_xyzr`` (B, N, 4) (detached stage input).
        """
        if self.check_inputs and not is_tracing():
            self._validate(features, image_sizes)
        f0 = features[0]
        # box geometry stays float32 even when the features are bf16/fp16 (autocast)
        if torch.jit.is_tracing():
            # ONNX/TorchScript export: the padded size from the traced shape, so that an exported
            # graph keeps H, W symbolic (new_tensor would bake the trace-time size in)
            pad = torch._shape_as_tensor(f0)[2:].to(f0.device, torch.float32) * self.feature_strides[0]
        else:
            # built on the host, sent with a non-blocking copy (new_tensor would be a blocking one)
            pad = torch.tensor(
                [f0.shape[2] * self.feature_strides[0], f0.shape[3] * self.feature_strides[0]], dtype=torch.float32
            ).to(f0.device, non_blocking=True)
        sizes = torch.clamp(image_sizes.to(torch.float32), min=self.one, max=pad)
        q, xyzr, wh, boxes = self.query_generator(sizes)
        maps = self.stages[0].sampler.prepare(features)  # shared by all stages
        bank = FilterBank()
        outputs: List[Dict[str, Tensor]] = []
        last = len(self.stages) - 1
        grad = torch.is_grad_enabled()
        for s, stage in enumerate(self.stages):
            out = stage(q, xyzr, wh, boxes, maps, bank, return_sampling_points)
            result = {"logits": out["logits"], "xyzr": out["xyzr"], "boxes": out["boxes"], "input_xyzr": xyzr}
            if return_sampling_points:
                result["sampling_points"] = out["sampling_points"]
            outputs.append(result)
            if s < last:
                if self._keep_bank[s]:
                    # the next stage reuses the first rows of this stage's spatial filter; when they
                    # are exactly the generated rows, keep those (no slicing later)
                    keep_rows = self.stages[s + 1].mixing.reused_rows
                    s_keep = out["s_cur"] if out["s_cur"].shape[1] == keep_rows else out["s_full"]
                    bank = update_bank(
                        bank,
                        out["m_cur"],
                        s_keep,
                        stage=s,
                        reuse_start=self.switches.reuse_start,
                        max_channel=self.switches.max_reused_channel_filters,
                        keep_spatial=self._keep_spatial[s],
                    )
                else:
                    bank = FilterBank()
                q = out["q"]
                # boxes are detached between stages (spec §2.4); content and bank are not
                xyzr, wh, boxes = out["xyzr"], out["wh"], out["boxes"]
                if grad:
                    xyzr, wh, boxes = xyzr.detach(), wh.detach(), boxes.detach()
        return outputs
