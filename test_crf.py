"""Tests of crf.py (the dense CRF baseline of the paper's Table 6) and of `--crf` in evaluate.py
and infer.py. CPU only, tiny images and a tiny network; pydensecrf2 is a requirement.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crf
import data
import evaluate
import infer
import model as model_lib
import synthetic
from test_evaluate import tiny_checkpoint  # a tiny synthetic PSPNet checkpoint

ROOT = Path(__file__).resolve().parent
LEFT, RIGHT = (190, 60, 50), (50, 70, 180)  # the two colours of the edge images


def edge_image(height: int, width: int, edge: int, seed: int = 0) -> np.ndarray:
    """[H, W, 3] uint8: colour LEFT for x < edge, RIGHT from x = edge on, with pixel noise."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.float64)
    rgb[:, :edge] = LEFT
    rgb[:, edge:] = RIGHT
    rgb += rng.normal(0, 2, rgb.shape)  # camera-like noise, below the colour std 3
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def blurred_two_class_probs(height: int, width: int, boundary: float, softness: float) -> np.ndarray:
    """[2, H, W] float32: class 1 rises smoothly across columns, P1 = 1/2 at x = boundary
    (a network's blurred boundary in the wrong place)."""
    x = np.arange(width, dtype=np.float64)
    p1 = 1 / (1 + np.exp(-(x - boundary) / softness))
    p1 = np.broadcast_to(p1, (height, width))
    return np.stack([1 - p1, p1]).astype(np.float32)


def boundary_column(labels: np.ndarray) -> int | None:
    """x of the first class-1 column when every row is 0 ... 0 1 ... 1 changing there, else None."""
    first = labels.argmax(axis=1)  # first 1 in each row (0 if none)
    x = int(first[0])
    expected = np.arange(labels.shape[1])[None, :] >= x
    return x if np.array_equal(labels, np.broadcast_to(expected, labels.shape).astype(labels.dtype)) else None


# --------------------------------------------------------------------------------------------
# The CRF itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network_boundary", [13.5, 26.5])  # 6 px left / right of the colour edge
def test_crf_moves_a_blurred_boundary_onto_the_colour_edge(network_boundary: float):
    height, width, edge = 24, 40, 20
    rgb = edge_image(height, width, edge)
    probs = blurred_two_class_probs(height, width, network_boundary, softness=3.0)
    raw = boundary_column(probs.argmax(axis=0))
    assert raw == math.ceil(network_boundary)  # the network's boundary, 6 px off the edge
    q = crf.dense_crf(probs, rgb, crf.default_params("voc"))
    assert boundary_column(q.argmax(axis=0)) == edge  # straight, on the edge, in every row
    # The iteration count is honoured: one mean-field step has not converged that far.
    one_step = crf.dense_crf(probs, rgb, dataclasses.replace(crf.default_params("voc"), iters=1))
    assert np.abs(one_step - q).max() > 0.05
    # Without the colour (bilateral) kernel nothing pulls the boundary to the edge: it stays put.
    smooth_only = crf.dense_crf(probs, rgb, crf.CRFParams(10, 3.0, 1.0, 0.0, 67.0, 3.0))
    assert abs(boundary_column(smooth_only.argmax(axis=0)) - raw) <= 1


def test_unary_only_crf_returns_the_argmax_and_the_normalised_input():
    rng = np.random.default_rng(1)
    probs = rng.random((5, 7, 11)).astype(np.float32) + 0.01  # C, H, W all differ; not normalised
    rgb = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    unary_only = crf.CRFParams(iters=5, pos_w=0.0, pos_xy=1.0, bi_w=0.0, bi_xy=67.0, bi_rgb=3.0)
    q = crf.dense_crf(probs, rgb, unary_only)
    np.testing.assert_array_equal(q.argmax(axis=0), probs.argmax(axis=0))
    # Mean field without pairwise terms is softmax(-unary) = P / sum P, pixel by pixel.
    np.testing.assert_allclose(q, probs / probs.sum(axis=0, keepdims=True), atol=1e-5)
    # A torch input (the output of infer.predict) gives the same, as a tensor via refine().
    refined = crf.refine(torch.from_numpy(probs), rgb, unary_only)
    assert isinstance(refined, torch.Tensor) and refined.dtype == torch.float32
    np.testing.assert_array_equal(refined.numpy(), q)


@pytest.mark.parametrize("height,width,classes", [(1, 1, 3), (1, 9, 2), (9, 1, 4), (7, 5, 3), (2, 3, 1), (13, 17, 6)])
def test_every_image_size_gives_a_valid_label_map_also_from_non_contiguous_inputs(height, width, classes):
    rng = np.random.default_rng(height * 100 + width)
    wide = np.ascontiguousarray(rng.dirichlet(np.ones(classes), size=(height, 2 * width)).astype(np.float32)
                                .transpose(2, 0, 1))  # [C, H, 2W]
    probs = wide[:, :, ::2]  # [C, H, W], every other column: a strided view
    view = torch.from_numpy(wide)[:, :, ::2]  # the same as a strided torch tensor
    rgb = rng.integers(0, 256, (height, 2 * width, 3), dtype=np.uint8)[:, ::2]  # [H, W, 3], strided
    if height * width > 1:  # (a 1x1 view is contiguous whatever its strides)
        assert not probs.flags.c_contiguous and not rgb.flags.c_contiguous and not view.is_contiguous()
    params = crf.default_params("voc")
    q = crf.dense_crf(probs, rgb, params)
    assert q.shape == (classes, height, width) and q.dtype == np.float32
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-4)
    labels = q.argmax(axis=0)
    assert labels.shape == (height, width) and labels.min() >= 0 and labels.max() < classes
    # The strides are read correctly: contiguous copies give the same marginals, bit for bit.
    np.testing.assert_array_equal(q, crf.dense_crf(np.ascontiguousarray(probs), np.ascontiguousarray(rgb), params))
    np.testing.assert_array_equal(crf.refine(view, rgb, params).numpy(), q)


def test_bad_inputs_are_one_line_errors():
    probs = np.full((2, 4, 5), 0.5, np.float32)
    params = crf.default_params("voc")
    with pytest.raises(ValueError, match=r"uint8 \[4, 5, 3\]"):
        crf.dense_crf(probs, np.zeros((5, 4, 3), np.uint8), params)  # transposed image
    with pytest.raises(ValueError, match="uint8"):
        crf.dense_crf(probs, np.zeros((4, 5, 3), np.float32), params)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        crf.dense_crf(probs[0], np.zeros((4, 5, 3), np.uint8), params)
    bad = probs.copy()
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        crf.dense_crf(bad, np.zeros((4, 5, 3), np.uint8), params)


def test_defaults_per_data_set_and_help_cite_deeplab():
    voc = crf.default_params("voc")
    assert (voc.iters, voc.pos_w, voc.pos_xy, voc.bi_w, voc.bi_xy, voc.bi_rgb) == (10, 3, 1, 4, 67, 3)
    for name in data.DATASETS:  # every data set has a setting (the others fall back to DEFAULT_PARAMS)
        assert isinstance(crf.default_params(name), crf.CRFParams)
    text = evaluate.get_args_parser().format_help()
    assert "DeepLab v2" in text and "pip install pydensecrf2" in text
    for flag in ("--crf-iters", "--crf-pos-w", "--crf-pos-xy", "--crf-bi-w", "--crf-bi-xy", "--crf-bi-rgb"):
        assert flag in text and flag in infer.get_args_parser().format_help()


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------
def test_flags_override_the_data_set_defaults():
    args = evaluate.get_args_parser().parse_args(
        ["--pred-dir", "x", "--crf", "--crf-iters", "3", "--crf-bi-xy", "80", "--crf-pos-w", "0"])
    assert crf.arg_problems(args) == []
    params = crf.params_from_args(args, "cityscapes")
    base = crf.default_params("cityscapes")
    assert params == crf.CRFParams(iters=3, pos_w=0.0, pos_xy=base.pos_xy, bi_w=base.bi_w, bi_xy=80.0,
                                   bi_rgb=base.bi_rgb)
    assert crf.params_from_args(evaluate.get_args_parser().parse_args([]), "voc") is None  # no --crf


@pytest.mark.parametrize("flags,message", [
    (["--crf", "--crf-iters", "0"], "--crf-iters 0 must be >= 1"),
    (["--crf", "--crf-bi-xy", "-5"], "--crf-bi-xy -5.0 must be a finite standard deviation > 0"),
    (["--crf", "--crf-bi-rgb", "0"], "--crf-bi-rgb 0.0 must be"),
    (["--crf", "--crf-pos-w", "nan"], "--crf-pos-w nan must be a finite weight >= 0"),
    (["--crf-iters", "5"], "--crf-iters only apply with --crf"),
])
def test_meaningless_crf_flags_are_refused_in_one_line(tmp_path: Path, flags, message):
    ckpt = tiny_checkpoint(tmp_path)
    for script, extra in ((evaluate, ["--length", "1", "--workers", "0"]),
                          (infer, ["--input", str(tmp_path), "--out", str(tmp_path / "out")])):
        args = script.get_args_parser().parse_args(["--ckpt", str(ckpt), "--device", "cpu", *extra, *flags])
        with pytest.raises(SystemExit, match=re.escape(message)) as info:
            script.main(args)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_crf_with_pred_dir_is_refused(tmp_path: Path):
    args = evaluate.get_args_parser().parse_args(["--pred-dir", str(tmp_path), "--dataset", "synthetic", "--crf"])
    with pytest.raises(SystemExit, match="needs --ckpt"):
        evaluate.main(args)


# --------------------------------------------------------------------------------------------
# End to end: --crf in evaluate.py and infer.py on a tiny network
# --------------------------------------------------------------------------------------------
def test_evaluate_crf_end_to_end(tmp_path: Path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path)
    seen = []
    original = crf.refine
    monkeypatch.setattr(crf, "refine", lambda probs, rgb, params: seen.append(params) or original(probs, rgb, params))
    common = ["--ckpt", str(ckpt), "--metric", "all", "--length", "2", "--workers", "0", "--device", "cpu"]
    plain = evaluate.main(evaluate.get_args_parser().parse_args(
        common + ["--save-pred", str(tmp_path / "plain"), "--json", str(tmp_path / "plain.json")]))
    assert seen == [] and plain["settings"]["crf"] is None and plain["timing"]["crf_s_per_image"] is None
    with_crf = evaluate.main(evaluate.get_args_parser().parse_args(
        common + ["--crf", "--crf-iters", "4", "--crf-bi-rgb", "10",
                  "--save-pred", str(tmp_path / "crf"), "--json", str(tmp_path / "crf.json")]))
    expected = crf.CRFParams(iters=4, pos_w=3.0, pos_xy=1.0, bi_w=4.0, bi_xy=67.0, bi_rgb=10.0)
    assert seen == [expected, expected]  # the flags reach the CRF, once per image
    saved = json.loads((tmp_path / "crf.json").read_text())
    assert saved["settings"]["crf"] == {"iters": 4, "pos_w": 3.0, "pos_xy": 1.0, "bi_w": 4.0, "bi_xy": 67.0,
                                        "bi_rgb": 10.0}
    assert saved["timing"]["crf_s_per_image"] > 0 and saved["timing"]["network_s_per_image"] > 0
    # The saved labels are argmax(CRF(network probabilities, the scene's own uint8 RGB)).
    net, _ = model_lib.load_checkpoint(ckpt)
    info = data.dataset_info("synthetic")
    dataset = data.build_dataset("synthetic", None, "val", train=False, length=2)
    changed = 0
    for index in range(2):
        sample = dataset[index]
        rgb, _, _ = synthetic.make_scene(data.SYNTHETIC_SPLIT_SEEDS["val"], index)
        probs = infer.predict(net, sample["image"], info.eval_crop, info.eval_stride)
        want = crf.dense_crf(probs, rgb, expected).argmax(axis=0)
        got = data.read_label(tmp_path / "crf" / f"{sample['name']}.png")
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(data.read_label(tmp_path / "plain" / f"{sample['name']}.png"),
                                      probs.argmax(dim=0).numpy())
        changed += int((got != probs.argmax(dim=0).numpy()).sum())
    assert changed > 0  # the CRF did something
    assert with_crf["miou"] != plain["miou"]
    # Without --json, a CRF run writes its own file beside the checkpoint, never over the plain run's.
    for flags in ([], ["--crf"]):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--ckpt", str(ckpt), "--length", "1", "--workers", "0", "--device", "cpu", *flags]))
    assert json.loads((tmp_path / "eval_synthetic_val_miou.json").read_text())["settings"]["crf"] is None
    assert json.loads((tmp_path / "eval_synthetic_val_miou_crf.json").read_text())["settings"]["crf"] is not None


def test_infer_crf_end_to_end(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    rgb, _, _ = synthetic.make_scene(7, 0, size=(45, 61))  # odd sizes, not multiples of 8
    Image.fromarray(rgb).save(folder / "scene.png")
    infer.main(infer.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu",
         "--crf", "--crf-iters", "5"]))
    net, _ = model_lib.load_checkpoint(ckpt)
    info = data.dataset_info("synthetic")
    probs = infer.predict(net, torch.from_numpy(data.normalize(rgb, info.mean, info.std)), info.eval_crop,
                          info.eval_stride)
    params = crf.CRFParams(5, *[getattr(crf.default_params("synthetic"), f) for f in crf.FIELDS[1:]])
    want = crf.dense_crf(probs, rgb, params).argmax(axis=0)
    got = data.read_label(tmp_path / "out" / "scene.png")
    np.testing.assert_array_equal(got, want)
    assert (got != probs.argmax(dim=0).numpy()).any()


# --------------------------------------------------------------------------------------------
# The package is optional at import time and named when missing
# --------------------------------------------------------------------------------------------
def test_missing_package_is_one_line_naming_it(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # `import pydensecrf...` now fails
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(SystemExit, match="pip install pydensecrf2") as info:
        crf.load_densecrf()
    assert "\n" not in str(info.value)
    ckpt = tiny_checkpoint(tmp_path)
    args = evaluate.get_args_parser().parse_args(["--ckpt", str(ckpt), "--crf", "--length", "1", "--workers", "0",
                                                  "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="pip install pydensecrf2"):
        evaluate.main(args)
    assert not (tmp_path / "r.json").exists()  # stopped before evaluating
    with pytest.raises(SystemExit, match="pip install pydensecrf2"):
        crf.dense_crf(np.ones((2, 3, 3), np.float32), np.zeros((3, 3, 3), np.uint8), crf.default_params("voc"))
    # Without --crf nothing needs the package.
    args = evaluate.get_args_parser().parse_args(["--ckpt", str(ckpt), "--length", "1", "--workers", "0",
                                                  "--json", str(tmp_path / "r.json")])
    assert evaluate.main(args)["num_images"] == 1


def test_no_module_imports_the_package_at_import_time():
    # Module-level statements only: the one import of pydensecrf sits inside crf.load_densecrf.
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else ():
                names = ([a.name for a in sub.names] if isinstance(sub, ast.Import)
                         else [sub.module or ""] if isinstance(sub, ast.ImportFrom) else [])
                assert not any(n.startswith("pydensecrf") for n in names), f"{path.name} imports pydensecrf at import time"
    assert "import pydensecrf.densecrf" in ast.get_source_segment(
        (ROOT / "crf.py").read_text(), next(n for n in ast.parse((ROOT / "crf.py").read_text()).body
                                           if isinstance(n, ast.FunctionDef) and n.name == "load_densecrf"))


# --------------------------------------------------------------------------------------------
# experiments.py: the Table-6 comparison from finished runs
# --------------------------------------------------------------------------------------------
def fake_result(miou: float, recall: float, precision: float, network_s: float, crf_s: float | None) -> dict:
    return {"miou": miou, "boundary": {"mean_recall": recall, "mean_precision": precision}, "split": "val",
            "timing": {"network_s_per_image": network_s, "crf_s_per_image": crf_s},
            "settings": {"crf": None if crf_s is None else dataclasses.asdict(crf.default_params("synthetic"))}}


def test_experiments_table6_puts_ce_crf_affinity_aaf_side_by_side(tmp_path: Path):
    import experiments

    out = tmp_path / "runs"
    assert experiments.crf_report("synthetic", out, tmp_path / "results") is None  # nothing scored with the CRF yet
    values = {"ce": [(0.40, 0.16, 0.50, 0.010), (0.42, 0.18, 0.52, 0.012)],
              "affinity": [(0.43, 0.21, 0.49, 0.011), (0.43, 0.21, 0.49, 0.011)],
              "aaf": [(0.44, 0.20, 0.50, 0.013), (0.46, 0.22, 0.50, 0.013)]}
    for method, per_seed in values.items():
        for seed, (miou, recall, precision, seconds) in enumerate(per_seed):
            folder = out / "synthetic" / f"{method}_seed{seed}"
            folder.mkdir(parents=True)
            (folder / "eval.json").write_text(json.dumps(fake_result(miou, recall, precision, seconds, None)))
    for seed, (miou, crf_s) in enumerate([(0.39, 0.5), (0.41, 0.7)]):
        result = fake_result(miou, 0.10, 0.60, 0.011, crf_s)
        result["eval_command"] = (f"python evaluate.py --ckpt {experiments.ROOT}/runs/evidence/synthetic/ce_seed{seed}"
                                  "/model.pt --metric all --crf --json x")
        (out / "synthetic" / f"ce_seed{seed}" / "crf.json").write_text(json.dumps(result))
    text = experiments.crf_report("synthetic", out, tmp_path / "results")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["cross-entropy"] == "| cross-entropy | 2 | 41.0 ± 1.4 | 17.0 ± 1.4 | 51.0 ± 1.4 | 0.011 ± 0.001 | 0 |"
    assert rows["cross-entropy + dense CRF"] == ("| cross-entropy + dense CRF | 2 | 40.0 ± 1.4 | 10.0 ± 0.0 "
                                                 "| 60.0 ± 0.0 | 0.011 ± 0.000 | 0.600 ± 0.141 |")
    assert rows["Affinity (3x3)"].startswith("| Affinity (3x3) | 2 | 43.0 ± 0.0 | 21.0 ± 0.0 |")
    assert rows["AAF"].startswith("| AAF | 2 | 45.0 ± 1.4 | 21.0 ± 1.4 |")
    assert "python evaluate.py --ckpt runs/evidence/synthetic/ce_seedS/model.pt --metric all --crf" in text
    assert (tmp_path / "results" / "synthetic_crf.md").read_text() == text
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- results:crf-synthetic -->\nplaceholder\n<!-- /results:crf-synthetic -->\ntail\n")
    experiments.update_readme("crf-synthetic", text, readme)
    assert readme.read_text() == f"head\n<!-- results:crf-synthetic -->\n{text}<!-- /results:crf-synthetic -->\ntail\n"
