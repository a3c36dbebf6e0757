"""Tests of data.py: every on-disk layout read back with the right labels, the SPEC 6 paired
augmentation, the synthetic street scenes, and the error messages. CPU only, no downloads;
fixture trees are written in tmp_path with PIL / scipy directly (not with data.py's writers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image
from scipy import ndimage

import data

CAMVID_ROOT = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "CamVid"

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


@pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason="../shared/datasets/CamVid not present")
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
    with pytest.raises(data.DatasetError, match="no root given"):
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
# paired augmentation (SPEC 6)
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
    """SPEC 6 written the plain way with torch: resize the whole image, mirror, pad, crop
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
