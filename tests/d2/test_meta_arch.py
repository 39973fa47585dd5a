"""Tests of the StageInteractor meta-architecture (detectron2 interface).

Most tests use tiny stand-in components that follow the DESIGN.md contracts, so they check the
meta-architecture alone (normalisation, padding, targets, rescaling, top-k, event storage).
The last tests use the real core decoder/criterion when they are importable.
"""
import math

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from stageinteractor.d2.meta_arch import StageInteractor, rescale_boxes  # noqa: E402


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return {"res2": self.conv(x)}


class _Neck(nn.Module):
    def forward(self, feats):
        return [feats["res2"]]


class _Decoder(nn.Module):
    """Fixed boxes/logits plus a feature-dependent term so that gradients flow."""

    def __init__(self, num_queries=5, num_classes=3, boxes=None, logits=None, num_stages=2):
        super().__init__()
        self.num_queries, self.num_classes, self.num_stages = num_queries, num_classes, num_stages
        self.scale = nn.Parameter(torch.zeros(()))
        self.fixed_boxes = boxes
        self.fixed_logits = logits
        self.calls = []

    def forward(self, features, image_sizes):
        self.calls.append(image_sizes.clone())
        bsz = features[0].shape[0]
        shift = self.scale * features[0].mean()
        if self.fixed_logits is None:
            logits = torch.zeros(bsz, self.num_queries, self.num_classes)
        else:
            logits = self.fixed_logits.clone()
        if self.fixed_boxes is None:
            boxes = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(bsz, self.num_queries, 4).clone()
        else:
            boxes = self.fixed_boxes.clone()
        return [{"logits": logits + shift, "boxes": boxes + shift} for _ in range(self.num_stages)]


class _Criterion(nn.Module):
    def __init__(self):
        super().__init__()
        self.last_stats = {}
        self.inputs = None

    def forward(self, stage_outputs, gt_boxes, gt_classes, gt_mask, image_sizes):
        self.inputs = (gt_boxes, gt_classes, gt_mask, image_sizes)
        self.last_stats = {"pos_s0": float(gt_mask.sum()), "instability_s0_s1": 0.25}
        return {f"loss_cls_s{s}": out["logits"].sum() * 0 + out["boxes"].mean() for s, out in enumerate(stage_outputs)}


def _model(**kw):
    dec = kw.pop("decoder", None) or _Decoder()
    return StageInteractor(backbone=_Backbone(), neck=_Neck(), decoder=dec, criterion=_Criterion(), **kw)


def _inputs(sizes, orig=None, gts=None):
    out = []
    for i, (h, w) in enumerate(sizes):
        d = {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8)}
        if orig is not None:
            d["height"], d["width"] = orig[i]
        inst = Instances((h, w))
        boxes = torch.zeros(0, 4) if gts is None else torch.as_tensor(gts[i], dtype=torch.float32).view(-1, 4)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.arange(boxes.shape[0]) % 3
        d["instances"] = inst
        out.append(d)
    return out


def test_normalisation_and_padding():
    model = _model(pixel_mean=[10.0, 20.0, 30.0], pixel_std=[2.0, 4.0, 5.0]).eval()
    inputs = _inputs([(40, 70), (65, 33)])
    with torch.no_grad():
        model(inputs)
    x = model.backbone.seen[-1]
    assert tuple(x.shape) == (2, 3, 96, 96)  # padded to the batch max rounded up to 32
    expect = (inputs[0]["image"].float() - torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)) / torch.tensor(
        [2.0, 4.0, 5.0]
    ).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :40, :70], expect)
    assert float(x[0, :, 40:, :].abs().sum()) == 0.0 and float(x[1, :, :, 33:].abs().sum()) == 0.0
    sizes = model.decoder.calls[-1]
    assert sizes.tolist() == [[40.0, 70.0], [65.0, 33.0]]


def test_inference_rescales_to_original_size_without_clipping():
    # Image 0 entered the network at 64x96 (h, w) from an original 128x192 (x2);
    # image 1 at 96x64 from 48x160 (y /2, x 2.5). The batch is padded to 96x96.
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 40.0]] * 2, [[-4.0, 8.0, 90.0, 100.0]] * 2])
    logits = torch.tensor([[[5.0, -9.0], [-9.0, -9.0]], [[-9.0, -9.0], [-9.0, 3.0]]])
    dec = _Decoder(num_queries=2, num_classes=2, boxes=boxes, logits=logits)
    model = _model(decoder=dec, max_detections_per_image=1).eval()
    with torch.no_grad():
        out = model(_inputs([(64, 96), (96, 64)], orig=[(128, 192), (48, 160)]))
    i0, i1 = out[0]["instances"], out[1]["instances"]
    assert i0.image_size == (128, 192) and i1.image_size == (48, 160)
    torch.testing.assert_close(i0.pred_boxes.tensor, torch.tensor([[20.0, 40.0, 60.0, 80.0]]))
    # x * 160/64 = 2.5, y * 48/96 = 0.5; negative x and the box beyond the image are kept.
    torch.testing.assert_close(i1.pred_boxes.tensor, torch.tensor([[-10.0, 4.0, 225.0, 50.0]]))
    assert i0.pred_classes.tolist() == [0] and i1.pred_classes.tolist() == [1]
    torch.testing.assert_close(i0.scores, torch.sigmoid(torch.tensor([5.0])))
    torch.testing.assert_close(i1.scores, torch.sigmoid(torch.tensor([3.0])))


def test_missing_height_width_keeps_network_size():
    model = _model().eval()
    with torch.no_grad():
        out = model(_inputs([(32, 48)]))
    assert out[0]["instances"].image_size == (32, 48)
    torch.testing.assert_close(out[0]["instances"].pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 8.0, 8.0]))


def test_default_max_detections_is_num_queries():
    model = _model(decoder=_Decoder(num_queries=7, num_classes=3)).eval()
    assert model.max_detections_per_image == 7
    with torch.no_grad():
        out = model(_inputs([(32, 32)]))
    assert len(out[0]["instances"]) == 7


def test_topk_labels_and_boxes_match_brute_force():
    """Through the model: label = idx % K, box of query idx // K, k best (query, class) pairs."""
    g = torch.Generator().manual_seed(0)
    n, c, k = 6, 4, 9
    logits = torch.randn(2, n, c, generator=g)
    boxes = torch.rand(2, n, 4, generator=g) * 30
    boxes[..., 2:] += boxes[..., :2]
    model = _model(decoder=_Decoder(num_queries=n, num_classes=c, boxes=boxes, logits=logits),
                   max_detections_per_image=k).eval()
    with torch.no_grad():
        out = model(_inputs([(32, 32), (32, 32)]))
    for b in range(2):
        triples = sorted(((torch.sigmoid(logits[b, q, j]).item(), q, j) for q in range(n) for j in range(c)),
                         key=lambda t: -t[0])[:k]
        inst = out[b]["instances"]
        assert len(inst) == k
        for j, (score, q, cls) in enumerate(triples):
            assert math.isclose(inst.scores[j].item(), score, rel_tol=1e-6)
            assert inst.pred_classes[j].item() == cls
            torch.testing.assert_close(inst.pred_boxes.tensor[j], boxes[b, q])


def test_rescale_boxes_hand_computed():
    out = rescale_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (10, 20), (30, 10))
    torch.testing.assert_close(out, torch.tensor([[0.5, 6.0, 1.5, 12.0]]))


def test_training_targets_losses_and_event_storage():
    model = _model().train()
    gts = [[[1, 2, 10, 12], [3, 3, 9, 9]], []]
    with EventStorage(0) as storage:
        losses = model(_inputs([(32, 48), (40, 40)], gts=gts))
        latest = storage.latest()
    assert set(losses) == {"loss_cls_s0", "loss_cls_s1"}
    assert all(k.startswith("loss_") and v.dim() == 0 for k, v in losses.items())
    assert latest["diag/pos_s0"][0] == 2.0 and latest["diag/instability_s0_s1"][0] == 0.25
    gt_boxes, gt_classes, gt_mask, image_sizes = model.criterion.inputs
    assert gt_boxes.shape == (2, 2, 4) and gt_mask.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(gt_boxes[0], torch.tensor(gts[0], dtype=torch.float32))
    assert gt_classes[0].tolist() == [0, 1]
    assert image_sizes.tolist() == [[32.0, 48.0], [40.0, 40.0]]
    sum(losses.values()).backward()
    assert model.decoder.scale.grad is not None


def test_all_empty_batch_and_no_storage():
    model = _model().train()
    losses = model(_inputs([(32, 32), (32, 32)], gts=[[], []]))  # no EventStorage: no error
    assert model.criterion.inputs[0].shape == (2, 0, 4)
    assert all(torch.isfinite(v) for v in losses.values())


def test_export_path_and_forward_give_the_hand_computed_top_k():
    """forward_export (the export entry point) and forward against an answer computed by hand
    from the stand-in decoder's fixed logits/boxes: the 5 best (query, class) pairs of the 5 x 3
    scores, sigmoid scores, the query's box; forward rescales it to the original size."""
    logits = torch.tensor([[[0.1, -2.0, 3.0], [1.5, 0.2, -1.0], [-0.5, 2.5, 0.0],
                            [0.7, -0.3, 1.2], [-1.5, 0.4, 2.0]]])
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [4.0, 2.0, 20.0, 30.0], [10.0, 12.0, 30.0, 28.0],
                           [1.0, 5.0, 9.0, 7.0], [30.0, 0.0, 60.0, 16.0]]])
    model = _model(decoder=_Decoder(boxes=boxes, logits=logits)).eval()
    # by hand: (logit, query, class) sorted by logit: 3.0 (q0 c2), 2.5 (q2 c1), 2.0 (q4 c2),
    # 1.5 (q1 c0), 1.2 (q3 c2)
    picks = [(3.0, 0, 2), (2.5, 2, 1), (2.0, 4, 2), (1.5, 1, 0), (1.2, 3, 2)]
    want_scores = torch.tensor([1.0 / (1.0 + math.exp(-v)) for v, _, _ in picks])
    want_classes = [c for _, _, c in picks]
    want_boxes = torch.stack([boxes[0, q] for _, q, _ in picks])
    inputs = _inputs([(32, 64)], orig=[(64, 128)])
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        e_boxes, e_scores, e_classes = model.forward_export(images.tensor, torch.tensor([[32.0, 64.0]]))
        out = model(inputs)[0]["instances"]
    torch.testing.assert_close(e_scores[0], want_scores)
    assert e_classes[0].tolist() == want_classes
    torch.testing.assert_close(e_boxes[0], want_boxes)
    torch.testing.assert_close(out.scores, want_scores)
    assert out.pred_classes.tolist() == want_classes and out.image_size == (64, 128)
    torch.testing.assert_close(out.pred_boxes.tensor, want_boxes * 2.0)  # (32, 64) -> (64, 128)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_format="YUV"),
        dict(pixel_mean=[1.0, 2.0]),
        dict(pixel_std=[1.0, 0.0, 1.0]),
        dict(max_detections_per_image=0),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        _model(**kwargs)


def test_bad_image_raises():
    model = _model().eval()
    with pytest.raises(ValueError, match="batched_inputs\\[0\\]"):
        model([{"image": torch.zeros(1, 8, 8, dtype=torch.uint8)}])


def test_tiny_backbone_shapes():
    from stageinteractor.d2.backbone.tiny import TinyBackbone

    net = TinyBackbone(widths=(8, 16, 24, 32), depth=2, gn_groups=4)
    out = net(torch.zeros(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 8, 16, 24), "res3": (2, 16, 8, 12), "res4": (2, 24, 4, 6), "res5": (2, 32, 2, 3)
    }
    assert {k: (s.channels, s.stride) for k, s in net.output_shape().items()} == {
        "res2": (8, 4), "res3": (16, 8), "res4": (24, 16), "res5": (32, 32)
    }


def test_demo_tool_draws_detections_and_sampling_points(tmp_path):
    """tools/demo.py end to end on the demo config (random weights), with --sampling-points."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("si_demo_tool", root / "tools" / "demo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    img = np.full((60, 80, 3), 200, np.uint8)
    img[10:40, 20:50] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = tmp_path / "out"
    rc = tool.main([
        "--config-file", str(root / "configs/demo/stageinteractor_demo.py"), "--input", str(tmp_path),
        "--output", str(out), "--sampling-points", "--confidence-threshold", "0.0", "--min-size", "64",
        "--max-size", "96",
    ])
    assert rc == 0
    det = np.asarray(Image.open(out / "a.jpg"))
    pts = np.asarray(Image.open(out / "a_points.jpg"))
    assert det.shape[1] == 400  # upscaled for readability
    assert pts.shape[1] == 3 * 400 and pts.shape[0] == 2 * det.shape[0]  # 4 stages -> 3 x 2 grid


def _demo_model(*overrides):
    from pathlib import Path

    from detectron2.config import LazyConfig, instantiate

    root = Path(__file__).resolve().parents[2]
    cfg = LazyConfig.load(str(root / "configs/demo/stageinteractor_demo.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["model.decoder.num_queries=12", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def test_real_components_empty_gt_amp_and_diagnostics():
    """Real decoder + criterion: images without objects give finite losses (one empty image in
    the batch, and a batch with no object at all); the criterion's statistics go to the event
    storage, not the loss dict; under CPU bf16 autocast the losses are fp32 and finite."""
    model = _demo_model().train()
    gts = [[[2, 3, 20, 25], [30, 5, 60, 30]], []]
    for batch_gts in (gts, [[], []]):
        with EventStorage(0) as storage:
            losses = model(_inputs([(32, 64), (64, 32)], gts=batch_gts))
            latest = storage.latest()
        assert losses and all(k.startswith("loss_") for k in losses)
        assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
        assert "diag/num_pos_s0" in latest and "diag/label_instability_s0_s1" in latest
        assert not any(k.startswith("diag/") for k in losses)
        sum(losses.values()).backward()
    assert latest["diag/num_pos_s0"][0] == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_inputs([(32, 64), (64, 32)], gts=gts))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_real_components_inference_matches_export_path():
    model = _demo_model().eval()
    inputs = _inputs([(32, 64), (64, 32)], orig=[(64, 128), (32, 16)])
    with torch.no_grad():
        out = model(inputs)
        images = model.preprocess_image(inputs)
        sizes = torch.tensor([[32.0, 64.0], [64.0, 32.0]])
        boxes, scores, classes = model.inference_tensors(images.tensor, sizes)
    k = min(model.max_detections_per_image, 12 * model.decoder.num_classes)
    assert boxes.shape == (2, k, 4) and scores.shape == (2, k) and classes.shape == (2, k)
    torch.testing.assert_close(out[0]["instances"].pred_boxes.tensor, boxes[0] * 2.0)
    torch.testing.assert_close(out[1]["instances"].pred_boxes.tensor, boxes[1] * torch.tensor([0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(out[1]["instances"].scores, scores[1])
    assert torch.equal(out[1]["instances"].pred_classes, classes[1])
