"""ONNX export of the whole detector (stageinteractor/d2/export.py, tools/export_onnx.py).

A tiny StageInteractor (the demo config with small dims, weights perturbed so that boxes and
scores are not at their initial values) is exported with the TorchScript exporter and run by
onnxruntime; its boxes (in original-image pixels), scores and classes must match PyTorch's normal
inference path ``model([{"image", "height", "width"}])`` within 1e-3 of the image size and 1e-4.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from stageinteractor.d2.export import (  # noqa: E402
    ExportableStageInteractor,
    OnnxDetector,
    compare_detections,
    export_onnx,
    place_on_canvas,
    torch_reference,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo" / "stageinteractor_demo.py")
TINY = [
    "model.backbone.widths=[8,8,16,16]",
    "model.neck.in_channels=[8,8,16,16]",
    "model.neck.out_channels=32",
    "model.neck.num_groups=4",
    "model.decoder.num_queries=8",
    "model.decoder.num_stages=3",  # stage 2 reuses filters of stages 0-1
    "model.decoder.query_dim=32",
    "model.decoder.num_heads=2",
    "model.decoder.ffn_dim=32",
    "model.decoder.out_points=4",
    "model.max_detections_per_image=12",
]


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), TINY)
    return _perturb(instantiate(cfg.model)).eval()


def _image(h, w, seed):
    return torch.randint(
        0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def _check(ref, out, orig):
    r = compare_detections(ref, out, orig)
    assert r["ok"] == 1.0, r
    return r


def test_dynamic_size_matches_pytorch_on_two_sizes(tiny_model, tmp_path):
    path = export_onnx(
        tiny_model, str(tmp_path / "m.onnx"), image_size=(96, 128), dynamic_size=True
    )
    onnx_model = OnnxDetector(path)
    for (h, w), orig, seed in (((96, 128), (150, 200), 1), ((160, 104), (160, 104), 2)):
        img = _image(h, w, seed)
        ref = torch_reference(tiny_model, img, orig)
        out = onnx_model(img[None].numpy(), (h, w), orig)
        assert out["boxes"].shape == (12, 4) and out["scores"].shape == (12,)
        assert out["classes"].dtype == np.int64
        _check(ref, out, orig)
        # boxes are not trivially the full image: the perturbed decoder moves them
        assert np.abs(ref["boxes"] - np.array([0, 0, orig[1], orig[0]])).max() > 1.0


def test_fixed_size_canvas_matches_eager_module_and_pytorch(tiny_model, tmp_path):
    path = export_onnx(
        tiny_model, str(tmp_path / "f.onnx"), image_size=(128, 128), input_dtype="float32"
    )
    onnx_model = OnnxDetector(path)
    wrapper = ExportableStageInteractor(tiny_model).eval()
    # an image that fills the canvas: the normal path pads nothing either
    img = _image(128, 128, 3)
    ref = torch_reference(tiny_model, img, (256, 256))
    _check(ref, onnx_model(img[None].float().numpy(), (128, 128), (256, 256)), (256, 256))
    # a smaller image at the top-left of the canvas: same as the exported module run eagerly
    small = _image(100, 90, 4)
    canvas = place_on_canvas(small.numpy(), (128, 128)).astype(np.float32)
    with torch.no_grad():
        b, s, c = wrapper(
            torch.from_numpy(canvas), torch.tensor([100, 90]), torch.tensor([100, 90])
        )
    eager = {"boxes": b.numpy(), "scores": s.numpy(), "classes": c.numpy()}
    _check(eager, onnx_model(canvas, (100, 90), (100, 90)), (100, 90))
    # ... and the canvas content beyond image_size is ignored
    noisy = canvas.copy()
    noisy[..., 100:, :] = 255.0
    noisy[..., :, 90:] = 17.0
    _check(eager, onnx_model(noisy, (100, 90), (100, 90)), (100, 90))


def test_compare_detections_hand_made():
    ref = {
        "boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], dtype=np.float32),
        "scores": np.array([0.9, 0.5, 0.5], dtype=np.float32),
        "classes": np.array([1, 2, 2]),
    }
    # the two tied detections swapped: still equal
    swapped = {k: v[[0, 2, 1]] for k, v in ref.items()}
    r = compare_detections(ref, swapped, (100, 100))
    assert r["ok"] == 1.0 and r["max_box_px"] == 0.0
    # box off by 0.2 px on a 100 px image: 2e-3 relative > 1e-3
    off = {k: v.copy() for k, v in ref.items()}
    off["boxes"][0, 0] += 0.2
    r = compare_detections(ref, off, (100, 100))
    assert r["ok"] == 0.0 and r["max_box_px"] == pytest.approx(0.2, abs=1e-6)
    assert r["max_box_rel"] == pytest.approx(2e-3, abs=1e-8)
    wrong = {k: v.copy() for k, v in ref.items()}
    wrong["classes"][0] = 4
    assert compare_detections(ref, wrong, (100, 100))["class_mismatch"] == 1.0


def test_bad_inputs(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="opset must be >= 16"):
        export_onnx(tiny_model, str(tmp_path / "x.onnx"), opset=13)
    with pytest.raises(ValueError, match="input_dtype"):
        export_onnx(tiny_model, str(tmp_path / "x.onnx"), input_dtype="int32")
    with pytest.raises(ValueError, match="does not fit"):
        place_on_canvas(np.zeros((3, 50, 40), np.uint8), (32, 64))
    with pytest.raises(TypeError, match="StageInteractor"):
        ExportableStageInteractor(torch.nn.Linear(2, 2))


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "export_onnx_tool", REPO / "tools" / "export_onnx.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_exports_and_verifies_real_images(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(((150, 120), (130, 180))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"im{i}.png"
        )
    tool = _load_tool()
    out = tmp_path / "tool.onnx"
    rc = tool.main(
        [
            "--config-file",
            CONFIG,
            "--output",
            str(out),
            "--dynamic-size",
            "--verify",
            str(tmp_path),
            *TINY,
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and "verify: 2 images" in text and "PASS" in text
    assert tool.main(["--config-file", str(tmp_path / "nope.py"), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (f"export_onnx: error: config file "
                                       f"'{tmp_path / 'nope.py'}' does not exist\n")


class _DeformStem(torch.nn.Module):
    """A 3x3 conv replaced by a deformable conv (offsets from a plain conv), like X101-DCN."""

    def __init__(self, conv):
        super().__init__()
        from stageinteractor.d2.backbone.resnet import DeformConv2d

        stride = conv.stride[0]
        self.offset = torch.nn.Conv2d(conv.in_channels, 18, 3, stride=stride, padding=1)
        self.dcn = DeformConv2d(conv.in_channels, conv.out_channels, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.dcn(x, self.offset(x))


def test_deformable_conv_reports_clear_error(tiny_model, tmp_path):
    import copy

    model = copy.deepcopy(tiny_model)
    parent, name = next(
        (m, n)
        for m in model.backbone.modules()
        for n, c in m.named_children()
        if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3)
    )
    setattr(parent, name, _DeformStem(getattr(parent, name)))
    with pytest.raises(RuntimeError, match="deformable"):
        export_onnx(model, str(tmp_path / "dcn.onnx"), image_size=(64, 64))


def test_tool_main_leaves_grad_mode_unchanged(tmp_path):
    """``main()`` also runs in-process (tests, notebooks): autograd must stay as it was."""
    assert torch.is_grad_enabled()
    rc = _load_tool().main(["--config-file", CONFIG, "--output", str(tmp_path / "m.onnx"), *TINY])
    assert rc == 0
    assert torch.is_grad_enabled()
