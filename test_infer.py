"""Tests of infer.py: sliding windows, logit upsampling, padding, scales and flip (docs/protocol.md §7).

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

import checkpoint
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
    import model as model_lib
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


# --------------------------------------------------------------------------------------------
# Windows in batches (--window-batch) and bf16 autocast (--amp)
# --------------------------------------------------------------------------------------------
class BatchRecorder:
    """Forward pre-hook: the batch size of every call of a module."""

    def __init__(self, module: nn.Module):
        self.sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs) -> None:
        self.sizes.append(inputs[0].shape[0])


def tiny_net_with_statistics(num_classes: int = 6) -> nn.Module:
    """Tiny PSPNet whose BatchNorm layers hold random running statistics (so that eval-mode
    BatchNorm does something) and a classifier with some spread."""
    import model as model_lib
    torch.manual_seed(0)
    net = model_lib.build_model("pspnet", num_classes, backbone="tiny")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        net.classifier.weight.normal_(0, 1.0)
    return net.eval()


def window_count(height: int, width: int, crop: int, stride: int, scales, flip: bool) -> int:
    total = 0
    for s in scales:
        h, w = max(round(height * s), 1), max(round(width * s), 1)
        total += len(infer.window_starts(max(h, crop), crop, stride)) * len(infer.window_starts(max(w, crop), crop, stride))
    return total * (2 if flip else 1)


def test_batched_windows_equal_one_at_a_time_across_scales_and_flip():
    net = tiny_net_with_statistics()
    image = torch.randn(3, 70, 101, generator=torch.Generator().manual_seed(8))  # not square, odd width
    scales = (0.6, 1.0, 1.3)
    windows = window_count(70, 101, 48, 32, scales, True)
    assert windows == 2 * (2 + 6 + 12)  # several windows per pass; 0.6 pads up to the crop
    recorder = BatchRecorder(net)
    single = infer.predict(net, image, 48, 32, scales=scales, flip=True, window_batch=1)
    assert recorder.sizes == [1] * windows
    for batch in (2, 3, 7, 64):
        recorder.sizes.clear()
        got = infer.predict(net, image, 48, 32, scales=scales, flip=True, window_batch=batch)
        # Every window of every pass has the crop's size, so the batches are full but the last.
        full, rest = divmod(windows, batch)
        assert recorder.sizes == [batch] * full + ([rest] if rest else []), batch
        assert got.dtype == torch.float32 and got.shape == single.shape
        np.testing.assert_allclose(got.numpy(), single.numpy(), atol=1e-5)
    recorder.handle.remove()


def test_batched_windows_match_the_literal_window_average():
    # PointModel's logits depend on the position in the window, so a window put in the wrong
    # place (or given another window's output) of a batch shows.
    image = torch.randn(3, 64, 88, generator=torch.Generator().manual_seed(4))
    model = PointModel(4, position=True)
    expected = ref_window_probs(model, image, 48, [0, 16], [0, 20, 40])
    for batch in (2, 4, 6):
        got = infer.predict(model, image, crop_size=48, stride=24, window_batch=batch)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    plain = infer.predict(model, image, 48, 24, window_batch=1).numpy()
    mirrored = ref_window_probs(model, image.flip(-1), 48, [0, 16], [0, 20, 40])[:, :, ::-1]
    got = infer.predict(model, image, 48, 24, flip=True, window_batch=5).numpy()  # a batch spans both passes
    np.testing.assert_allclose(got, 0.5 * (plain + mirrored), atol=1e-5)


def test_whole_image_passes_of_other_sizes_are_not_batched_together():
    # crop_size None: each scale is one window of its own size; a pass and its mirror share one.
    net = tiny_net_with_statistics()
    image = torch.randn(3, 40, 56, generator=torch.Generator().manual_seed(9))
    recorder = BatchRecorder(net)
    single = infer.predict(net, image, None, None, scales=(0.5, 1.0), flip=True, window_batch=1)
    recorder.sizes.clear()
    got = infer.predict(net, image, None, None, scales=(0.5, 1.0), flip=True, window_batch=8)
    assert recorder.sizes == [2, 2]
    np.testing.assert_allclose(got.numpy(), single.numpy(), atol=1e-5)
    recorder.handle.remove()
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        infer.predict(net, image, None, None, window_batch=0)


def test_amp_runs_the_network_in_bf16_and_keeps_float32_probabilities():
    net = tiny_net_with_statistics()
    image = torch.randn(3, 70, 101, generator=torch.Generator().manual_seed(8))
    seen = []
    net.classifier.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    plain = infer.predict(net, image, 48, 32, scales=(1.0,), flip=True, window_batch=4)
    assert set(seen) == {torch.float32}
    seen.clear()
    amp = infer.predict(net, image, 48, 32, scales=(1.0,), flip=True, window_batch=4, amp=True)
    assert set(seen) == {torch.bfloat16}  # CPU autocast: the network ran in bf16
    assert amp.dtype == torch.float32
    np.testing.assert_allclose(amp.sum(dim=0).numpy(), 1.0, atol=1e-5)  # averaged in float32
    assert (amp - plain).abs().max() < 0.05  # bf16 keeps about 3 significant digits
    assert (amp.argmax(0) == plain.argmax(0)).float().mean() > 0.97


def test_default_window_batch_per_device():
    assert infer.default_window_batch("cpu") == infer.WINDOW_BATCH_CPU
    assert infer.default_window_batch(torch.device("cuda", 1)) == infer.WINDOW_BATCH_GPU
    assert infer.WINDOW_BATCH_GPU >= infer.WINDOW_BATCH_CPU >= 1


def test_cli_writes_palette_labels_and_overlays(tmp_path: Path):
    import model as model_lib
    import data
    from PIL import Image

    torch.manual_seed(0)
    net = model_lib.build_model("fcn", 8, backbone="tiny")
    meta = {**net.meta, "class_names": list(data.dataset_info("synthetic").class_names),
            "dataset": "synthetic", "loss": "ce", "kernel_sizes": []}
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "m.pt")
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


# --------------------------------------------------------------------------------------------
# Test-server layouts (--format voc | cityscapes) and evaluate.py --pred-dir reading them back
# --------------------------------------------------------------------------------------------
VOC_RESULTS = Path("results", "VOC2012", "Segmentation", "comp6_test_cls")
# The official Cityscapes labelId of each train id 0..18, written out here (cityscapesScripts'
# labels.py), not read from data.py.
CITYSCAPES_LABEL_OF_TRAIN = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def voc_colour(index: int) -> tuple[int, int, int]:
    """VOC devkit's VOClabelcolormap, literally: bit 3k+j of the index is bit 7-k of channel j."""
    rgb = [0, 0, 0]
    for k in range(8):
        for j in range(3):
            rgb[j] |= ((index >> (3 * k + j)) & 1) << (7 - k)
    return tuple(rgb)


def save_tiny_checkpoint(path: Path, dataset: str, seed: int = 0) -> nn.Module:
    """An untrained tiny FCN for `dataset` with a spread-out classifier, so that many classes occur."""
    import model as model_lib
    import data
    info = data.dataset_info(dataset)
    torch.manual_seed(seed)
    net = model_lib.build_model("fcn", info.num_classes, backbone="tiny")
    with torch.no_grad():
        net.classifier.weight.normal_(0, 3.0)
    meta = {**net.meta, "class_names": list(info.class_names), "dataset": dataset, "loss": "ce", "kernel_sizes": []}
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta}, path)
    return net.eval()


# A 64-pixel window instead of VOC's 480 / Cityscapes' 720: the small test images would be padded
# to the full window, which only costs time here.
WINDOW = ["--crop-size", "64", "--stride", "48"]


def expected_labels(net: nn.Module, dataset: str, rgb: np.ndarray) -> np.ndarray:
    import data
    info = data.dataset_info(dataset)
    image = torch.from_numpy(data.normalize(rgb, info.mean, info.std))
    return infer.predict(net, image, 64, 48).argmax(0).numpy()


def make_voc_root(root: Path, ids: list[str], shape=(40, 56)) -> dict[str, np.ndarray]:
    """VOCdevkit/VOC2012 with JPEG images, class and object PNGs and a val list; returns the RGBs
    as they decode from the JPEGs."""
    from PIL import Image

    voc = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    images = {}
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        images[i] = np.array(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB"))
        cls = rng.integers(0, 21, shape).astype(np.uint8)
        cls[:3] = 255  # a void band
        for folder, values in (("SegmentationClass", cls), ("SegmentationObject", cls)):
            im = Image.fromarray(values, mode="L")
            im.putpalette([v for c in range(256) for v in voc_colour(c)])
            im.save(voc / folder / f"{i}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return images


def test_voc_format_writes_the_server_layout_with_the_voc_colour_map(tmp_path: Path):
    from PIL import Image

    ids = ["2008_000002", "2008_000009"]
    images = make_voc_root(tmp_path, ids)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    net = save_tiny_checkpoint(tmp_path / "voc.pt", "voc")
    (voc / "JPEGImages" / "2008_000100.jpg").write_bytes((voc / "JPEGImages" / "2008_000002.jpg").read_bytes())
    out = tmp_path / "submit"
    infer.main(infer.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "voc.pt"), "--input", str(voc / "JPEGImages"), "--format", "voc",
         "--image-list", str(voc / "ImageSets" / "Segmentation" / "val.txt"), "--out", str(out), "--device", "cpu",
         "--scales", "1", "--no-flip", *WINDOW]))  # VOC's 6 scales + flip are tested above; one pass is quicker
    folder = out / VOC_RESULTS
    # One PNG per listed image (2008_000100 is not listed), nothing else in the folder or beside it.
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in ids]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        sorted(str(VOC_RESULTS / f"{i}.png") for i in ids)
    full_map = [v for c in range(256) for v in voc_colour(c)]
    for i in ids:
        png = Image.open(folder / f"{i}.png")
        assert png.mode == "P"
        assert png.getpalette()[:768] == full_map  # the devkit's 256-colour map, 255 = (224, 224, 192)
        np.testing.assert_array_equal(np.array(png), expected_labels(net, "voc", images[i]))
    # evaluate.py --pred-dir finds the layout by itself and scores it as the model does.
    import evaluate

    common = ["--dataset", "voc", "--data-root", str(tmp_path / "VOCdevkit"), "--metric", "miou", "--workers", "0"]
    from_pngs = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(out), *common, "--json", str(tmp_path / "a.json")]))
    from_model = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "voc.pt"), *common, "--device", "cpu", "--scales", "1", "--no-flip", *WINDOW,
         "--json", str(tmp_path / "b.json")]))
    assert from_pngs["settings"]["pred_format"] == "voc"
    assert from_pngs["confusion"] == from_model["confusion"]
    assert np.array(from_pngs["confusion"]).sum() > 0


def make_cityscapes_root(root: Path, names: dict[str, list[str]], shape=(36, 52)) -> dict[str, np.ndarray]:
    """leftImg8bit/val/<city>/<stem>_leftImg8bit.png and gtFine label/instance ids; returns RGBs."""
    from PIL import Image

    rng = np.random.default_rng(1)
    images = {}
    for city, stems in names.items():
        for sub in ("leftImg8bit", "gtFine"):
            (root / sub / "val" / city).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
            images[stem] = rgb
            label_ids = rng.choice([0, 1, 4, *CITYSCAPES_LABEL_OF_TRAIN], size=shape).astype(np.uint8)
            Image.fromarray(label_ids, mode="L").save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
            instance_ids = label_ids.astype(np.uint16)  # stuff: the label id; things: id * 1000 + k
            things = label_ids >= 24
            instance_ids[things] = instance_ids[things] * 1000 + (np.indices(shape)[1][things] // 13)
            Image.fromarray(instance_ids).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png")
    return images


def test_cityscapes_label_ids_of_every_train_id():
    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19).repeat(2, axis=0)  # [2, 19]
    np.testing.assert_array_equal(infer.cityscapes_label_ids(train_ids), [CITYSCAPES_LABEL_OF_TRAIN] * 2)
    with pytest.raises(ValueError, match="0..18"):
        infer.cityscapes_label_ids(np.array([[0, 255]], np.uint8))  # void has no label id to submit


def test_cityscapes_format_writes_label_ids_per_city_and_round_trips(tmp_path: Path):
    from PIL import Image

    names = {"bad-honnef": ["bad-honnef_000001_000019"], "ulm": ["ulm_000000_000019", "ulm_000003_000123"]}
    images = make_cityscapes_root(tmp_path / "cs", names)
    net = save_tiny_checkpoint(tmp_path / "cs.pt", "cityscapes")
    out = tmp_path / "submit"
    infer.main(infer.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "cs.pt"), "--input", str(tmp_path / "cs" / "leftImg8bit" / "val"),
         "--format", "cityscapes", "--out", str(out), "--device", "cpu", *WINDOW]))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{city}/{stem}_labelIds.png" for city, stems in names.items() for stem in stems)
    seen = set()
    for city, stems in names.items():
        for stem in stems:
            png = Image.open(out / city / f"{stem}_labelIds.png")
            assert png.mode == "L"  # one channel, as cityscapesScripts requires
            label_ids = np.array(png)
            train_ids = expected_labels(net, "cityscapes", images[stem])
            # Every pixel holds the official label id of the predicted train id, and back.
            np.testing.assert_array_equal(label_ids, np.array(CITYSCAPES_LABEL_OF_TRAIN)[train_ids])
            back = np.full(256, 255)
            back[list(CITYSCAPES_LABEL_OF_TRAIN)] = np.arange(19)
            np.testing.assert_array_equal(back[label_ids], train_ids)
            seen |= set(np.unique(train_ids).tolist())
    assert len(seen) > 5  # many classes occur, so a wrong table would show
    import evaluate

    common = ["--dataset", "cityscapes", "--data-root", str(tmp_path / "cs"), "--metric", "all", "--workers", "0"]
    from_pngs = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(out), *common, "--json", str(tmp_path / "a.json")]))
    from_model = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "cs.pt"), *common, "--device", "cpu", *WINDOW, "--json", str(tmp_path / "b.json")]))
    assert from_pngs["settings"]["pred_format"] == "cityscapes"
    for key in ("confusion", "instance_count"):
        assert from_pngs[key] == from_model[key]
    assert from_pngs["boundary"]["counts"] == from_model["boundary"]["counts"]
    # A second file matching <city>_<seq>_<frame>*.png is refused, as cityscapesScripts does.
    (out / "ulm" / "ulm_000000_000019_overlay.png").write_bytes((out / "ulm" / "ulm_000000_000019_labelIds.png").read_bytes())
    with pytest.raises(ValueError, match="2 predictions for ulm_000000_000019"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--pred-dir", str(out), *common]))


def test_cityscapes_pred_dir_reads_label_ids_not_train_ids(tmp_path: Path, capsys):
    """Train ids saved where label ids belong must not score as if they were right."""
    from PIL import Image
    import evaluate

    names = {"ulm": ["ulm_000000_000019"]}
    make_cityscapes_root(tmp_path / "cs", names)
    gt = np.array(Image.open(tmp_path / "cs" / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png"))
    back = np.full(256, 255, np.uint8)
    back[list(CITYSCAPES_LABEL_OF_TRAIN)] = np.arange(19)
    train_ids = back[gt]  # the perfect prediction, as train ids
    common = ["--dataset", "cityscapes", "--data-root", str(tmp_path / "cs"), "--metric", "miou", "--workers", "0"]
    for folder, values, expect in (("right", gt, 1.0), ("wrong", train_ids, None)):
        (tmp_path / folder / "ulm").mkdir(parents=True)
        Image.fromarray(values, mode="L").save(tmp_path / folder / "ulm" / "ulm_000000_000019_pred.png")
        result = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--pred-dir", str(tmp_path / folder), "--pred-format", "cityscapes", *common]))
        if expect is not None:
            assert result["miou"] == pytest.approx(expect)
        else:
            assert result["miou"] < 0.5
            assert "are these train ids" in capsys.readouterr().err


def test_infer_refuses_bad_outputs_in_one_line(tmp_path: Path):
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "file.txt").write_text("x")
    base = ["--ckpt", str(tmp_path / "syn.pt"), "--input", str(tmp_path / "a.png"), "--device", "cpu"]
    cases = [
        (["--out", str(tmp_path / "file.txt")], "is a file; expected a folder"),
        (["--out", str(tmp_path / "o"), "--format", "voc"], "synthetic model"),
        (["--out", str(tmp_path / "o"), "--format", "cityscapes"], "synthetic model"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            infer.main(infer.get_args_parser().parse_args(base + extra))
    assert not (tmp_path / "o").exists()  # nothing written before the refusal


def test_cityscapes_overlays_inside_the_results_folder_are_refused(tmp_path: Path):
    save_tiny_checkpoint(tmp_path / "cs.pt", "cityscapes")
    make_cityscapes_root(tmp_path / "cs", {"ulm": ["ulm_000000_000019"]})
    leftimg = str(tmp_path / "cs" / "leftImg8bit" / "val")
    base = ["--ckpt", str(tmp_path / "cs.pt"), "--input", leftimg, "--format", "cityscapes",
            "--out", str(tmp_path / "submit"), "--device", "cpu", *WINDOW]
    with pytest.raises(SystemExit, match="must hold the predictions only"):
        infer.main(infer.get_args_parser().parse_args(base + ["--overlay-dir", str(tmp_path / "submit" / "viz")]))
    infer.main(infer.get_args_parser().parse_args(base + ["--overlay-dir", str(tmp_path / "viz")]))
    assert (tmp_path / "viz" / "ulm_000000_000019_overlay.png").is_file()
    assert [p.name for p in (tmp_path / "submit").rglob("*.png")] == ["ulm_000000_000019_labelIds.png"]
    # A file whose name is not <city>_<seq>_<frame> cannot be matched by cityscapesScripts.
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(SystemExit, match="photo.png: --format cityscapes needs Cityscapes image names"):
        infer.main(infer.get_args_parser().parse_args(
            ["--ckpt", str(tmp_path / "cs.pt"), "--input", str(tmp_path / "photo.png"), "--format", "cityscapes",
             "--out", str(tmp_path / "x"), "--device", "cpu"]))


def test_progress_line_with_eta_on_stderr(tmp_path: Path, capsys):
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    (tmp_path / "in").mkdir()
    for k in range(3):
        Image.fromarray(np.full((16, 24, 3), 40 * k, np.uint8)).save(tmp_path / "in" / f"{k}.png")
    infer.main(infer.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "syn.pt"), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
         "--device", "cpu"]))
    err = capsys.readouterr().err
    assert "[3/3]" in err and "img/s" in err and "ETA" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == \
        ["0.png", "0_overlay.png", "1.png", "1_overlay.png", "2.png", "2_overlay.png"]


def test_pred_dir_png_of_the_wrong_size_is_named(tmp_path: Path):
    import evaluate

    import data
    sample = data.build_dataset("synthetic", None, "val", train=False, length=1)[0]
    height, width = sample["label"].shape
    data.save_label_png(tmp_path / f"{sample['name']}.png", np.zeros((height, width - 8), np.uint8),
                        data.dataset_info("synthetic").palette)
    with pytest.raises(ValueError, match=rf"{sample['name']}\.png: prediction is {width - 8}x{height} pixels"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--pred-dir", str(tmp_path), "--dataset", "synthetic", "--length", "1", "--workers", "0"]))


def test_pred_dir_values_that_are_no_class_id_are_refused_not_scored_as_misses(tmp_path: Path):
    """A palette PNG holding e.g. Cityscapes label ids (7, 8, 11, ...) instead of class ids would
    count as misses with exit 0; 255 (no prediction) stays a plain miss."""
    import evaluate
    import data

    sample = data.build_dataset("synthetic", None, "val", train=False, length=1)[0]
    height, width = sample["label"].shape
    pred = np.zeros((height, width), np.uint8)
    pred[:4] = 255                                      # "no prediction": allowed, a miss
    data.save_label_png(tmp_path / f"{sample['name']}.png", pred, data.dataset_info("synthetic").palette)
    argv = ["--pred-dir", str(tmp_path), "--dataset", "synthetic", "--length", "1", "--workers", "0",
            "--json", str(tmp_path / "r.json")]
    result = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    assert np.asarray(result["confusion"]).shape[1] == 9  # the extra "no class" column holds the 255s
    pred[10:12] = 33                                    # 8 classes: 33 is no class id
    data.save_label_png(tmp_path / f"{sample['name']}.png", pred, data.dataset_info("synthetic").palette)
    with pytest.raises(ValueError, match=rf"{sample['name']}\.png holds the value 33, neither a class id"):
        evaluate.main(evaluate.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("flags,message", [
    (["--stride", "0"], "--stride 0 must be in 1..crop size"),
    (["--crop-size", "0"], "--crop-size 0 must be >= 1"),
    (["--crop-size", "40", "--stride", "41"], "--stride 41 must be in 1..crop size (40)"),
    (["--scales", "0"], "--scales [0.0] must be positive"),
    (["--window-batch", "0"], "--window-batch 0 must be >= 1"),
])
def test_cli_refuses_a_zero_window_instead_of_the_default(tmp_path: Path, flags, message):
    # Today `args.stride or info.eval_stride` silently turned 0 into the data set's stride.
    import model as model_lib
    import data
    net = model_lib.build_model("fcn", 8, backbone="tiny")
    meta = {**net.meta, "class_names": list(data.dataset_info("synthetic").class_names),
            "dataset": "synthetic", "loss": "ce", "kernel_sizes": []}
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "m.pt")
    from PIL import Image
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    args = infer.get_args_parser().parse_args(["--ckpt", str(tmp_path / "m.pt"), "--input", str(tmp_path / "a.png"),
                                               "--out", str(tmp_path / "out"), "--device", "cpu", *flags])
    with pytest.raises(SystemExit) as info:
        infer.main(args)
    assert message in str(info.value) and str(info.value).startswith("infer.py: ")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Paths and devices that cannot work: one line before any image is read, never an overwrite
# --------------------------------------------------------------------------------------------
def test_outputs_onto_the_input_images_are_refused_before_anything_is_written(tmp_path: Path):
    """--out equal to --input used to overwrite the user's images with their predictions (exit 0)."""
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b", "b_overlay"):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photos / f"{name}.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    base = ["--ckpt", str(tmp_path / "syn.pt"), "--device", "cpu"]
    cases = [
        (["--input", str(photos), "--out", str(photos)], r"the output \S*photos/a.png would overwrite the input image"),
        (["--input", str(photos / "a.png"), "--out", str(photos)], r"would overwrite the input image \S*photos/a.png"),
        # the overlay of b.png is b_overlay.png, which is an input image too
        (["--input", str(photos), "--out", str(tmp_path / "o"), "--overlay-dir", str(photos)],
         r"the output \S*photos/\w+_overlay.png would overwrite the input image"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message) as info:
            infer.main(infer.get_args_parser().parse_args(base + extra))
        assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # nothing overwritten, nothing added
    assert not (tmp_path / "o").exists()
    # b_overlay.png's prediction and b.png's overlay would be the same file of --out.
    with pytest.raises(SystemExit, match=r"\S*o/b_overlay.png would be written twice"):
        infer.main(infer.get_args_parser().parse_args(base + ["--input", str(photos), "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--out", "{tmp}/notes.txt/sub"], "--out {tmp}/notes.txt/sub: {tmp}/notes.txt is a file, so nothing can be created below it"),
    (["--out", "{tmp}/o", "--overlay-dir", "{tmp}/notes.txt/viz"], "--overlay-dir {tmp}/notes.txt/viz: {tmp}/notes.txt is a file"),
    (["--out", "{tmp}/o", "--overlay-dir", "{tmp}/notes.txt"], "--overlay-dir {tmp}/notes.txt is a file; expected a folder"),
    (["--out", ""], "--out is empty"),
    (["--out", "{tmp}/o", "--input", ""], "--input is empty"),
    (["--out", "{tmp}/o", "--ckpt", ""], "--ckpt is empty"),
    (["--out", "{tmp}/o", "--image-list", ""], "--image-list is empty"),
    (["--out", "{tmp}/o", "--overlay-dir", ""], "--overlay-dir is empty"),
    (["--out", "{tmp}/o", "--dataset", ""], "--dataset is empty"),
])
def test_empty_paths_and_outputs_below_a_file_are_one_line(tmp_path: Path, monkeypatch, flags, message):
    """`--input ""` scanned the current folder recursively; `--out notes.txt/sub` was a traceback
    after the checkpoint was loaded."""
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)  # what "" means: the current folder, here with one image in it
    argv = ["--ckpt", str(tmp_path / "syn.pt"), "--input", str(tmp_path / "a.png"), "--device", "cpu"]
    argv += [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as info:
        infer.main(infer.get_args_parser().parse_args(argv))
    assert str(info.value).startswith("infer.py: " + message.replace("{tmp}", str(tmp_path)))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "notes.txt", "syn.pt"]


def test_device_cuda_without_a_gpu_is_named_not_blamed_on_the_checkpoint(tmp_path: Path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        infer.load_for_inference(str(tmp_path / "syn.pt"), None, "cuda", prog="evaluate.py")
    assert str(info.value) == "evaluate.py: --device cuda but no GPU is visible"
    with pytest.raises(SystemExit, match=r"^infer.py: --device gpu: expected cpu or cuda"):
        infer.load_for_inference(str(tmp_path / "syn.pt"), None, "gpu")
    assert infer.load_for_inference(str(tmp_path / "syn.pt"), None, "cpu")[2] == "synthetic"


def test_a_data_set_with_other_class_names_is_refused_but_cross_domain_works(tmp_path: Path):
    """A folder model scored against a classes.txt with other names (same count) used to exit 0."""
    import model as model_lib

    net = model_lib.build_model("fcn", 3, backbone="tiny")
    meta = {**net.meta, "dataset": "folder", "class_names": ["sky", "road", "car"],
            "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]], "loss": "ce", "kernel_sizes": []}
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta}, tmp_path / "folder.pt")
    for root, names in (("same", "sky\nroad\ncar\n"), ("other", "sky\nroad 1 2 3\ntruck\n255 ignore\n")):
        (tmp_path / root / "images" / "val").mkdir(parents=True)
        (tmp_path / root / "classes.txt").write_text(names)
    assert infer.load_for_inference(str(tmp_path / "folder.pt"), None, "cpu", str(tmp_path / "same"))[3].num_classes == 3
    with pytest.raises(SystemExit) as info:
        infer.load_for_inference(str(tmp_path / "folder.pt"), None, "cpu", str(tmp_path / "other"), prog="evaluate.py")
    assert str(info.value) == (f"evaluate.py: {tmp_path / 'folder.pt'} was trained on other classes than folder at "
                               f"{tmp_path / 'other'}: class 2 is 'car' in the checkpoint but 'truck' in the data set")
    # Cross-domain evaluation (paper Table 9): a Cityscapes model on GTA5, the same 19 names.
    save_tiny_checkpoint(tmp_path / "cs.pt", "cityscapes")
    _, ckpt, name, info = infer.load_for_inference(str(tmp_path / "cs.pt"), "gta5", "cpu")
    assert name == "gta5" and ckpt["meta"]["dataset"] == "cityscapes" and info.num_classes == 19


def test_a_full_disk_while_writing_predictions_is_one_line(tmp_path: Path, monkeypatch):
    """A failed prediction write was a traceback; now one line saying how many were written."""
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photos / f"{name}.png")
    real = infer.write_prediction
    calls = []

    def full_disk_on_second(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real(path, *args)

    monkeypatch.setattr(infer, "write_prediction", full_disk_on_second)
    argv = ["--ckpt", str(tmp_path / "syn.pt"), "--device", "cpu", "--input", str(photos),
            "--out", str(tmp_path / "out"), "--overlay-dir", "none"]
    with pytest.raises(SystemExit) as info:
        infer.main(infer.get_args_parser().parse_args(argv))
    message = str(info.value)
    assert message == (f"infer.py: cannot write {tmp_path / 'out' / 'b.png'} (No space left on device); the "
                       f"predictions of 1 of 2 image(s) were written")


def test_out_of_memory_names_the_window_batch_in_one_line(tmp_path: Path, monkeypatch):
    from PIL import Image

    save_tiny_checkpoint(tmp_path / "syn.pt", "synthetic")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "a.png")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(infer, "predict", out_of_memory)
    argv = ["--ckpt", str(tmp_path / "syn.pt"), "--device", "cpu", "--input", str(tmp_path / "a.png"),
            "--out", str(tmp_path / "out"), "--window-batch", "16"]
    with pytest.raises(SystemExit) as info:
        infer.main(infer.get_args_parser().parse_args(argv))
    assert str(info.value) == (f"infer.py: out of memory predicting {tmp_path / 'a.png'} with --window-batch 16: "
                               f"give a smaller --window-batch or add --amp")
