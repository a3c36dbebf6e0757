"""Tests of evaluate.py: mIoU, instance-wise mIoU and scoring end to end (docs/metrics.md); the
boundary metric itself is tested in test_boundary.py.

Every expected number is either computed by hand in the test or by a literal reference written
here (pixel loops), never by the code under test. CPU only, no data set needed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import infer

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# 1. mIoU
# --------------------------------------------------------------------------------------------
def test_confusion_matrix_rows_gt_columns_pred_void_skipped():
    gt = np.array([[0, 0, 1], [2, 255, 1]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    expected = np.array([[1, 1, 0],   # gt 0: one right, one predicted 1
                         [0, 1, 1],   # gt 1
                         [0, 1, 0]])  # gt 2 predicted 1; the void pixel is skipped
    conf = evaluate.confusion_matrix(pred, gt, 3)
    assert conf.shape == (3, 3)
    np.testing.assert_array_equal(conf, expected)


def test_miou_hand_computed_with_a_255_prediction_as_a_miss():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [255, 2, 2]])
    per_class, mean = evaluate.miou(evaluate.confusion_matrix(pred, gt, 3))
    # class 0: TP 1, FN 1 (predicted 1); class 1: TP 1, FP 1, FN 1 (the 255); class 2: TP 1.
    # The 255 prediction is nobody's false positive; the prediction at the void pixel is ignored.
    np.testing.assert_allclose(per_class, [1 / 2, 1 / 3, 1.0])
    assert mean == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_miou_absent_class_is_nan_and_excluded_only_predicted_class_is_zero():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 2], [1, 1]])
    per_class, mean = evaluate.miou(evaluate.confusion_matrix(pred, gt, 4))
    assert per_class[0] == pytest.approx(0.5) and per_class[1] == 1.0
    assert per_class[2] == 0.0  # only predicted: counts, as 0
    assert math.isnan(per_class[3])  # never occurs: NaN, not in the mean
    assert mean == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert math.isnan(evaluate.miou(np.zeros((3, 3)))[1])


def test_confusion_accumulates_and_pixel_accuracy():
    total = np.zeros((3, 4), dtype=np.int64)
    evaluate.add_confusion(total, evaluate.confusion_matrix(np.array([0, 1, 2]), np.array([0, 1, 1]), 3))
    evaluate.add_confusion(total, evaluate.confusion_matrix(np.array([255, 2]), np.array([2, 2]), 3))
    per_class, _ = evaluate.miou(total)
    np.testing.assert_allclose(per_class, [1.0, 1 / 2, 1 / 3])
    assert evaluate.pixel_accuracy(total) == pytest.approx(3 / 5)


# --------------------------------------------------------------------------------------------
# 2. Instance-wise mIoU
# --------------------------------------------------------------------------------------------
def test_instance_miou_voc_convention_hand_computed():
    gt1 = np.array([[0, 1, 0, 1],
                    [0, 1, 0, 1],
                    [255, 255, 255, 255],
                    [2, 2, 0, 0]])
    inst1 = np.array([[0, 1, 0, 4],
                      [0, 1, 0, 4],
                      [3, 3, 255, 255],  # id 3 has only void pixels: skipped
                      [2, 2, 0, 0]])
    pred1 = np.array([[0, 1, 1, 1],
                      [0, 1, 0, 255],
                      [2, 2, 2, 2],
                      [2, 0, 0, 0]])
    s1, n1 = evaluate.instance_iou_stats(pred1, gt1, inst1, 3, "voc")
    np.testing.assert_array_equal(n1, [1, 2, 1])  # background region, two class-1 objects, one class-2
    # class 0: TP 5, FN 1, FP 1; class 1: TP 3, FN 1 (the 255), FP 1; class 2: TP 1, FN 1.
    np.testing.assert_allclose(s1, [5 / 7, 2 * 3 / 5, 1 / 2])
    # Second image: class 2 is only predicted (no instance): it must not count for class 2.
    gt2 = np.zeros((2, 2), dtype=np.int64)
    pred2 = np.array([[0, 2], [0, 0]])
    s2, n2 = evaluate.instance_iou_stats(pred2, gt2, np.zeros((2, 2), dtype=np.int64), 3, "voc")
    np.testing.assert_array_equal(n2, [1, 0, 0])
    per_class, mean = evaluate.instance_miou(s1 + s2, n1 + n2)
    np.testing.assert_allclose(per_class, [(5 / 7 + 3 / 4) / 2, 3 / 5, 1 / 2])
    assert mean == pytest.approx(((5 / 7 + 3 / 4) / 2 + 3 / 5 + 1 / 2) / 3)


def test_voc_instance_takes_the_majority_class():
    gt = np.array([[1, 1, 2, 255, 255, 2, 2]])
    inst = np.array([[7, 7, 7, 7, 7, 255, 255]])  # id 7: 2 pixels of class 1, 1 of class 2, void
    # does not vote; id 255 is never an instance, even over labelled pixels
    np.testing.assert_array_equal(evaluate.count_instances(gt, inst, 3, "synthetic"), [0, 1, 0])


def test_cityscapes_instance_encoding():
    import data
    names = list(data.dataset_info("cityscapes").class_names)
    road, sidewalk, person, car = (names.index(n) for n in ("road", "sidewalk", "person", "car"))
    gt = np.array([[road, road, sidewalk, 255, sidewalk, car, car, car, car, person, person, 255]])
    inst = np.array([[7, 7, 8, 0, 8, 26000, 26000, 26001, 26, 24000, 24, 29001]])
    # road 1 and sidewalk 1 (stuff: once, however many regions); car: 26000, 26001 and the
    # group region 26 = 3; person: 24000 and group 24 = 2; caravan (29001) and 0 are void.
    expected = np.zeros(19, dtype=np.int64)
    expected[[road, sidewalk, car, person]] = [1, 1, 3, 2]
    np.testing.assert_array_equal(evaluate.count_instances(gt, inst, 19, "cityscapes"), expected)


def test_without_instance_maps_a_present_class_is_one_instance():
    gt = np.array([[0, 0, 3], [3, 255, 3]])
    np.testing.assert_array_equal(evaluate.count_instances(gt, None, 5, "camvid"), [1, 0, 0, 1, 0])


# --------------------------------------------------------------------------------------------
# 4. End to end: a tiny checkpoint on the synthetic data set, and --pred-dir
# --------------------------------------------------------------------------------------------
def tiny_checkpoint(tmp_path: Path, aaf_logits: tuple | None = None) -> Path:
    import model as model_lib
    import data
    import torch

    info = data.dataset_info("synthetic")
    torch.manual_seed(0)
    net = model_lib.build_model("pspnet", info.num_classes, backbone="tiny")
    with torch.no_grad():  # a classifier with some spread, so that several classes are predicted
        net.classifier.weight.normal_(0, 1.0)
    meta = {**net.meta, "class_names": list(info.class_names), "dataset": "synthetic", "loss": "aaf",
            "kernel_sizes": [3, 5, 7]}
    aaf = None
    if aaf_logits is not None:
        edge, nonedge = (torch.tensor(v, dtype=torch.float32) for v in aaf_logits)
        aaf = {"edge_logits": edge, "nonedge_logits": nonedge}
    path = tmp_path / "tiny.pt"
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta, "step": 0, "aaf": aaf}, path)
    return path


def test_evaluate_end_to_end_and_pred_dir_agree(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path)
    import data
    args = evaluate.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--metric", "all", "--length", "3", "--workers", "0", "--device", "cpu",
         "--save-pred", str(tmp_path / "pred"), "--json", str(tmp_path / "model.json")])
    from_model = evaluate.main(args)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["dataset"] == "synthetic" and saved["num_images"] == 3
    assert set(saved) >= {"iou", "miou", "pixel_acc", "instance_iou", "instance_miou", "boundary"}
    # Literal mIoU from the saved PNGs and the ground truth, one pixel at a time.
    dataset = data.build_dataset("synthetic", None, "val", train=False, length=3)
    num_classes = data.dataset_info("synthetic").num_classes
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for index in range(3):
        sample = dataset[index]
        pred = np.array(data.read_label(tmp_path / "pred" / f"{sample['name']}.png")).ravel()
        gt = np.asarray(sample["label"]).ravel()
        for p, g in zip(pred.tolist(), gt.tolist()):
            if g >= num_classes:
                continue
            if p == g:
                tp[g] += 1
            else:
                fn[g] += 1
                fp[p] += 1
    occurs = tp + fp + fn > 0
    expected_iou = tp[occurs] / (tp + fp + fn)[occurs]
    np.testing.assert_allclose(np.array(from_model["iou"])[occurs], expected_iou)
    assert from_model["miou"] == pytest.approx(expected_iou.mean())
    # --pred-dir gives the same numbers with no model, and workers do not change them.
    args = evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(tmp_path / "pred"), "--dataset", "synthetic", "--metric", "all", "--length", "3",
         "--workers", "2", "--json", str(tmp_path / "pred.json")])
    from_pngs = evaluate.main(args)
    for key in ("iou", "instance_iou", "instance_count", "confusion"):
        np.testing.assert_array_equal(np.array(from_pngs[key], dtype=float), np.array(from_model[key], dtype=float))
    assert from_pngs["boundary"]["counts"] == from_model["boundary"]["counts"]
    assert 0 < from_model["boundary"]["mean_recall"] <= 1


# torchrun: each rank predicts its share (images r, r + 2, ...), the counts are summed.
def run_evaluate(args: list[str], processes: int = 1, logs: Path | None = None) -> subprocess.CompletedProcess:
    """evaluate.py in a fresh process, or `processes` of them under torchrun (CPU, gloo)."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command += ["--log-dir", str(logs), "--redirects", "3"] if logs is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    return subprocess.run(command + [str(ROOT / "evaluate.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_torchrun_two_cpu_processes_give_the_single_process_counts(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path)
    # 5 images: shares of 3 and 2; 9 windows per pass, mirrored too, 4 windows per forward.
    common = ["--ckpt", str(ckpt), "--metric", "all", "--length", "5", "--device", "cpu", "--crop-size", "64",
              "--stride", "48", "--flip", "--window-batch", "4"]
    one = run_evaluate(common + ["--workers", "0", "--save-pred", str(tmp_path / "pred1"),
                                 "--json", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    # --workers 1: the boundary metric's worker pool runs beside the process group.
    two = run_evaluate(common + ["--workers", "1", "--save-pred", str(tmp_path / "pred2"),
                                 "--json", str(tmp_path / "two.json")], processes=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert two.stdout.count("results written to") == 1 and two.stdout.count("pixel accuracy:") == 1  # rank 0 alone
    assert "2 processes" in two.stderr and "Traceback" not in two.stderr
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert a.keys() == b.keys() and b["num_images"] == 5
    assert b["confusion"] == a["confusion"] and sum(map(sum, a["confusion"])) == 5 * 128 * 128 - np.sum(
        [np.sum(np.asarray(s["label"]) == 255) for s in evaluate.data.build_dataset(
            "synthetic", None, "val", train=False, length=5)])  # every valid pixel of the 5 images, once
    assert b["boundary"]["counts"] == a["boundary"]["counts"]
    assert b["biou"]["counts"] == a["biou"]["counts"] and sum(c[1] for c in a["biou"]["counts"]) > 0
    assert b["instance_count"] == a["instance_count"]
    np.testing.assert_allclose(np.array(b["instance_iou"], float), np.array(a["instance_iou"], float), rtol=1e-12)
    for key in ("iou", "miou", "pixel_acc", "settings", "checkpoint", "split", "class_names"):
        assert b[key] == a[key], key
    # --save-pred from both ranks: every image once, the same labels.
    names = sorted(p.name for p in (tmp_path / "pred1").iterdir())
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "pred2").iterdir())
    import data
    for name in names:
        np.testing.assert_array_equal(data.read_label(tmp_path / "pred2" / name), data.read_label(tmp_path / "pred1" / name))


def test_torchrun_a_missing_file_on_one_rank_stops_both_with_one_line(tmp_path: Path):
    import data
    dataset = data.build_dataset("synthetic", None, "val", train=False, length=4)
    preds = tmp_path / "preds"
    preds.mkdir()
    info = data.dataset_info("synthetic")
    for index in (0, 2, 3):  # image 1, rank 1's first, has no prediction
        data.save_label_png(preds / f"{dataset[index]['name']}.png", np.asarray(dataset[index]["label"]) % 8,
                            info.palette)
    logs = tmp_path / "logs"
    done = run_evaluate(["--pred-dir", str(preds), "--dataset", "synthetic", "--length", "4", "--metric", "boundary",
                         "--workers", "1", "--json", str(tmp_path / "r.json")], processes=2, logs=logs)
    assert done.returncode != 0
    (rank0,) = logs.rglob("0/stderr.log")
    (rank1,) = logs.rglob("1/stderr.log")
    assert rank1.read_text().strip() == ""  # rank 0 speaks for the job
    lines = rank0.read_text().strip().splitlines()
    missing = preds / f"{dataset[1]['name']}.png"
    assert lines[-1] == f"evaluate.py: rank 1: no prediction for {dataset[1]['name']}: {missing} is missing", lines
    assert "Traceback" not in rank0.read_text() and not (tmp_path / "r.json").exists()


def test_out_of_memory_while_evaluating_is_one_line(tmp_path: Path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(infer, "predict", out_of_memory)
    args = evaluate.get_args_parser().parse_args(["--ckpt", str(ckpt), "--length", "2", "--workers", "0", "--device",
                                                  "cpu", "--amp", "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as info:
        evaluate.main(args)
    assert str(info.value) == ("evaluate.py: out of memory predicting synthetic_val_000000 with --window-batch "
                               f"{infer.WINDOW_BATCH_CPU} --amp: give a smaller --window-batch")


def test_metric_biou_is_the_literal_count_in_a_row_beside_boundary_prf(tmp_path: Path, capsys):
    """--metric all adds Boundary IoU (docs/metrics.md §4) to the boundary table and the JSON; its
    counts are the authors' erosion construction applied literally, per class, void not counted."""
    import data
    from test_boundary import eroded_band, literal_biou_counts

    ckpt = tiny_checkpoint(tmp_path)
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--metric", "miou", "--length", "2", "--workers", "0", "--device", "cpu",
         "--save-pred", str(tmp_path / "pred"), "--json", str(tmp_path / "model.json")]))
    capsys.readouterr()
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(tmp_path / "pred"), "--dataset", "synthetic", "--metric", "all", "--length", "2",
         "--workers", "2", "--biou-dilation", "0.05", "--json", str(tmp_path / "all.json")]))
    dataset = data.build_dataset("synthetic", None, "val", train=False, length=2)
    num_classes = data.dataset_info("synthetic").num_classes
    expected = sum(literal_biou_counts(np.array(data.read_label(tmp_path / "pred" / f"{dataset[i]['name']}.png")),
                                       np.asarray(dataset[i]["label"]), num_classes, 0.05, band=eroded_band)
                   for i in range(2))
    saved = json.loads((tmp_path / "all.json").read_text())
    assert saved["biou"]["counts"] == expected.tolist() and saved["settings"]["biou_dilation"] == 0.05
    present = expected[:, 1] > 0
    assert present.sum() >= 2
    np.testing.assert_allclose(np.array(result["biou"]["iou"])[present], expected[present, 0] / expected[present, 1])
    assert result["biou"]["mean_iou"] == pytest.approx(np.mean(expected[present, 0] / expected[present, 1]))
    lines = capsys.readouterr().out.splitlines()
    f_row = next(i for i, line in enumerate(lines) if line.startswith("F "))
    assert lines[f_row + 1].startswith("Boundary IoU ")  # the row right below boundary F
    only = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(tmp_path / "pred"), "--dataset", "synthetic", "--metric", "biou", "--length", "2",
         "--workers", "0", "--biou-dilation", "0.05", "--json", str(tmp_path / "biou.json")]))
    assert "boundary" not in only and only["biou"]["counts"] == expected.tolist()


@pytest.mark.parametrize("value", ["0", "-0.1", "1", "nan"])
def test_a_meaningless_biou_dilation_is_one_line(tmp_path: Path, value: str):
    args = evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(tmp_path), "--dataset", "synthetic", "--metric", "biou", "--biou-dilation", value])
    with pytest.raises(SystemExit) as info:
        evaluate.main(args)
    assert str(info.value).startswith(f"evaluate.py: --biou-dilation {float(value)} must be a fraction of the image "
                                      "diagonal in (0, 1) (default 0.02)")


def test_kernels_report_learned_field_sizes(tmp_path: Path, capsys):
    import data
    import losses  # noqa: F401  (the kernels report needs it)
    num_classes = data.dataset_info("synthetic").num_classes
    edge = np.zeros((num_classes, 3))
    edge[1] = [0.0, math.log(3.0), 0.0]  # weights 1/5, 3/5, 1/5 -> 3/5 + 3 + 7/5 = 5.0
    edge[2] = [10.0, -10.0, -10.0]  # almost all 3x3
    nonedge = np.zeros((num_classes, 3))
    ckpt = tiny_checkpoint(tmp_path, (edge.tolist(), nonedge.tolist()))
    result = evaluate.main(evaluate.get_args_parser().parse_args(["--ckpt", str(ckpt), "--metric", "kernels"]))
    assert result["edge"][1] == pytest.approx(5.0, abs=1e-5)
    assert result["edge"][2] == pytest.approx(3.0, abs=1e-3)
    assert result["edge"][0] == pytest.approx(5.0, abs=1e-5)  # uniform over 3, 5, 7
    np.testing.assert_allclose(result["nonedge"], 5.0, atol=1e-5)
    assert "edge" in capsys.readouterr().out
    plain = tiny_checkpoint(tmp_path, None)
    with pytest.raises(SystemExit, match="AAF"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--ckpt", str(plain), "--metric", "kernels"]))


# --------------------------------------------------------------------------------------------
# 5. Flags: meaningless values are one-line errors, never silently replaced (issue 13)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--max-dist", "-1"], "--max-dist -1.0 must be a fraction of the image diagonal in [0, 1)"),
    (["--max-dist", "nan"], "--max-dist nan must be"),
    (["--max-dist", "inf"], "--max-dist inf must be"),
    (["--stride", "0"], "--stride 0 must be >= 1"),
    (["--crop-size", "0"], "--crop-size 0 must be >= 1"),
    (["--crop-size", "-8"], "--crop-size -8 must be >= 1"),
    (["--length", "0"], "--length 0 must be >= 1"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
    (["--scales", "1", "nan"], "--scales [1.0, nan] must be positive"),
    (["--window-batch", "0"], "--window-batch 0 must be >= 1"),
])
def test_meaningless_flag_values_are_refused_before_any_work(tmp_path: Path, flags, message):
    ckpt = tiny_checkpoint(tmp_path)
    args = evaluate.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--metric", "all", "--length", "1", "--workers", "0", "--device", "cpu",
         "--json", str(tmp_path / "r.json"), *flags])
    with pytest.raises(SystemExit) as info:
        evaluate.main(args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flags", [["--scales", "0.5", "1"], ["--no-flip"], ["--crop-size", "64"],
                                   ["--stride", "32"], ["--save-pred", "elsewhere"], ["--window-batch", "4"],
                                   ["--amp"]])
def test_prediction_flags_with_pred_dir_are_refused_not_ignored(tmp_path: Path, flags):
    """Saved PNGs are scored as they are: a window, scale or flip flag beside --pred-dir would change
    nothing, so it is an error naming the flag rather than a silently ignored setting."""
    args = evaluate.get_args_parser().parse_args(
        ["--pred-dir", str(tmp_path), "--dataset", "synthetic", "--length", "1", "--workers", "0", *flags])
    with pytest.raises(SystemExit) as info:
        evaluate.main(args)
    assert flags[0].replace("--no-", "--") in str(info.value) and "--pred-dir scores saved label PNGs" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_pred_format_beside_ckpt_is_refused_not_ignored(tmp_path: Path):
    args = evaluate.get_args_parser().parse_args(["--ckpt", str(tmp_path / "any.pt"), "--pred-format", "voc"])
    with pytest.raises(SystemExit, match=r"--pred-format voc describes a --pred-dir folder"):
        evaluate.main(args)


def test_a_stride_beyond_the_crop_is_refused_and_none_means_the_data_sets_window():
    import data
    info = data.dataset_info("synthetic")
    assert infer.resolve_window(None, None, info) == (info.eval_crop, info.eval_stride)
    assert infer.resolve_window(160, None, info) == (160, info.eval_stride)
    assert infer.resolve_window(None, 5, info) == (info.eval_crop, 5)
    with pytest.raises(ValueError, match="--stride 200 must be in 1..crop size"):
        infer.resolve_window(None, 200, info)
    with pytest.raises(ValueError, match="the data set's stride 96 must be in 1..crop size .64.*give --stride"):
        infer.resolve_window(64, None, info)
    with pytest.raises(ValueError, match="--crop-size 0"):
        evaluate.evaluate_model(torch.nn.Conv2d(3, 8, 1), [], "synthetic", crop_size=0)


def test_bad_max_dist_is_one_line_from_the_command_line(tmp_path: Path):
    # Today's failure: the boundary worker processes died with a 44-line traceback.
    ckpt = tiny_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(ckpt), "--metric", "boundary",
                          "--length", "1", "--workers", "1", "--device", "cpu", "--max-dist", "nan",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "evaluate.py: --max-dist nan must be a fraction of the image diagonal in [0, 1) (default 0.0075)"]


def test_every_flag_has_help_that_states_its_default():
    for action in evaluate.get_args_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, f"{action.option_strings} has no help stating its default"


def test_every_optional_flag_of_experiments_and_bench_states_its_default():
    import argparse
    import bench
    import experiments

    for script in (experiments, bench):
        for action in script.get_args_parser()._actions:
            if action.dest == "help" or action.help == argparse.SUPPRESS or not action.option_strings:
                continue  # positional arguments are required: they have no default
            assert action.help and "default" in action.help, \
                f"{script.__name__}.py {action.option_strings} has no help stating its default"


# --------------------------------------------------------------------------------------------
# 6. Outputs: checked before any work, never over the data set or the checkpoint, written atomically
# --------------------------------------------------------------------------------------------
def tiny_folder_set(root: Path) -> tuple[Path, dict[Path, bytes]]:
    """A 3-class folder data set with two 16x24 val images (PNG) and instance maps, and a
    checkpoint for its classes; returns the checkpoint and every data set file's bytes."""
    import model as model_lib
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("bg\nthing\nother\n255 ignore\n")
    for kind in ("images", "labels", "instances"):
        (root / kind / "val").mkdir(parents=True)
    for name in ("im0", "im1"):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (16, 24)).astype(np.uint8)).save(root / "labels" / "val" / f"{name}.png")
        Image.fromarray(np.ones((16, 24), np.uint8)).save(root / "instances" / "val" / f"{name}.png")
    net = model_lib.build_model("fcn", 3, backbone="tiny")
    meta = {**net.meta, "dataset": "folder", "class_names": ["bg", "thing", "other"],
            "palette": [[0, 0, 0], [255, 255, 0], [0, 0, 255]], "loss": "ce", "kernel_sizes": []}
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": meta}, root.parent / "folder.pt")
    return root.parent / "folder.pt", {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["labels", "images", "instances"])
def test_save_pred_into_the_data_sets_own_folders_is_refused(tmp_path: Path, kind: str):
    """--save-pred <root>/labels/val overwrote the ground truth (and then scored 100%), exit 0."""
    root = tmp_path / "set"
    ckpt, files = tiny_folder_set(root)
    argv = ["--ckpt", str(ckpt), "--dataset", "folder", "--data-root", str(root), "--workers", "0",
            "--device", "cpu", "--crop-size", "16", "--stride", "16", "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as info:
        evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--save-pred", str(root / kind / "val")]))
    assert str(info.value) == (f"evaluate.py: --save-pred {root / kind / 'val'} would overwrite "
                               f"{root / kind / 'val' / 'im0.png'}, a file of the folder val split; write the "
                               f"predictions to a folder of their own")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    assert not (tmp_path / "r.json").exists()
    # A folder of their own (even inside the data root) is fine.
    evaluate.main(evaluate.get_args_parser().parse_args(argv + ["--save-pred", str(root / "preds")]))
    assert sorted(p.name for p in (root / "preds").iterdir()) == ["im0.png", "im1.png"]


def test_the_results_file_is_replaced_atomically(tmp_path: Path):
    """A full disk while writing the JSON used to leave a truncated file in place of the earlier
    result. RLIMIT_FSIZE makes the write fail (EFBIG) as a full disk would (ENOSPC)."""
    import resource

    path = tmp_path / "eval.json"
    checkpoint.write_json({"miou": 0.5, "iou": [0.5] * 4}, path)
    before = path.read_bytes()
    big = {"miou": 0.25, "iou": [0.25] * 2000}  # about 14 kB of JSON
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            checkpoint.write_json(big, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before and json.loads(before)["miou"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary file left
    checkpoint.write_json(big, path)
    assert json.loads(path.read_text())["iou"] == [0.25] * 2000


def test_a_failed_results_write_is_one_line_that_keeps_the_old_file(tmp_path: Path, monkeypatch, capsys):
    """The results of a whole evaluation are printed, and an earlier results file of that name is
    left as it was, when the disk is full at the write (os.fsync failing, as it does then)."""
    import errno
    import os

    ckpt = tiny_checkpoint(tmp_path)
    results = tmp_path / "r.json"
    results.write_text('{"miou": 0.5}\n')

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as info:
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--ckpt", str(ckpt), "--length", "1", "--workers", "0", "--device", "cpu", "--json", str(results)]))
    assert str(info.value) == (f"evaluate.py: cannot write {results}: No space left on device (the disk may be full; "
                               f"the previous file is unchanged); the results are printed above")
    assert "mIoU" in capsys.readouterr().out
    assert results.read_text() == '{"miou": 0.5}\n'
    assert not list(tmp_path.glob(".r.json.*.tmp"))


@pytest.mark.parametrize("flags, message", [
    (["--json", "{tmp}"], "--json {tmp} is a folder; expected a file name"),
    (["--json", "{tmp}/notes.txt/r.json"], "--json {tmp}/notes.txt/r.json: {tmp}/notes.txt is a file, so nothing can be created below it"),
    (["--save-pred", "{tmp}/notes.txt"], "--save-pred {tmp}/notes.txt is a file; expected a folder (it is created if missing)"),
    (["--save-pred", "{tmp}/notes.txt/pred"], "--save-pred {tmp}/notes.txt/pred: {tmp}/notes.txt is a file"),
    (["--json", "{tmp}/tiny.pt"], "--json {tmp}/tiny.pt is the checkpoint --ckpt; choose another file"),
    (["--json", ""], "--json is empty"),
    (["--save-pred", ""], "--save-pred is empty"),
    (["--data-root", ""], "--data-root is empty"),
    (["--dataset", ""], "--dataset is empty"),
    (["--split", ""], "--split is empty"),
])
def test_unusable_output_paths_and_empty_flags_are_refused_before_any_work(tmp_path: Path, monkeypatch, flags, message):
    """A --json folder or a path below a file was a traceback after the whole evaluation; `--json ""`
    silently wrote to the default file."""
    ckpt = tiny_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    before = ckpt.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran before the paths were checked")

    monkeypatch.setattr(evaluate, "evaluate_model", no_work)
    argv = ["--ckpt", str(ckpt), "--length", "1", "--workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        evaluate.main(evaluate.get_args_parser().parse_args(argv + [f.replace("{tmp}", str(tmp_path)) for f in flags]))
    assert str(info.value).startswith("evaluate.py: " + message.replace("{tmp}", str(tmp_path)))
    assert "\n" not in str(info.value) and ckpt.read_bytes() == before


@pytest.mark.parametrize("flag", ["--ckpt", "--pred-dir"])
def test_an_empty_model_or_prediction_path_is_refused(tmp_path: Path, flag: str):
    argv = [flag, "", "--dataset", "synthetic", "--length", "1", "--workers", "0"]
    with pytest.raises(SystemExit) as info:
        evaluate.main(evaluate.get_args_parser().parse_args(argv))
    assert str(info.value) == f"evaluate.py: {flag} is empty"


def test_a_full_disk_under_save_pred_is_one_line(tmp_path: Path, monkeypatch):
    """A failed --save-pred write (a full disk, say) was a traceback out of the scoring loop."""
    root = tmp_path / "set"
    ckpt, _ = tiny_folder_set(root)

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate.data, "save_label_png", full_disk)
    argv = ["--ckpt", str(ckpt), "--dataset", "folder", "--data-root", str(root), "--workers", "0", "--device",
            "cpu", "--crop-size", "16", "--stride", "16", "--save-pred", str(tmp_path / "preds")]
    with pytest.raises(SystemExit) as info:
        evaluate.main(evaluate.get_args_parser().parse_args(argv))
    message = str(info.value)
    assert message.startswith(f"evaluate.py: --save-pred cannot write {tmp_path / 'preds'}/im")
    assert message.endswith("(No space left on device); the evaluation stopped at that image, before any score")
    assert "\n" not in message


def test_the_results_record_whether_the_network_ran_in_bf16(tmp_path: Path):
    """--amp changes predictions slightly: the JSON's settings say which run it was."""
    ckpt = tiny_checkpoint(tmp_path)
    for amp in (False, True):
        args = evaluate.get_args_parser().parse_args(
            ["--ckpt", str(ckpt), "--length", "1", "--workers", "0", "--device", "cpu",
             "--json", str(tmp_path / f"{amp}.json")] + (["--amp"] if amp else []))
        evaluate.main(args)
        assert json.loads((tmp_path / f"{amp}.json").read_text())["settings"]["amp"] is amp
