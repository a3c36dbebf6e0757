"""Inference: sliding-window, multi-scale, mirrored prediction of full images (docs/protocol.md §7).

    python infer.py --ckpt model.pt --input photo.jpg --out preds/
    python infer.py --ckpt model.pt --input folder/ --out preds/ --scales 0.5 1.0 1.5 --flip
    python infer.py --ckpt model.pt --input photo.jpg --out preds/ --crf   # + dense CRF (crf.py)

The paper (section 4.2) and the authors' code evaluate as PSPNet does: the image is covered by
crops of the training size (480 with stride 320 on VOC, 720/480 on Cityscapes), evenly spaced so
that the last crop ends at the border; images smaller than a crop are padded with zeros, i.e.
with the mean colour after normalisation. Each crop's stride-8 logits are upsampled to the crop
and turned into probabilities; overlapping crops average their probabilities. Every scale of
the image (and its mirror image) is predicted that way, resized back to the image and summed.

`predict` is what evaluate.py calls. The CLI writes one label PNG per image in one of three
layouts (`--format`), each of which `evaluate.py --pred-dir` reads back:

    palette     <out>/<name>.png, palette PNGs whose indices are the class (train) ids, and
                <out>/<name>_overlay.png colour overlays (the default)
    voc         <out>/results/VOC2012/Segmentation/comp6_test_cls/<image id>.png: indexed PNGs with
                the VOC colour map, the layout of the PASCAL VOC evaluation server's archive
                (`tar -czf results.tgz -C <out> results`). comp6 is the competition open to
                outside training data (ImageNet, SBD); comp5 would be VOC data only.
    cityscapes  <out>/<city>/<city>_<seq>_<frame>_labelIds.png, 8-bit grey PNGs of Cityscapes
                *label ids* (train ids mapped back with the official table): cityscapesScripts'
                evalPixelLevelSemanticLabeling searches its results folder recursively for one
                `<city>_<seq>_<frame>*.png` per ground-truth image and compares label ids;
                submitting train ids scores nearly 0.

    python infer.py --ckpt voc.pt --format voc --out submit/ --input VOCdevkit/VOC2012/JPEGImages \
                    --image-list VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt
    python infer.py --ckpt cityscapes.pt --format cityscapes --input cityscapes/leftImg8bit/test --out submit/
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checks
import crf
import data
from model import OUTPUT_STRIDE

OVERLAY_ALPHA = 0.5  # weight of the label colours in the overlay images
OUTPUT_FORMATS = ("palette", "voc", "cityscapes")
# Where the VOC evaluation server looks inside the submitted archive (VOC2012 devkit, section 5.3).
VOC_RESULTS_DIR = Path("results", "VOC2012", "Segmentation", "comp6_test_cls")
PROGRESS_EVERY_S = 2.0  # seconds between progress lines
# Windows per forward pass (--window-batch). GPU, an estimate from the tensor shapes (not measured):
# a 720 px window in PSPNet-ResNet-101 peaks at about 0.5 GB in float32 (the largest activations
# are layer 4's 2048 x 90 x 90, 66 MB, and the pyramid pooling's 4096 x 90 x 90 concatenation,
# 133 MB, plus 2 x 42 MB of float32 upsampled logits and probabilities for 21 classes), half that
# with --amp, so 8 windows take about 4 GB beside 0.25 GB of weights: room on any 16 GB GPU,
# while each window already fills the GPU (90 x 90 positions x 2048 channels) and more windows
# per call mostly save launches. 8 covers a whole pass of either protocol (VOC at scale 1: 2
# windows per orientation, scale 1.75: 6; Cityscapes: 8). CPU: 8 windows per forward measured
# 1.75x (VOC protocol) and 1.18x (Cityscapes) faster than one on the development machine
# (bench.py predict, README "Speed"), for the same estimated 4 GB of RAM at 720 px.
WINDOW_BATCH_GPU = 8
WINDOW_BATCH_CPU = 8


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
    it, and where training reads its label (docs/protocol.md §1, `labels[:, ::8, ::8]`). So pixel y takes the
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


def window_grid(height: int, width: int, crop_size: int | None, stride: int | None
                ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """((window h, window w), [(top, left), ...] row by row) of the sliding windows over an
    image of height x width padded bottom/right up to the window. crop_size None: one window,
    the whole image."""
    if crop_size is None:
        return (height, width), [(0, 0)]
    full_h, full_w = max(height, crop_size), max(width, crop_size)
    return (crop_size, crop_size), [(top, left) for top in window_starts(full_h, crop_size, stride)
                                    for left in window_starts(full_w, crop_size, stride)]


class WindowPass:
    """One pass of `predict`: a scaled (possibly mirrored) image `[3, h, w]` and the sum of the
    probabilities of its windows while they come back from the network."""

    def __init__(self, image: torch.Tensor, crop_size: int | None, stride: int | None, mirrored: bool = False):
        _, height, width = image.shape
        self.size, self.mirrored = (height, width), mirrored
        self.window, self.starts = window_grid(height, width, crop_size, stride)
        # Pad bottom/right up to the window with 0 = the mean colour after normalisation, so every
        # window of the pass has the window's size (and windows of equal size stack into a batch).
        win_h, win_w = self.window
        self.padded = F.pad(image, (0, max(win_w - width, 0), 0, max(win_h - height, 0)))  # [3, H', W']
        self.total: torch.Tensor | None = None  # [C, H', W'] summed window probabilities
        self.count = torch.zeros((1,) + tuple(self.padded.shape[-2:]), device=image.device)
        self.added = 0

    def crop(self, top: int, left: int) -> torch.Tensor:
        return self.padded[:, top:top + self.window[0], left:left + self.window[1]]  # [3, win_h, win_w]

    def add(self, probs: torch.Tensor, top: int, left: int) -> None:
        """Add one window's probabilities `[C, win_h, win_w]` (float32) at (top, left)."""
        if self.total is None:
            self.total = torch.zeros((probs.shape[0],) + tuple(self.padded.shape[-2:]), device=probs.device)
        self.total[:, top:top + self.window[0], left:left + self.window[1]] += probs
        self.count[:, top:top + self.window[0], left:left + self.window[1]] += 1
        self.added += 1

    @property
    def complete(self) -> bool:
        return self.added == len(self.starts)

    def probs(self) -> torch.Tensor:
        """Mean probabilities `[C, h, w]` of the windows, the padding cropped away and a mirrored
        pass mirrored back."""
        height, width = self.size
        probs = (self.total / self.count)[:, :height, :width]
        return probs.flip(-1) if self.mirrored else probs


def run_windows(model: torch.nn.Module, passes: Iterable[WindowPass], window_batch: int = 1,
                amp: bool = False) -> Iterator[WindowPass]:
    """Run the windows of `passes` through `model` in batches of up to `window_batch`, and yield
    each pass, in order, once all its windows are added.

    Windows of consecutive passes share a batch when they have the same size, which they do
    whenever a crop size is set (a pass smaller than the crop is padded up to it): with --flip the
    mirrored pass fills the batch its unmirrored pass leaves, and small scales with one window each
    go together. In eval mode BatchNorm uses its running statistics, so a window's logits do not
    depend on the other windows of its batch; each pass sums its windows in the same order as one
    at a time, so the result equals one-at-a-time prediction up to float rounding of the network.
    Passes are read from `passes` only as the batches need them (memory: the open passes' images and
    sums). `amp`: bf16 autocast around the network only; upsampling and softmax run in float32.
    """
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    batch: list[tuple[WindowPass, int, int]] = []  # (pass, top, left)
    waiting: deque[WindowPass] = deque()  # passes read, not yet yielded

    def flush() -> Iterator[WindowPass]:
        crops = torch.stack([p.crop(top, left) for p, top, left in batch])  # [n, 3, win_h, win_w]
        with torch.autocast(crops.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(crops)  # [n, C, ceil(win_h/8), ceil(win_w/8)]
        # Interpolating logits keeps the class margins that interpolating probabilities would blur.
        probs = upsample_logits(logits.float(), batch[0][0].window).softmax(dim=1)  # [n, C, win_h, win_w]
        for (p, top, left), window_probs in zip(batch, probs):
            p.add(window_probs, top, left)
        batch.clear()
        while waiting and waiting[0].complete:
            yield waiting.popleft()

    for p in passes:
        waiting.append(p)
        for top, left in p.starts:
            if batch and (len(batch) == window_batch or batch[0][0].window != p.window):
                yield from flush()
            batch.append((p, top, left))
    if batch:
        yield from flush()


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


def default_window_batch(device: str | torch.device) -> int:
    """--window-batch when it is not given: WINDOW_BATCH_GPU on a GPU, WINDOW_BATCH_CPU on the CPU."""
    return WINDOW_BATCH_GPU if torch.device(device).type == "cuda" else WINDOW_BATCH_CPU


def predict(model: torch.nn.Module, image: torch.Tensor, crop_size: int | None, stride: int | None,
            scales: Sequence[float] = (1.0,), flip: bool = False, window_batch: int | None = None,
            amp: bool = False) -> torch.Tensor:
    """Class probabilities `[C, H, W]` (float32, on the model's device) of a normalised image
    `[3, H, W]` (docs/protocol.md §7).

    For each scale s the image is resized (bilinear) to round(s * H) x round(s * W), predicted
    by sliding crops, and, with `flip`, also predicted mirrored and mirrored back; each pass's
    probabilities are resized back to H x W. The result is the mean over the passes (the sum the
    paper takes, divided by the number of passes, so it is still a distribution; the argmax is
    the same). The windows of all passes go through the network `window_batch` at a time
    (`run_windows`; None: `default_window_batch` of the model's device); `amp`: bf16 autocast
    around the network, the probabilities stay float32.
    """
    if crop_size is not None and (stride is None or not 0 < stride <= crop_size):
        raise ValueError(f"the stride must be in 1..crop_size ({crop_size}) or windows leave gaps; got {stride}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got {tuple(image.shape)}")
    device = next(model.parameters()).device
    window_batch = default_window_batch(device) if window_batch is None else window_batch
    image = image.to(device=device, dtype=torch.float32)
    height, width = image.shape[-2:]

    def passes() -> Iterator[WindowPass]:  # made as the batches reach them
        for scale in scales:
            size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
            scaled = resize(image, size)
            for mirrored in ((False, True) if flip else (False,)):
                yield WindowPass(scaled.flip(-1) if mirrored else scaled, crop_size, stride, mirrored)

    was_training = model.training
    model.eval()  # BatchNorm running statistics (a window does not see its batch), no dropout
    total, count = None, 0
    try:
        with torch.no_grad():  # not inference_mode: callers may reuse the result with autograd on
            for done in run_windows(model, passes(), window_batch, amp):
                probs = resize(done.probs(), (height, width))  # [C, H, W], passes in order
                total = probs if total is None else total + probs
                count += 1
    finally:
        model.train(was_training)  # leave the caller's model as it was (train.py evaluates the model it trained)
    return total / count


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
        raise SystemExit(f"infer.py: no images ({', '.join(data.IMAGE_EXTENSIONS)}) in {path}")
    raise SystemExit(f"infer.py: --input {path} does not exist")


def overlay(rgb: np.ndarray, label: np.ndarray, palette, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Image and label colours blended, [H, W, 3] uint8."""
    colours = data.colorize(label, palette).astype(np.float32)
    return (alpha * colours + (1 - alpha) * rgb.astype(np.float32)).round().astype(np.uint8)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """--window-batch and --amp, shared by infer.py and evaluate.py."""
    parser.add_argument("--window-batch", type=int, metavar="N",
                        help=f"sliding windows per forward pass, across the scales and the mirror image (same "
                             f"result up to float rounding; each 720 px window of PSPNet-ResNet-101 takes about "
                             f"0.5 GB in float32, lower N on a small GPU) (default: {WINDOW_BATCH_GPU} on a GPU, "
                             f"{WINDOW_BATCH_CPU} on the CPU)")
    parser.add_argument("--amp", action="store_true",
                        help="run the network in bf16 autocast (GPUs; CPUs with bf16 instructions gain too); "
                             "the probabilities are still upsampled, soft-maxed and averaged in float32 "
                             "(default: off, float32)")


def speed_problems(args: argparse.Namespace) -> list[str]:
    """The one-line problems of --window-batch."""
    if args.window_batch is not None and args.window_batch < 1:
        return [f"--window-batch {args.window_batch} must be >= 1 (leave it out for the device's default)"]
    return []


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--input", required=True, help="an image or a folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder; what goes where depends on --format")
    parser.add_argument("--format", default="palette", choices=OUTPUT_FORMATS,
                        help="palette: <out>/<name>.png class ids + overlays; voc: the VOC evaluation server's "
                             "results/VOC2012/Segmentation/comp6_test_cls/<id>.png; cityscapes: "
                             "<out>/<city>/<city>_<seq>_<frame>_labelIds.png with Cityscapes label ids "
                             "(default: palette)")
    parser.add_argument("--image-list", metavar="FILE",
                        help="predict only the images whose names (file stems) FILE lists, one per line, e.g. "
                             "VOC2012/ImageSets/Segmentation/test.txt (default: every image under --input)")
    parser.add_argument("--overlay-dir", metavar="DIR",
                        help="where to write <name>_overlay.png colour overlays, or 'none' (default: --out for "
                             "--format palette, none for voc/cityscapes, whose folders must hold the "
                             "predictions only)")
    parser.add_argument("--dataset", help="data set whose palette/normalisation to use (default: the checkpoint's)")
    parser.add_argument("--scales", type=float, nargs="+",
                        help=f"test scales (default: the data set's: {data.per_dataset_text('eval_scales')})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help=f"also predict the mirrored image (default: the data set's: "
                             f"{data.per_dataset_text('eval_flip')})")
    parser.add_argument("--crop-size", type=int, help=f"sliding-window size in pixels (default: the data set's: "
                                                      f"{data.per_dataset_text('eval_crop')})")
    parser.add_argument("--stride", type=int, help=f"sliding-window stride in pixels (default: the data set's: "
                                                   f"{data.per_dataset_text('eval_stride')})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    add_speed_args(parser)
    crf.add_crf_args(parser)
    return parser


def load_for_inference(ckpt_path: str, dataset: str | None, device: str, data_root: str | None = None,
                       prog: str = "infer.py"):
    """(model, ckpt, dataset name, DatasetInfo) for a checkpoint; an unusable --device, a bad
    file, or a data set whose classes differ from the checkpoint's (in number, or in name where
    the checkpoint records its class names) is a one-line SystemExit starting with `prog` (used
    by evaluate.py and plot.py too). A folder data set's classes come from `data_root` when
    given, else from the checkpoint."""
    import model as model_lib  # loading checkpoints belongs to the model stage

    problem = checks.device_problem(device)
    if problem:
        raise SystemExit(f"{prog}: {problem}")
    try:
        model, ckpt = model_lib.load_checkpoint(ckpt_path, map_location=device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{prog}: {error}") from None
    dataset_name = dataset or ckpt["meta"].get("dataset")
    if dataset_name is None:
        raise SystemExit(f"{prog}: --dataset is needed (the checkpoint does not name its data set)")
    info = data.dataset_info(dataset_name, data_root, meta=ckpt["meta"])
    if info.num_classes != ckpt["meta"]["num_classes"]:
        raise SystemExit(f"{prog}: {ckpt_path} predicts {ckpt['meta']['num_classes']} classes but {dataset_name} "
                         f"has {info.num_classes}")
    # Same count, other classes (a folder model on another classes.txt) would be scored as if class
    # k meant the same thing. Cross-domain pairs share their names (a cityscapes model on gta5).
    trained = [str(name) for name in ckpt["meta"].get("class_names") or ()]
    if trained and trained != list(info.class_names):
        k = next(k for k, (a, b) in enumerate(zip(trained, info.class_names)) if a != b)
        raise SystemExit(f"{prog}: {ckpt_path} was trained on other classes than {dataset_name}"
                         f"{f' at {data_root}' if data_root else ''}: class {k} is {trained[k]!r} in the checkpoint "
                         f"but {info.class_names[k]!r} in the data set")
    return model, ckpt, dataset_name, info


def read_image_list(path: Path, images: list[Path]) -> list[Path]:
    """The images of `images` named in the list file `path` (one name per line), in its order."""
    try:
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"infer.py: cannot read --image-list {path}: {error}") from None
    by_name = {data.image_name(image): image for image in images}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise SystemExit(f"infer.py: {len(missing)} of the {len(wanted)} images listed in {path} are not under "
                         f"--input (e.g. {', '.join(missing[:3])})")
    return [by_name[name] for name in wanted]


def cityscapes_city(name: str, source: str | Path) -> str:
    """The city of a Cityscapes image name `<city>_<seq>_<frame>` (split at '_' as cityscapesScripts does)."""
    parts = name.split("_")
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise SystemExit(f"infer.py: {source}: --format cityscapes needs Cityscapes image names "
                         f"<city>_<seq>_<frame>_leftImg8bit.png (as in leftImg8bit/<split>/<city>/)")
    return parts[0]


def prediction_path(out: Path, fmt: str, name: str, source: str | Path | None = None) -> Path:
    """Where `--format fmt` puts the prediction of the image named `name` (see the module docstring)."""
    if fmt == "voc":
        return out / VOC_RESULTS_DIR / f"{name}.png"
    if fmt == "cityscapes":
        return out / cityscapes_city(name, source or name) / f"{name}_labelIds.png"
    return out / f"{name}.png"


def cityscapes_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """[H, W] Cityscapes train ids 0..18 -> label ids (uint8), the official table inverted
    (data.CITYSCAPES_LABEL_TO_TRAIN: 0 road -> 7, ..., 18 bicycle -> 33)."""
    train_ids = np.asarray(train_ids)
    num_classes = len(data.CITYSCAPES_LABEL_TO_TRAIN)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= num_classes):
        raise ValueError(f"Cityscapes train ids must be 0..{num_classes - 1}, got values up to {train_ids.max()}")
    lut = np.zeros(num_classes, np.uint8)
    for label_id, train_id in data.CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[train_id] = label_id
    return lut[train_ids.astype(np.intp)]


def write_prediction(path: Path, label: np.ndarray, fmt: str, palette) -> None:
    """One prediction `[H, W]` (class ids) in the file format of `fmt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "cityscapes":  # single-channel 8-bit, as cityscapesScripts reads it (np.array(Image.open))
        Image.fromarray(cityscapes_label_ids(label), mode="L").save(path)
    elif fmt == "voc":  # indexed PNG with all 256 colours of VOC's map, as the devkit's own PNGs have
        data.save_label_png(path, label, data.voc_palette(256))
    else:  # indexed PNG, index = class id, the data set's colours
        data.save_label_png(path, label, palette)


def check_output_layout(args: argparse.Namespace, dataset_name: str, out: Path) -> Path | None:
    """The overlay folder (None: no overlays), after checking that --format suits the data set and
    that nothing but predictions will land where a test server looks."""
    if args.format == "voc" and dataset_name != "voc":
        raise SystemExit(f"infer.py: --format voc is the PASCAL VOC server's layout; this is a {dataset_name} model")
    if args.format == "cityscapes" and dataset_name != "cityscapes":
        raise SystemExit(f"infer.py: --format cityscapes writes Cityscapes label ids; this is a {dataset_name} model")
    if args.overlay_dir is None:
        return out if args.format == "palette" else None
    if args.overlay_dir.lower() == "none":
        return None
    overlays = Path(args.overlay_dir)
    # The server's search area: the VOC results folder, or all of --out for cityscapesScripts,
    # whose recursive search would take <name>_overlay.png for a second prediction of <name>.
    guarded = {"voc": out / VOC_RESULTS_DIR, "cityscapes": out}.get(args.format)
    if guarded is not None:
        resolved, protected = overlays.resolve(), guarded.resolve()
        if resolved == protected or protected in resolved.parents:
            raise SystemExit(f"infer.py: --overlay-dir {overlays} is inside {guarded}, which must hold the "
                             f"predictions only (--format {args.format}); choose another folder or none")
    return overlays


def resolve_settings(args: argparse.Namespace, dataset_name: str, info: data.DatasetInfo
                     ) -> tuple[int, int, crf.CRFParams | None]:
    """(crop, stride, CRF setting or None) from the flags and the data set; a flag value that
    cannot mean anything is a one-line exit naming it (0 is never "the default")."""
    problems = crf.arg_problems(args) + speed_problems(args)
    if args.scales is not None and not all(math.isfinite(s) and s > 0 for s in args.scales):
        problems.append(f"--scales {args.scales} must be positive numbers")
    try:
        crop_size, stride = resolve_window(args.crop_size, args.stride, info)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise SystemExit("infer.py: " + "; ".join(problems))
    return crop_size, stride, crf.params_from_args(args, dataset_name)


def check_paths(args: argparse.Namespace) -> None:
    """Before the checkpoint is read: no path flag is empty and --out / --overlay-dir can be folders."""
    problems = checks.empty_path_problems({"--ckpt": args.ckpt, "--input": args.input, "--out": args.out,
                                             "--image-list": args.image_list, "--overlay-dir": args.overlay_dir,
                                             "--dataset": args.dataset})
    outputs = [("--out", args.out)]
    if args.overlay_dir and args.overlay_dir.lower() != "none":
        outputs.append(("--overlay-dir", args.overlay_dir))
    for flag, value in outputs:
        problem = checks.output_path_problem(value, flag, folder=True) if value else None
        if problem:
            problems.append(problem)
    if problems:
        raise SystemExit("infer.py: " + "; ".join(problems))


def check_outputs(images: list[Path], outputs: list[Path]) -> None:
    """Refuse outputs that are input images (--out equal to --input, say) or that are written
    twice (the overlay of a.png and the prediction of a_overlay.png): files would be overwritten."""
    inputs = {path.resolve(): path for path in images}
    seen: dict[Path, Path] = {}
    for output in outputs:
        resolved = output.resolve()
        if resolved in inputs:
            raise SystemExit(f"infer.py: the output {output} would overwrite the input image {inputs[resolved]}; "
                             f"choose an --out (and --overlay-dir) outside the input images")
        if resolved in seen:
            raise SystemExit(f"infer.py: {output} would be written twice (a prediction and an overlay of two "
                             f"images); give --overlay-dir a folder of its own")
        seen[resolved] = output


def progress_line(done: int, total: int, start: float) -> str:
    """'[12/1449] 3.1 img/s, elapsed 0:04, ETA 7:43'."""
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else math.nan

    def clock(seconds: float) -> str:
        if math.isnan(seconds):
            return "?"
        minutes, secs = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

    return f"[{done}/{total}] {rate:.2f} img/s, elapsed {clock(elapsed)}, ETA {clock(eta)}"


def main(args: argparse.Namespace) -> None:
    check_paths(args)
    model, ckpt, dataset_name, info = load_for_inference(args.ckpt, args.dataset, args.device)
    crop_size, stride, crf_params = resolve_settings(args, dataset_name, info)
    out = Path(args.out)
    overlays = check_output_layout(args, dataset_name, out)
    scales = tuple(args.scales or info.eval_scales)
    flip = info.eval_flip if args.flip is None else args.flip
    palette = info.palette
    images = list_images(Path(args.input))
    if args.image_list:
        images = read_image_list(Path(args.image_list), images)
    names = [data.image_name(path, args.input, dataset_name) for path in images]
    targets = [prediction_path(out, args.format, name, path) for name, path in zip(names, images)]
    clashes = len(targets) - len(set(targets))
    if clashes:  # e.g. a.png beside a.jpg, or one name in two sub-folders
        raise SystemExit(f"infer.py: {clashes} image(s) under --input share a name with another, so their "
                         f"predictions would overwrite each other; pass a folder with unique file names")
    overlay_paths = [] if overlays is None else [overlays / f"{name}_overlay.png" for name in names]
    check_outputs(images, targets + overlay_paths)
    out.mkdir(parents=True, exist_ok=True)
    window_batch = default_window_batch(args.device) if args.window_batch is None else args.window_batch
    print(f"{len(images)} image(s), crop {crop_size} stride {stride}, scales {list(scales)}, flip {flip}, "
          f"{window_batch} window(s) per forward{', bf16 autocast' if args.amp else ''}, "
          f"--format {args.format} -> {out}", file=sys.stderr)
    start = last_print = time.perf_counter()
    for done, (path, name, target) in enumerate(zip(images, names, targets), 1):
        rgb = data.read_image(path)  # [H, W, 3] uint8
        image = torch.from_numpy(data.normalize(rgb, info.mean, info.std))  # [3, H, W] float32
        try:
            probs = predict(model, image, crop_size, stride, scales=scales, flip=flip,
                            window_batch=window_batch, amp=args.amp)
        except torch.OutOfMemoryError:
            raise SystemExit(f"infer.py: {out_of_memory(path, window_batch, args.amp, args.device)}") from None
        if crf_params is not None:  # paper Table 6 baseline: dense CRF on the image's colours
            probs = crf.refine(probs, rgb, crf_params)
        label = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()  # [H, W] class (train) ids
        writing, written = target, done - 1
        try:
            write_prediction(target, label, args.format, palette)
            if overlays is not None:
                writing, written = overlay_paths[done - 1], done
                writing.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay(rgb, label, palette)).save(writing)
        except OSError as error:  # a full disk, no permission: one line that says how far it got
            raise SystemExit(f"infer.py: cannot write {writing} ({error.strerror or error}); the predictions of "
                             f"{written} of {len(images)} image(s) were written") from None
        now = time.perf_counter()
        if now - last_print > PROGRESS_EVERY_S or done == len(images):
            print(f"{progress_line(done, len(images), start)}  {path} -> {target}",
                  file=sys.stderr, flush=True)
            last_print = now
    report_submission(args.format, out, set(targets))


def out_of_memory(image: str | Path, window_batch: int, amp: bool, device: str | torch.device) -> str:
    """The line for a device out of memory while predicting `image` (shared with evaluate.py)."""
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    return (f"out of {where} predicting {image} with --window-batch {window_batch}{' --amp' if amp else ''}: "
            f"give a smaller --window-batch" + ("" if amp else " or add --amp"))


def report_submission(fmt: str, out: Path, written: set[Path]) -> None:
    """For the test-server formats: warn about stray PNGs where the server looks, and say how to
    pack or score the folder."""
    if fmt == "palette":
        return
    area = out / VOC_RESULTS_DIR if fmt == "voc" else out
    stray = sorted(p for p in area.rglob("*.png") if p not in written)
    if stray:
        print(f"infer.py: note: {area} also holds {len(stray)} PNG file(s) this run did not write "
              f"(e.g. {stray[0]}); remove them before packing the archive", file=sys.stderr)
    if fmt == "voc":
        print(f"VOC evaluation server archive: tar -czf results.tgz -C {out} results", file=sys.stderr)
    else:
        print(f"Cityscapes: score with CITYSCAPES_RESULTS={out} csEvalPixelLevelSemanticLabeling (cityscapesScripts) "
              f"or python evaluate.py --pred-dir {out} --dataset cityscapes; the server takes a zip of {out}",
              file=sys.stderr)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except data.DatasetError as error:  # an unreadable image: one line, no traceback
        raise SystemExit(f"infer.py: {error}") from None
