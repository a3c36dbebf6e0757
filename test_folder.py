"""Your own data end to end (issue 11): a generated binary folder data set (background /
foreground, 255 ignored) is trained with the AAF loss, evaluated with every metric and predicted,
through the same main() functions as the command lines; 0/255 masks without a classes.txt do the
same (issue 18). CPU, tiny backbone, 48-pixel windows."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import infer
import train

FOREGROUND = (255, 255, 0)  # the colour classes.txt gives the foreground


def make_binary_folder(root: Path) -> None:
    """Bright discs (foreground) on dark noise, a 1-px ignored ring around each; val has instance maps."""
    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(f"background 0 0 0\nforeground {' '.join(map(str, FOREGROUND))}\n255 ignore\n")
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            h, w = 40, 56
            yy, xx = np.mgrid[:h, :w]
            label = np.zeros((h, w), np.uint8)
            instance = np.zeros((h, w), np.uint8)
            for k in range(2):
                cy, cx, r = rng.integers(8, 32), rng.integers(8, 48), rng.integers(4, 8)
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                label[(d2 <= (r + 1) ** 2) & (label == 0)] = 255
                label[d2 <= r * r] = 1
                instance[d2 <= r * r] = k + 1
            image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            image[label == 1] += 150
            for kind, array in (("images", image), ("labels", label)) + ((("instances", instance),) if split == "val" else ()):
                path = root / kind / split / f"{split}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


def test_binary_folder_trains_evaluates_and_predicts(tmp_path: Path) -> None:
    root, out = tmp_path / "mydata", tmp_path / "run"
    make_binary_folder(root)
    result = train.main(train.get_args_parser().parse_args([
        "--dataset", "folder", "--data-root", str(root), "--loss", "aaf", "--backbone", "tiny",
        "--pretrained", "none", "--crop-size", "32", "--batch-size", "2", "--iters", "3", "--log-every", "1",
        "--no-eval", "--out", str(out)]))
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["meta"]["dataset"] == "folder" and ckpt["meta"]["num_classes"] == 2
    assert ckpt["meta"]["class_names"] == ["background", "foreground"]
    assert ckpt["meta"]["palette"] == [[0, 0, 0], list(FOREGROUND)]  # from classes.txt, for infer.py
    assert ckpt["args"]["kernel_sizes"] == [3, 5, 7] and ckpt["args"]["loss_lambda"] == 1.0  # folder defaults
    assert ckpt["aaf"] is not None

    window = ["--crop-size", "48", "--stride", "32"]
    results = evaluate.main(evaluate.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--data-root", str(root), "--metric", "all", "--workers", "0",
        "--device", "cpu", *window]))
    assert results["dataset"] == "folder" and results["num_images"] == 2
    assert results["class_names"] == ["background", "foreground"]
    assert len(results["iou"]) == 2 and len(results["instance_iou"]) == 2 and len(results["boundary"]["f"]) == 2
    assert results["instance_counting"] == "instance maps"
    # Background is one instance per image (VOC convention, id 0); foreground the two discs each.
    assert results["instance_count"] == [2, 4]
    assert json.loads((out / "eval_folder_val_all.json").read_text())["miou"] == pytest.approx(results["miou"])

    preds = tmp_path / "preds"
    infer.main(infer.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--input", str(root / "images" / "val"), "--out", str(preds),
        "--device", "cpu", *window]))  # no --data-root: the classes come from the checkpoint
    with Image.open(preds / "val0.png") as im:
        assert im.mode == "P" and im.size == (56, 40)
        assert im.getpalette()[:6] == [0, 0, 0, *FOREGROUND]
    # The saved PNGs score as the model did; without instance maps the output says how it counted.
    shutil.rmtree(root / "instances")
    scored = evaluate.main(evaluate.get_args_parser().parse_args([
        "--pred-dir", str(preds), "--dataset", "folder", "--data-root", str(root), "--metric", "all",
        "--workers", "0"]))
    assert scored["confusion"] == results["confusion"] and scored["miou"] == pytest.approx(results["miou"])
    assert scored["instance_counting"] == "one instance per present class (no instance maps)"


def make_mask_folder(root: Path) -> int:
    """Bright discs on dark noise, stored as 0/255 masks (255 = foreground), no classes.txt; returns
    the number of foreground pixels in val."""
    rng = np.random.default_rng(1)
    foreground = 0
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            yy, xx = np.mgrid[:40, :56]
            label = np.zeros((40, 56), np.uint8)
            for _ in range(2):
                cy, cx, r = rng.integers(8, 32), rng.integers(8, 48), rng.integers(4, 8)
                label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
            image = rng.integers(0, 60, (40, 56, 3)).astype(np.uint8)
            image[label == 255] += 150
            foreground += int((label == 255).sum()) if split == "val" else 0
            for kind, array in (("images", image), ("labels", label)):
                path = root / kind / split / f"{split}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    return foreground


def test_binary_0_255_masks_train_and_score_their_foreground_without_classes_file(tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "masks", tmp_path / "run"
    val_foreground = make_mask_folder(root)
    result = train.main(train.get_args_parser().parse_args([
        "--dataset", "folder", "--data-root", str(root), "--loss", "aaf", "--backbone", "tiny",
        "--pretrained", "none", "--crop-size", "32", "--batch-size", "2", "--iters", "3", "--no-eval",
        "--out", str(out)]))
    said = capsys.readouterr().err
    assert f"data.py: {root}: no classes.txt; labels hold only 0 and 255: a binary set, 255 = foreground\n" in said
    assert "warning" not in said
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["meta"]["class_names"] == ["background", "foreground"] and ckpt["meta"]["num_classes"] == 2

    window = ["--crop-size", "48", "--stride", "32"]
    results = evaluate.main(evaluate.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--data-root", str(root), "--workers", "0", "--device", "cpu", *window]))
    # The foreground is scored: every stored 255 is a ground-truth pixel of class 1 (none ignored).
    confusion = np.array(results["confusion"])
    assert confusion.shape == (2, 3) and confusion[1].sum() == val_foreground > 0
    assert confusion.sum() == 2 * 40 * 56
    assert np.isfinite(results["iou"][1]) and np.isfinite(results["miou"])

    preds = tmp_path / "preds"
    infer.main(infer.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--input", str(root / "images" / "val"), "--out", str(preds),
        "--device", "cpu", *window]))  # no --data-root: the classes come from the checkpoint
    with Image.open(preds / "val0.png") as im:
        assert im.mode == "P" and set(np.unique(np.asarray(im)).tolist()) <= {0, 1}
    scored = evaluate.main(evaluate.get_args_parser().parse_args([
        "--pred-dir", str(preds), "--dataset", "folder", "--data-root", str(root), "--workers", "0"]))
    assert scored["confusion"] == results["confusion"]


def test_sub_folders_with_equal_file_names_round_trip_through_infer_and_pred_dir(tmp_path: Path) -> None:
    """A folder set may reuse a file name in two sub-folders (sample names a/x, b/x): infer.py names
    its outputs the same way, so --pred-dir scores them as the model scores itself."""
    root, out = tmp_path / "mydata", tmp_path / "run"
    make_binary_folder(root)
    for kind in ("images", "labels", "instances"):
        val = root / kind / "val"
        for source, folder in (("val0.png", "a"), ("val1.png", "b")):
            (val / folder).mkdir()
            (val / source).rename(val / folder / "same.png")
    result = train.main(train.get_args_parser().parse_args([
        "--dataset", "folder", "--data-root", str(root), "--loss", "ce", "--backbone", "tiny", "--pretrained",
        "none", "--crop-size", "32", "--batch-size", "2", "--iters", "2", "--no-eval", "--out", str(out)]))
    window = ["--crop-size", "48", "--stride", "32"]
    from_model = evaluate.main(evaluate.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--data-root", str(root), "--workers", "0", "--device", "cpu", *window]))
    preds = tmp_path / "preds"
    infer.main(infer.get_args_parser().parse_args([
        "--ckpt", result["checkpoint"], "--input", str(root / "images" / "val"), "--out", str(preds),
        "--device", "cpu", *window]))
    assert sorted(p.relative_to(preds).as_posix() for p in preds.rglob("*.png")) == [
        "a/same.png", "a/same_overlay.png", "b/same.png", "b/same_overlay.png"]
    from_pngs = evaluate.main(evaluate.get_args_parser().parse_args([
        "--pred-dir", str(preds), "--dataset", "folder", "--data-root", str(root), "--workers", "0"]))
    assert from_pngs["confusion"] == from_model["confusion"]


def test_folder_runs_refuse_a_missing_val_split_up_front(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    make_binary_folder(root)
    shutil.rmtree(root / "images" / "val")
    argv = ["--dataset", "folder", "--data-root", str(root), "--backbone", "tiny", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="folder has no 'val' split for the final evaluation .*--no-eval"):
        train.resolve_args(train.get_args_parser().parse_args(argv))
    args, info = train.resolve_args(train.get_args_parser().parse_args(argv + ["--no-eval"]))
    assert (args.crop_size, args.loss_lambda, args.kernel_sizes, args.iters) == (512, 1.0, [3, 5, 7], 20_000)
    (root / "classes.txt").unlink()
    with pytest.raises(SystemExit, match=r"train.py: folder data set at \S* is missing or incomplete: missing "
                                         r"\S*classes\.txt\. Expected layout"):
        train.resolve_args(train.get_args_parser().parse_args(argv))


def test_help_states_the_folder_defaults() -> None:
    text = train.get_args_parser().format_help()
    flat = " ".join(text.split())
    assert "folder: your own data at --data-root" in flat
    assert "crop 512, lambda 1.0, AAF sizes 3 5 7, 20000 iterations of batch 8 at lr 0.001, evaluation window 512 stride 342" in flat
    assert "window 512 stride 342" in " ".join(evaluate.get_args_parser().format_help().split())
