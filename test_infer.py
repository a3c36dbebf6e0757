"""Tests of infer.py: sliding windows, logit upsampling, padding, scales and flip (SPEC 7).

References are written out here (numpy loops and explicit interpolation weights), never taken
from infer.py. CPU only, tiny models, tiny images.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infer

STRIDE = 8


class PointModel(nn.Module):
    """Logits at stride 8 read pixel (8i, 8j) only (then a 1x1 conv), plus an optional term that
    depends on the position of the logit inside the window: a stand-in for a network whose
    output is not translation invariant, so that wrong window bookkeeping shows."""

    def __init__(self, num_classes: int = 4, position: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(num_classes, generator=g))
        self.row_gain = torch.randn(num_classes, generator=g) if position else torch.zeros(num_classes)
        self.col_gain = torch.randn(num_classes, generator=g) if position else torch.zeros(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(x[:, :, ::STRIDE, ::STRIDE])  # [B, C, ceil(H/8), ceil(W/8)]
        rows = torch.arange(logits.shape[2], dtype=logits.dtype).view(1, 1, -1, 1)
        cols = torch.arange(logits.shape[3], dtype=logits.dtype).view(1, 1, 1, -1)
        return logits + self.row_gain.view(1, -1, 1, 1) * rows + self.col_gain.view(1, -1, 1, 1) * cols


def ref_upsample(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """Literal bilinear interpolation: pixel y reads logit coordinate y / 8, clamped at the end."""
    channels, rows, cols = logits.shape
    out = np.zeros((channels, height, width))
    for y in range(height):
        sy = min(y / STRIDE, rows - 1)
        y0 = int(math.floor(sy))
        y1 = min(y0 + 1, rows - 1)
        fy = sy - y0
        for x in range(width):
            sx = min(x / STRIDE, cols - 1)
            x0 = int(math.floor(sx))
            x1 = min(x0 + 1, cols - 1)
            fx = sx - x0
            out[:, y, x] = ((1 - fy) * (1 - fx) * logits[:, y0, x0] + (1 - fy) * fx * logits[:, y0, x1]
                            + fy * (1 - fx) * logits[:, y1, x0] + fy * fx * logits[:, y1, x1])
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def forward_np(model: nn.Module, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(image[None])[0].double().numpy()


def ref_window_probs(model: nn.Module, image: torch.Tensor, crop: int, starts_y, starts_x) -> np.ndarray:
    """Average of softmax(upsampled logits) over the given windows, padded image, then cropped."""
    _, height, width = image.shape
    padded = F.pad(image, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    total = np.zeros((0,))
    count = np.zeros(padded.shape[1:])
    for top in starts_y:
        for left in starts_x:
            window = padded[:, top:top + crop, left:left + crop]
            probs = softmax(ref_upsample(forward_np(model, window), crop, crop))
            if total.size == 0:
                total = np.zeros((probs.shape[0],) + padded.shape[1:])
            total[:, top:top + crop, left:left + crop] += probs
            count[top:top + crop, left:left + crop] += 1
    assert count.min() >= 1
    return (total / count)[:, :height, :width]


def test_window_starts_cover_evenly_and_end_at_border():
    for size in range(1, 200, 7):
        for crop in (8, 33, 48, 100):
            for stride in range(1, crop + 1, 9):
                starts = infer.window_starts(size, crop, stride)
                if size <= crop:
                    assert starts == [0]
                    continue
                assert starts[0] == 0 and starts[-1] == size - crop
                assert len(starts) == math.ceil((size - crop) / stride) + 1
                gaps = np.diff(starts)
                assert gaps.min() > 0 and gaps.max() <= stride  # no pixel left uncovered
                assert gaps.max() - gaps.min() <= 1  # evenly spaced (rounding only)
                mirrored = [size - crop - s for s in starts[::-1]]
                if len(starts) % 2 == 0 or (size - crop) % 2 == 0:  # else no exact middle crop
                    assert mirrored == starts
                else:
                    assert sum(a != b for a, b in zip(mirrored, starts)) == 1


def test_upsample_logits_matches_literal_interpolation():
    g = torch.Generator().manual_seed(1)
    for height, width in ((40, 40), (37, 29), (8, 9), (1, 17)):
        logits = torch.randn(1, 3, math.ceil(height / 8), math.ceil(width / 8), generator=g, dtype=torch.float64)
        got = infer.upsample_logits(logits, (height, width))[0].numpy()
        np.testing.assert_allclose(got, ref_upsample(logits[0].numpy(), height, width), atol=1e-10)
    with pytest.raises(ValueError, match="stride"):
        infer.upsample_logits(torch.zeros(1, 3, 5, 5), (16, 16))


def test_one_window_equals_plain_forward_upsampled():
    image = torch.randn(3, 37, 37, generator=torch.Generator().manual_seed(2))
    model = PointModel(5, position=True)
    expected = softmax(ref_upsample(forward_np(model, image), 37, 37))
    for crop, stride in ((37, 37), (None, None)):
        got = infer.predict(model, image, crop, stride)
        assert got.dtype == torch.float32 and got.shape == (5, 37, 37)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_one_window_equals_forward_with_the_tiny_network():
    model_lib = pytest.importorskip("model", reason="model.py (build_model) not available yet")
    torch.manual_seed(0)
    net = model_lib.build_model("pspnet", 6, backbone="tiny").eval()
    image = torch.randn(3, 48, 40)
    expected = softmax(ref_upsample(forward_np(net, image), 48, 40))
    got = infer.predict(net, image, None, None)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_small_image_is_padded_with_zeros_and_cropped_back():
    image = torch.randn(3, 21, 30, generator=torch.Generator().manual_seed(3))
    model = PointModel(4, position=True)
    got = infer.predict(model, image, crop_size=40, stride=24)
    expected = ref_window_probs(model, image, 40, [0], [0])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_sliding_windows_average_overlaps():
    # 64 x 88 image, crop 48, stride 24: rows start at 0 and 16, columns at 0, 20 and 40.
    image = torch.randn(3, 64, 88, generator=torch.Generator().manual_seed(4))
    model = PointModel(4, position=True)
    got = infer.predict(model, image, crop_size=48, stride=24)
    expected = ref_window_probs(model, image, 48, [0, 16], [0, 20, 40])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # A position-dependent model gives a different answer with a single whole-image window.
    single = softmax(ref_upsample(forward_np(model, image), 64, 88))
    assert np.abs(single - expected).max() > 1e-2


def test_flip_of_mirror_symmetric_model_is_a_no_op():
    # PointModel without the position term is mirror-equivariant when the width is 8n + 1:
    # the sampled columns 0, 8, ..., 8n map onto themselves under the mirror.
    image = torch.randn(3, 30, 57, generator=torch.Generator().manual_seed(5))
    model = PointModel(4, position=False)
    for crop, stride in ((None, None), (33, 16)):
        plain = infer.predict(model, image, crop, stride)
        flipped = infer.predict(model, image, crop, stride, flip=True)
        np.testing.assert_allclose(flipped.numpy(), plain.numpy(), atol=1e-5)


def test_flip_averages_the_mirrored_prediction_mirrored_back():
    image = torch.randn(3, 32, 40, generator=torch.Generator().manual_seed(6))
    model = PointModel(3, position=True)
    plain = infer.predict(model, image, 32, 16).numpy()
    mirrored = infer.predict(model, image.flip(-1), 32, 16).numpy()[:, :, ::-1]
    assert np.abs(plain - mirrored).max() > 1e-2  # the model is not symmetric: the test can fail
    got = infer.predict(model, image, 32, 16, flip=True).numpy()
    np.testing.assert_allclose(got, 0.5 * (plain + mirrored), atol=1e-5)


def test_scales_are_resized_back_and_averaged():
    image = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(7))
    model = PointModel(3, position=True)
    passes = []
    for scale in (0.5, 1.5):
        size = (round(40 * scale), round(48 * scale))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        probs = torch.from_numpy(softmax(ref_upsample(forward_np(model, scaled), *size))).float()[None]
        passes.append(F.interpolate(probs, size=(40, 48), mode="bilinear", align_corners=False)[0].numpy())
    got = infer.predict(model, image, None, None, scales=(0.5, 1.5)).numpy()
    np.testing.assert_allclose(got, np.mean(passes, axis=0), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=0), 1.0, atol=1e-5)  # still a distribution


def test_predict_uses_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, stride=8, padding=1), nn.BatchNorm2d(3), nn.Dropout(0.9))
    model.train()
    image = torch.randn(3, 24, 24)
    a = infer.predict(model, image, 24, 24)
    b = infer.predict(model, image, 24, 24)
    assert torch.equal(a, b)  # no dropout, no batch statistics
    assert model.training
    with pytest.raises(ValueError, match="stride"):
        infer.predict(model, image, 24, 30)


def test_cli_writes_palette_labels_and_overlays(tmp_path: Path):
    model_lib = pytest.importorskip("model", reason="model.py not available yet")
    data = pytest.importorskip("data", reason="data.py not available yet")
    from PIL import Image

    torch.manual_seed(0)
    net = model_lib.build_model("fcn", 8, backbone="tiny")
    meta = {**net.meta, "class_names": list(data.dataset_info("synthetic").class_names),
            "dataset": "synthetic", "loss": "ce", "kernel_sizes": []}
    model_lib.save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "m.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    infer.main(infer.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "m.pt"), "--input", str(folder), "--out", str(tmp_path / "out"),
         "--device", "cpu"]))
    label_png = Image.open(tmp_path / "out" / "a.png")
    assert label_png.mode == "P"
    info = data.dataset_info("synthetic")
    image = torch.from_numpy(data.normalize(rgb, info.mean, info.std))
    expected = infer.predict(net.eval(), image, info.eval_crop, info.eval_stride).argmax(0).numpy()
    np.testing.assert_array_equal(np.array(label_png), expected)
    overlay = np.array(Image.open(tmp_path / "out" / "a_overlay.png"))
    assert overlay.shape == (30, 44, 3)


@pytest.mark.parametrize("flags,message", [
    (["--stride", "0"], "--stride 0 must be in 1..crop size"),
    (["--crop-size", "0"], "--crop-size 0 must be >= 1"),
    (["--crop-size", "40", "--stride", "41"], "--stride 41 must be in 1..crop size (40)"),
    (["--scales", "0"], "--scales [0.0] must be positive"),
])
def test_cli_refuses_a_zero_window_instead_of_the_default(tmp_path: Path, flags, message):
    # Today `args.stride or info.eval_stride` silently turned 0 into the data set's stride.
    model_lib = pytest.importorskip("model")
    data = pytest.importorskip("data")
    net = model_lib.build_model("fcn", 8, backbone="tiny")
    meta = {**net.meta, "class_names": list(data.dataset_info("synthetic").class_names),
            "dataset": "synthetic", "loss": "ce", "kernel_sizes": []}
    model_lib.save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "m.pt")
    from PIL import Image
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    args = infer.get_args_parser().parse_args(["--ckpt", str(tmp_path / "m.pt"), "--input", str(tmp_path / "a.png"),
                                               "--out", str(tmp_path / "out"), "--device", "cpu", *flags])
    with pytest.raises(SystemExit) as info:
        infer.main(args)
    assert message in str(info.value) and str(info.value).startswith("infer.py: ")
    assert not (tmp_path / "out").exists()
