"""Inference: sliding-window, multi-scale, mirrored prediction of full images (SPEC section 7).

    python infer.py --ckpt model.pt --input photo.jpg --out preds/
    python infer.py --ckpt model.pt --input folder/ --out preds/ --scales 0.5 1.0 1.5 --flip
    python infer.py --ckpt model.pt --input photo.jpg --out preds/ --crf   # + dense CRF (crf.py)

The paper (section 4.2) and the authors' code evaluate as PSPNet does: the image is covered by
crops of the training size (480 with stride 320 on VOC, 720/480 on Cityscapes), evenly spaced so
that the last crop ends at the border; images smaller than a crop are padded with zeros, i.e.
with the mean colour after normalisation. Each crop's stride-8 logits are upsampled to the crop
and turned into probabilities; overlapping crops average their probabilities. Every scale of
the image (and its mirror image) is predicted that way, resized back to the image and summed.

`predict` is what evaluate.py calls; the CLI writes palette label PNGs (the format
`evaluate.py --pred-dir` reads) and colour overlays.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import crf
import data
from model import OUTPUT_STRIDE

OVERLAY_ALPHA = 0.5  # weight of the label colours in the overlay images


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top-left offsets of crops of `crop` pixels covering `size` (>= crop) pixels.

    ceil((size - crop) / stride) + 1 crops, evenly spaced from 0 to size - crop (so consecutive
    crops are at most `stride` apart and the last one ends at the border). The offsets are
    rounded symmetrically (start_i + start_{n-1-i} = size - crop), so the crops of a mirrored
    image are the mirrored crops (except the middle crop of an odd number of crops over an
    odd span, which cannot sit in the exact middle).
    """
    if size <= crop:
        return [0]
    span = size - crop
    count = math.ceil(span / stride) + 1
    starts = [int(math.floor(i * span / (count - 1) + 0.5)) for i in range(count)]
    for i in range(count // 2):  # mirror the first half onto the second
        starts[count - 1 - i] = span - starts[i]
    return starts


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of stride-8 logits `[B, C, ceil(h/8), ceil(w/8)]` to `[B, C, h, w]`.

    Logit (i, j) is anchored at pixel (8i, 8j): that is where a ResNet's stride-2 layers centre
    it, and where training reads its label (SPEC 1, `labels[:, ::8, ::8]`). So pixel y takes the
    value at logit coordinate y / 8 (TF1's resize_bilinear, which the official code uses,
    does the same for crops that are a multiple of 8); pixels past the last anchor, at most 7 at
    the bottom/right, repeat the last logit.
    """
    height, width = size
    rows, cols = logits.shape[-2:]
    if (rows, cols) != (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE)):
        raise ValueError(f"model gave logits of {rows}x{cols} for a {height}x{width} input; "
                         f"expected output stride {OUTPUT_STRIDE} (ceil(size / {OUTPUT_STRIDE}))")
    anchored = (OUTPUT_STRIDE * (rows - 1) + 1, OUTPUT_STRIDE * (cols - 1) + 1)
    out = F.interpolate(logits, size=anchored, mode="bilinear", align_corners=True)  # y -> y / 8
    return F.pad(out, (0, width - anchored[1], 0, height - anchored[0]), mode="replicate")


def sliding_window_probs(model: torch.nn.Module, image: torch.Tensor, crop_size: int | None,
                         stride: int | None) -> torch.Tensor:
    """Class probabilities `[C, h, w]` of one (scaled) image `[3, h, w]` by sliding crops.

    Each crop's logits are upsampled first and then soft-maxed (DeepLab/PSPNet practice:
    interpolating logits keeps the class margins that interpolating probabilities would blur);
    overlapping crops average their probabilities. crop_size None: the whole image in one pass.
    """
    _, height, width = image.shape
    crop_h = crop_w = crop_size
    if crop_size is None:
        crop_h, crop_w, stride = height, width, max(height, width)
    # Pad bottom/right up to the crop with 0 = the mean colour after normalisation.
    padded = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    full_h, full_w = padded.shape[-2:]
    total = None
    count = torch.zeros((1, full_h, full_w), device=image.device)
    for top in window_starts(full_h, crop_h, stride):
        for left in window_starts(full_w, crop_w, stride):
            crop = padded[None, :, top:top + crop_h, left:left + crop_w]  # [1, 3, crop_h, crop_w]
            logits = model(crop).float()  # [1, C, ceil(crop_h/8), ceil(crop_w/8)]
            probs = upsample_logits(logits, (crop_h, crop_w)).softmax(dim=1)[0]  # [C, crop_h, crop_w]
            if total is None:
                total = torch.zeros((probs.shape[0], full_h, full_w), device=image.device)
            total[:, top:top + crop_h, left:left + crop_w] += probs
            count[:, top:top + crop_h, left:left + crop_w] += 1
    return (total / count)[:, :height, :width]  # the padding is cropped away


def resolve_window(crop_size: int | None, stride: int | None, info: data.DatasetInfo) -> tuple[int, int]:
    """(crop, stride) of the sliding windows: the given values, or the data set's evaluation
    window (DatasetInfo.eval_crop / eval_stride) for the ones that are None. 0 is an error, not
    "the default". ValueError names the flag."""
    stride_flag = stride
    crop = info.eval_crop if crop_size is None else crop_size
    stride = info.eval_stride if stride is None else stride
    if crop < 1:
        raise ValueError(f"--crop-size {crop} must be >= 1 pixel")
    if not 1 <= stride <= crop:
        given = f"--stride {stride}" if stride_flag is not None else f"the data set's stride {stride}"
        raise ValueError(f"{given} must be in 1..crop size ({crop}), or windows leave gaps"
                         + ("" if stride_flag is not None else "; give --stride too"))
    return crop, stride


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a `[K, h, w]` image or probability map (pixel centres aligned)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def predict(model: torch.nn.Module, image: torch.Tensor, crop_size: int | None, stride: int | None,
            scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities `[C, H, W]` (float32, on the model's device) of a normalised image
    `[3, H, W]` (SPEC 7).

    For each scale s the image is resized (bilinear) to round(s * H) x round(s * W), predicted
    by sliding crops (`sliding_window_probs`), and, with `flip`, also predicted mirrored and
    mirrored back; each pass's probabilities are resized back to H x W. The result is the mean
    over the passes (the sum the paper takes, divided by the number of passes, so it is still
    a distribution; the argmax is the same).
    """
    if crop_size is not None and (stride is None or not 0 < stride <= crop_size):
        raise ValueError(f"the stride must be in 1..crop_size ({crop_size}) or windows leave gaps; got {stride}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got {tuple(image.shape)}")
    device = next(model.parameters()).device
    image = image.to(device=device, dtype=torch.float32)
    height, width = image.shape[-2:]
    was_training = model.training
    model.eval()  # BatchNorm running statistics, no dropout
    total, passes = None, 0
    try:
        with torch.no_grad():  # not inference_mode: callers may reuse the result with autograd on
            for scale in scales:
                size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
                scaled = resize(image, size)
                for mirrored in ((False, True) if flip else (False,)):
                    x = scaled.flip(-1) if mirrored else scaled
                    probs = sliding_window_probs(model, x, crop_size, stride)
                    if mirrored:
                        probs = probs.flip(-1)
                    probs = resize(probs, (height, width))
                    total = probs if total is None else total + probs
                    passes += 1
    finally:
        model.train(was_training)  # leave the caller's model as it was (train.py evaluates mid-run)
    return total / passes


# --------------------------------------------------------------------------------------------
# Command line: label PNGs and overlays of single images or folders
# --------------------------------------------------------------------------------------------
def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        # Recursive: Cityscapes keeps its images in one folder per city.
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS)
        if images:
            return images
        raise SystemExit(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) in {path}")
    raise SystemExit(f"--input {path} does not exist")


def overlay(rgb: np.ndarray, label: np.ndarray, palette, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Image and label colours blended, [H, W, 3] uint8."""
    colours = data.colorize(label, palette).astype(np.float32)
    return (alpha * colours + (1 - alpha) * rgb.astype(np.float32)).round().astype(np.uint8)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--out", required=True, help="output folder: <stem>.png labels, <stem>_overlay.png")
    parser.add_argument("--dataset", help="data set whose palette/normalisation to use (default: the checkpoint's)")
    parser.add_argument("--scales", type=float, nargs="+", help="test scales (default: the data set's)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="also predict the mirrored image (default: the data set's)")
    parser.add_argument("--crop-size", type=int, help="sliding-window size (default: the data set's)")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: the data set's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    crf.add_crf_args(parser)
    return parser


def load_for_inference(ckpt_path: str, dataset: str | None, device: str):
    """(model, ckpt, dataset name, DatasetInfo) for a checkpoint; a bad file or a data set whose
    class count differs from the checkpoint's is a one-line SystemExit (used by evaluate.py too)."""
    import model as model_lib  # loading checkpoints belongs to the model stage

    try:
        model, ckpt = model_lib.load_checkpoint(ckpt_path, map_location=device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    dataset_name = dataset or ckpt["meta"].get("dataset")
    if dataset_name is None:
        raise SystemExit("--dataset is needed (the checkpoint does not name its data set)")
    info = data.dataset_info(dataset_name)
    if info.num_classes != ckpt["meta"]["num_classes"]:
        raise SystemExit(f"{ckpt_path} predicts {ckpt['meta']['num_classes']} classes but {dataset_name} "
                         f"has {info.num_classes}")
    return model, ckpt, dataset_name, info


def resolve_settings(args: argparse.Namespace, dataset_name: str, info: data.DatasetInfo
                     ) -> tuple[int, int, crf.CRFParams | None]:
    """(crop, stride, CRF setting or None) from the flags and the data set; a flag value that
    cannot mean anything is a one-line exit naming it (0 is never "the default")."""
    problems = crf.arg_problems(args)
    if args.scales is not None and not all(math.isfinite(s) and s > 0 for s in args.scales):
        problems.append(f"--scales {args.scales} must be positive numbers")
    try:
        crop_size, stride = resolve_window(args.crop_size, args.stride, info)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise SystemExit("infer.py: " + "; ".join(problems))
    return crop_size, stride, crf.params_from_args(args, dataset_name)


def main(args: argparse.Namespace) -> None:
    model, ckpt, dataset_name, info = load_for_inference(args.ckpt, args.dataset, args.device)
    crop_size, stride, crf_params = resolve_settings(args, dataset_name, info)
    scales = tuple(args.scales or info.eval_scales)
    flip = info.eval_flip if args.flip is None else args.flip
    palette = info.palette
    images = list_images(Path(args.input))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(images)} image(s), crop {crop_size} stride {stride}, scales {list(scales)}, flip {flip}",
          file=sys.stderr)
    for path in images:
        rgb = data.read_image(path)  # [H, W, 3] uint8
        image = torch.from_numpy(data.normalize(rgb, info.mean, info.std))  # [3, H, W] float32
        probs = predict(model, image, crop_size, stride, scales=scales, flip=flip)
        if crf_params is not None:  # paper Table 6 baseline: dense CRF on the image's colours
            probs = crf.refine(probs, rgb, crf_params)
        label = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()  # [H, W]
        name = data.image_name(path)                     # the name evaluate.py --pred-dir looks for
        data.save_label_png(out / f"{name}.png", label, palette)
        Image.fromarray(overlay(rgb, label, palette)).save(out / f"{name}_overlay.png")
        print(f"{path} -> {out / (name + '.png')}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except data.DatasetError as error:  # an unreadable image: one line, no traceback
        raise SystemExit(f"infer.py: {error}") from None
