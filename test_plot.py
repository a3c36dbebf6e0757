"""Tests of plot.py: every command writes a PNG from real inputs (a 3-iteration AAF run, evaluate.py
results on 2 images), and the numbers behind the figures are checked against hand values.

CPU only, tiny inputs. The figures themselves were looked at by eye when the commands were written;
here a PNG must decode to an image of a plausible size with more than a blank page in it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import plot
import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 3-iteration AAF run (log.jsonl, model.pt) and two evaluate.py result JSONs."""
    folder = tmp_path_factory.mktemp("plot")
    out = folder / "aaf_run"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "synthetic", "--crop-size", "48", "--batch-size", "2", "--iters", "3", "--log-every", "1",
         "--loss", "aaf", "--no-eval", "--out", str(out)]))
    paths = {"log": out / "log.jsonl", "ckpt": out / "model.pt", "first": folder / "first.json",
             "second": folder / "second.json"}
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--ckpt", str(out / "model.pt"), "--metric", "all", "--length", "2", "--workers", "0", "--device", "cpu",
         "--json", str(paths["first"])]))
    second = json.loads(paths["first"].read_text())  # a second "method": other IoUs
    second["iou"] = [None if v is None else v / 2 for v in second["iou"]]
    paths["second"].write_text(json.dumps(second))
    # experiments.py's layout: method -> one result per seed (here the same run twice, with a
    # learned-field entry as experiments.py writes it for AAF).
    edge, nonedge = evaluate.kernel_sizes_of_checkpoint(torch.load(out / "model.pt", weights_only=True))
    result = json.loads(paths["first"].read_text())
    aaf = {**result, "kernel_sizes": {"edge": edge.tolist(), "nonedge": nonedge.tolist(), "sizes": [3, 5, 7]}}
    paths["experiments"] = folder / "experiments.json"
    paths["experiments"].write_text(json.dumps({"ce": [result, result], "aaf": [aaf, aaf]}))
    return paths


def check_png(path: Path, min_width: int = 400) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.array(im.convert("RGB"))
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= 200
    assert (pixels < 250).any(axis=2).mean() > 0.01  # something is drawn on the white page
    return pixels


def plot_main(*argv: str) -> Path:
    return plot.main(plot.get_args_parser().parse_args(list(argv)))


def test_every_command_writes_a_png(run, tmp_path):
    out = tmp_path / "figures"
    check_png(plot_main("curves", str(run["log"]), str(run["log"]), "--labels", "a", "b",
                        "--out", str(out / "curves.png")))
    check_png(plot_main("classes", str(run["first"]), str(run["second"]), "--thin", "pole", "sign",
                        "--out", str(out / "classes.png")))
    check_png(plot_main("classes", str(run["experiments"]), "--select", "aaf", "ce", "--labels", "AAF", "CE",
                        "--metrics", "iou", "instance_iou", "f", "--out", str(out / "classes_seeds.png")))
    check_png(plot_main("fields", str(run["ckpt"]), "--out", str(out / "fields.png")))
    check_png(plot_main("fields", str(run["experiments"]), "--out", str(out / "fields_json.png")))
    check_png(plot_main("confusion", str(run["first"]), str(run["experiments"]), "--select", "ce",
                        "--out", str(out / "confusion.png")))
    grid = check_png(plot_main("grid", "--ckpt", str(run["ckpt"]), str(run["ckpt"]), "--labels", "x", "y",
                               "--indices", "1", "0", "--out", str(out / "grid.png")))
    assert grid.shape[1] > grid.shape[0]  # two rows of four square panels


def test_curves_take_the_last_record_of_a_step_and_skip_evaluations(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": 2, "iters": 4, "loss": {"ce": 1.0, "total": 1.0}, "lr": 0.1, "images_per_s": 5.0},
            {"eval": "val", "miou": 0.3},
            {"step": 1, "iters": 4, "loss": {"ce": 2.0, "total": 2.0}, "lr": 0.2, "images_per_s": 5.0},
            {"step": 2, "iters": 4, "loss": {"ce": 0.5, "total": 0.5}, "lr": 0.1, "images_per_s": 6.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = plot.read_log(log)
    assert [(r["step"], r["loss"]["ce"]) for r in records] == [(1, 2.0), (2, 0.5)]
    log.write_text('{"eval": "val", "miou": 0.3}\n')
    with pytest.raises(SystemExit, match="no training records"):
        plot.read_log(log)


def test_per_class_mean_and_sample_std_over_seeds():
    results = [{"class_names": ["a", "b", "c"], "iou": [0.2, None, 0.5], "boundary": {"recall": [0.1, 0.3, 0.0]}},
               {"class_names": ["a", "b", "c"], "iou": [0.4, None, 0.9], "boundary": {"recall": [0.3, 0.3, 0.2]}}]
    mean, std = plot.per_class(results, "iou")
    np.testing.assert_allclose(mean[[0, 2]], [0.3, 0.7])
    assert math.isnan(mean[1])  # a class that never occurs has no bar
    np.testing.assert_allclose(std, [math.sqrt(0.02), 0.0, math.sqrt(0.08)])  # ddof 1: (0.1^2 * 2) / 1
    mean, _ = plot.per_class(results, "recall")
    np.testing.assert_allclose(mean, [0.2, 0.3, 0.1])


def test_confusion_rows_are_normalised_and_summed_over_seeds():
    first = {"confusion": [[3, 1, 0], [0, 0, 0]]}  # [C, C + 1]: class 1 never in the ground truth
    second = {"confusion": [[1, 1, 2], [2, 2, 0]]}  # 2 pixels of class 0 predicted as no class
    matrix, extra = plot.row_normalised([first, second])
    assert extra
    np.testing.assert_allclose(matrix[0], [4 / 8, 2 / 8, 2 / 8])
    np.testing.assert_allclose(matrix[1], [2 / 4, 2 / 4, 0])
    matrix, extra = plot.row_normalised([{"confusion": [[1, 3, 0], [0, 0, 0]]}])
    assert not extra and matrix.shape == (2, 2)
    np.testing.assert_allclose(matrix[0], [0.25, 0.75])
    assert np.isnan(matrix[1]).all()


def test_series_from_both_json_layouts_and_bad_inputs(run, tmp_path):
    series = plot.load_series([str(run["first"]), str(run["experiments"])])
    assert [(label, len(results)) for label, results in series] == [("first", 1), ("ce", 2), ("aaf", 2)]
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    for args, message in (([str(bad)], "neither an evaluate.py result"),
                          ([str(tmp_path / "missing.json")], "does not exist"),
                          ([str(run["experiments"]), "--select", "gan"], "has no gan")):
        with pytest.raises(SystemExit, match=message):
            plot_main("classes", *args, "--out", str(tmp_path / "x.png"))
    with pytest.raises(SystemExit, match="--thin nope: no such class"):
        plot_main("classes", str(run["first"]), "--thin", "nope", "--out", str(tmp_path / "x.png"))
    with pytest.raises(SystemExit, match="outside the 2 images"):
        plot.plot_grid([str(run["ckpt"])], None, None, None, None, [5], tmp_path / "x.png", length=2)


def test_without_matplotlib_one_line_says_what_to_install(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot_main("curves", str(run["log"]), "--out", str(tmp_path / "x.png"))


def test_experiments_figures_are_plot_commands_on_the_committed_results(tmp_path):
    import experiments

    args = experiments.get_args_parser().parse_args(["figures", "synthetic", "--out", str(tmp_path)])
    commands = experiments.figure_commands("synthetic", args)
    assert [c[0] for c in commands] == ["classes", "fields", "confusion"]  # no run folders here
    for method in experiments.METHODS:  # with the seed-0 run folders: curves and predictions too
        folder = experiments.run_dir(tmp_path, "synthetic", method, 0)
        folder.mkdir(parents=True)
        (folder / "log.jsonl").write_text("")
        (folder / "model.pt").write_bytes(b"")
    commands = experiments.figure_commands("synthetic", args)
    assert [c[0] for c in commands] == ["classes", "fields", "confusion", "curves", "grid"]
    for argv in commands:
        parsed = plot.get_args_parser().parse_args(argv)
        assert Path(parsed.out).parent == experiments.ROOT / "results" and parsed.out.endswith(".png")
    grid = plot.get_args_parser().parse_args(commands[-1])
    assert grid.indices == list(experiments.EXPERIMENTS["synthetic"]["grid"]) and len(grid.ckpt) == 3
    classes = plot.get_args_parser().parse_args(commands[0])
    assert classes.thin == list(experiments.EXPERIMENTS["synthetic"]["thin"])


def test_unreadable_logs_and_unusable_paths_are_one_line_before_any_work(run, tmp_path):
    """A folder or a binary file as a log was a traceback (IsADirectoryError, UnicodeDecodeError);
    --out below a file was a traceback after the figure was drawn."""
    (tmp_path / "notes.txt").write_text("x")
    for path in (tmp_path, run["ckpt"]):
        with pytest.raises(SystemExit) as info:
            plot.read_log(path)
        assert str(info.value).startswith(f"plot.py: {path} is not a readable text file (")
        assert str(info.value).endswith("expected train.py's log.jsonl") and "\n" not in str(info.value)
    missing = str(tmp_path / "missing.jsonl")  # never read: the --out check comes first
    cases = [
        (["curves", missing, "--out", str(tmp_path / "notes.txt" / "x.png")],
         f"--out {tmp_path / 'notes.txt' / 'x.png'}: {tmp_path / 'notes.txt'} is a file, so nothing can be created below it"),
        (["classes", missing, "--out", str(tmp_path / "x.jpg")], f"--out {tmp_path / 'x.jpg'} should end in .png"),
        (["fields", missing, "--out", ""], "--out is empty"),
        (["curves", "", "--out", str(tmp_path / "x.png")], "a log file is empty"),
        (["confusion", "", "--out", str(tmp_path / "x.png")], "a results file is empty"),
        (["grid", "--ckpt", "", "--out", str(tmp_path / "x.png")], "--ckpt is empty"),
        (["grid", "--ckpt", str(run["ckpt"]), "--data-root", "", "--out", str(tmp_path / "x.png")], "--data-root is empty"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            plot_main(*argv)
        assert str(info.value) == f"plot.py: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_grid_indices_are_judged_against_the_whole_split(run, tmp_path, monkeypatch, capsys):
    """Synthetic val has 200 scenes: -1 was 'outside the 0 images' and 99999 drew a scene beyond
    the split. No scene is drawn before the indices and the device are checked."""
    import data

    drawn = []
    make_scene = data.synthetic.make_scene
    monkeypatch.setattr(data.synthetic, "make_scene", lambda seed, index: drawn.append(index) or make_scene(seed, index))
    size = data.SYNTHETIC_LENGTHS["val"]
    for indices in ([-1], [0, 99999], [size]):
        with pytest.raises(SystemExit) as info:
            plot.plot_grid([str(run["ckpt"])], None, None, None, None, indices, tmp_path / "x.png")
        bad = [i for i in indices if not 0 <= i < size]
        assert str(info.value) == f"plot.py: --indices {bad} outside the {size} images of synthetic val"
    # --device cuda without a GPU is named before a checkpoint is loaded for it (which blamed the file).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        plot.plot_grid([str(run["ckpt"])], None, None, None, None, [1], tmp_path / "x.png", device="cuda")
    assert str(info.value) == "plot.py: --device cuda but no GPU is visible"
    assert drawn == [] and "predicting" not in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
