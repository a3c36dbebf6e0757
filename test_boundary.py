"""Tests of boundary.py: the BSDS boundary metric of the paper's Tables 4 and 8 (docs/metrics.md §3).

Every expected number is either computed by hand in the test or by a literal reference written
here (loops for seg2bdry, skimage.morphology.thin, scipy's min-weight full matching on an
outlier-augmented graph), never by the code under test. CPU only, no data set needed.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial.distance import cdist
from skimage.morphology import thin as skimage_thin

import boundary
import evaluate


# --------------------------------------------------------------------------------------------
# Literal references
# --------------------------------------------------------------------------------------------
def literal_seg2bdry(mask: np.ndarray) -> np.ndarray:
    """docs/metrics.md §3.1 word for word, one pixel at a time."""
    height, width = mask.shape
    out = np.zeros((height, width), dtype=bool)
    for i in range(height):
        for j in range(width):
            if i < height - 1 and j < width - 1:
                block = {mask[i, j], mask[i, j + 1], mask[i + 1, j], mask[i + 1, j + 1]}
                out[i, j] = len(block) > 1
            elif i == height - 1 and j < width - 1:
                out[i, j] = mask[i, j] != mask[i, j + 1]
            elif j == width - 1 and i < height - 1:
                out[i, j] = mask[i, j] != mask[i + 1, j]
    return out


def reference_matching_size(points_gt: np.ndarray, points_pred: np.ndarray, radius: float) -> int:
    """Max one-to-one matching within `radius`, as a min-cost full matching (BSDS objective).

    Rows: n GT pixels, then m "unmatched" partners of the predicted pixels; columns: m predicted
    pixels, then n "unmatched" partners of the GT pixels. Real edge cost 1 + distance; leaving a
    pixel unmatched costs `big`; an unmatched-unmatched edge (cost 1) mirrors every real edge so
    that any real matching extends to a full one. big > all real costs, so the optimum is a
    maximum-cardinality matching (with least total distance among those).
    """
    n, m = len(points_gt), len(points_pred)
    if n == 0 or m == 0:
        return 0
    dist = cdist(points_gt, points_pred)
    gi, pj = np.nonzero(dist <= radius)
    big = (radius + 3.0) * (n + m) + 1.0
    rows = np.concatenate([gi, np.arange(n), n + np.arange(m), n + pj])
    cols = np.concatenate([pj, m + np.arange(n), np.arange(m), m + gi])
    cost = np.concatenate([1.0 + dist[gi, pj], np.full(n, big), np.full(m, big), np.ones(gi.size)])
    graph = scipy.sparse.csr_matrix((cost, (rows, cols)), shape=(n + m, m + n))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    return int(np.sum((row_ind < n) & (col_ind < m)))


def reference_boundary_stats(pred: np.ndarray, gt: np.ndarray, num_classes: int, max_dist: float) -> np.ndarray:
    """Full-image (no crop) literal pipeline: loop seg2bdry, skimage thin, scipy matching."""
    radius = max_dist * math.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2)
    out = np.zeros((num_classes, 4), dtype=np.int64)
    for c in range(num_classes):
        if not (np.any(gt == c) or np.any(pred == c)):
            continue
        bg = skimage_thin(literal_seg2bdry(gt == c))
        bp = skimage_thin(literal_seg2bdry(pred == c))
        k = reference_matching_size(np.argwhere(bg), np.argwhere(bp), radius)
        out[c] = (k, bg.sum(), k, bp.sum())
    return out


def blobs(rng: np.random.Generator, shape: tuple[int, int], num_classes: int, count: int) -> np.ndarray:
    """Label map of random overlapping ellipses and rectangles (classes 1..C-1 on 0)."""
    label = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(1, max(shape[0] / 2.5, 1.5)), rng.uniform(1, max(shape[1] / 2.5, 1.5))
        if rng.random() < 0.7:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            region = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        label[region] = rng.integers(1, num_classes)
    return label


def perturb(rng: np.random.Generator, label: np.ndarray, num_classes: int) -> np.ndarray:
    """A prediction: the label shifted by a few pixels, with noise and a wrong blob."""
    dy, dx = rng.integers(-3, 4, size=2)
    out = np.roll(label, (dy, dx), axis=(0, 1)).copy()
    noise = rng.random(label.shape) < 0.02
    out[noise] = rng.integers(0, num_classes, size=noise.sum())
    if rng.random() < 0.5:
        out[blobs(rng, label.shape, 2, 1) > 0] = rng.integers(0, num_classes)
    return out


def boundary_map_pair(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two thinned boundary maps: random blobs and their perturbation, or random scatter."""
    if rng.random() < 0.75:
        gt = blobs(rng, shape, 4, int(rng.integers(1, 5)))
        pred = perturb(rng, gt, 4)
        c = int(rng.integers(0, 4))
        return skimage_thin(literal_seg2bdry(gt == c)), skimage_thin(literal_seg2bdry(pred == c))
    return rng.random(shape) < rng.uniform(0.01, 0.2), rng.random(shape) < rng.uniform(0.01, 0.2)


def matcher_size(bdry_a: np.ndarray, bdry_b: np.ndarray, radius: float) -> int:
    adjacency = boundary.radius_graph(np.nonzero(bdry_a), np.nonzero(bdry_b), bdry_a.shape, radius)
    return boundary.max_matching_size(adjacency, int(bdry_b.sum()))


# --------------------------------------------------------------------------------------------
# The no-data tests of docs/metrics.md §3
# --------------------------------------------------------------------------------------------
def test_seg2bdry_equals_the_literal_rule():
    rng = np.random.default_rng(0)
    for _ in range(60):
        shape = tuple(rng.integers(1, 25, size=2))
        mask = rng.random(shape) < rng.uniform(0.1, 0.9)
        np.testing.assert_array_equal(boundary.seg2bdry(mask), literal_seg2bdry(mask))
        label = blobs(rng, (int(rng.integers(2, 30)), int(rng.integers(2, 30))), 3, 3) == 1
        np.testing.assert_array_equal(boundary.seg2bdry(label), literal_seg2bdry(label))


def test_vertical_step_marks_exactly_one_column():
    mask = np.zeros((12, 20), dtype=bool)
    mask[:, 7:] = True
    bdry = boundary.seg2bdry(mask)
    np.testing.assert_array_equal(np.flatnonzero(bdry.any(axis=0)), [6])
    assert bdry[:, 6].all()
    np.testing.assert_array_equal(boundary.thin(bdry), bdry)


def test_thin_equals_skimage_thin():
    rng = np.random.default_rng(1)
    for _ in range(300):
        shape = tuple(rng.integers(1, 40, size=2))
        kind = rng.random()
        if kind < 0.4:
            bmap = rng.random(shape) < rng.uniform(0.05, 0.95)
        elif kind < 0.7:
            bmap = blobs(rng, shape, 3, 3) > 0  # solid regions: many thinning iterations
        else:
            bmap = boundary.seg2bdry(blobs(rng, shape, 3, 4) == 1)
        np.testing.assert_array_equal(boundary.thin(bmap), skimage_thin(bmap))


def test_identical_maps_give_precision_and_recall_one():
    label = blobs(np.random.default_rng(2), (60, 80), 5, 6)
    stats = boundary.boundary_stats(label, label, 5)
    present = stats[:, 1] > 0
    assert present.sum() >= 2
    np.testing.assert_array_equal(stats[:, 0], stats[:, 1])
    np.testing.assert_array_equal(stats[:, 2], stats[:, 3])
    recall, precision, f = boundary.boundary_prf(stats)
    np.testing.assert_allclose(recall[present], 1.0)
    np.testing.assert_allclose(precision[present], 1.0)


@pytest.mark.parametrize("shift, matched", [(1, True), (3, True), (4, False), (7, False)])
def test_shifted_line_is_matched_within_the_radius_only(shift: int, matched: bool):
    height, width = 300, 400  # diagonal 500: r = 0.0075 * 500 = 3.75 px
    gt = np.zeros((height, width), dtype=np.uint8)
    gt[100:] = 1
    pred = np.zeros_like(gt)
    pred[100 + shift:] = 1
    stats = boundary.boundary_stats(pred, gt, 2)
    for c in (0, 1):
        assert stats[c, 1] == stats[c, 3] == width  # one full row each
        assert stats[c, 0] == (width if matched else 0)


def test_two_pixel_thick_prediction_gives_half_precision():
    # Matching level: a 2-pixel-thick predicted line against a 1-pixel GT line.
    gt = np.zeros((20, 30), dtype=bool)
    gt[10] = True
    pred = np.zeros_like(gt)
    pred[10:12] = True
    k = matcher_size(gt, pred, 2.0)
    assert k == 30  # one-to-one: P = 30 / 60, R = 1; counting pixels within r would give P = 1
    # Through masks: a 2-pixel-wide strip has boundary rows 1 above and 1 below the GT edge.
    gt_label = np.zeros((300, 400), dtype=np.uint8)
    gt_label[:151] = 1  # GT boundary: row 150
    pred_label = np.zeros_like(gt_label)
    pred_label[150:152] = 1  # predicted boundary: rows 149 and 151
    stats = boundary.boundary_stats(pred_label, gt_label, 2)
    recall, precision, _ = boundary.boundary_prf(stats)
    assert recall[1] == 1.0
    assert precision[1] == pytest.approx(0.5, abs=0.01)


def test_three_predicted_pixels_around_one_gt_pixel_give_one_match():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    pred = np.zeros_like(gt)
    pred[3, 4] = pred[4, 5] = pred[5, 3] = True
    assert matcher_size(gt, pred, 2.0) == 1
    assert matcher_size(pred, gt, 2.0) == 1


def test_result_does_not_depend_on_argument_order():
    rng = np.random.default_rng(3)
    for _ in range(10):
        gt = blobs(rng, (50, 70), 4, 4)
        pred = perturb(rng, gt, 4)
        forward = boundary.boundary_stats(pred, gt, 4)
        backward = boundary.boundary_stats(gt, pred, 4)
        np.testing.assert_array_equal(forward, backward[:, [2, 3, 0, 1]])


def test_radius_comes_from_the_full_image_diagonal_even_when_cropping():
    # 300 x 400 image: r = 3.75 px, far more than 0.0075 of the cropped box's diagonal (~0.3 px).
    gt = np.zeros((300, 400), dtype=np.uint8)
    gt[150:162, 200:212] = 1
    pred = np.zeros_like(gt)
    pred[152:164, 202:214] = 1  # the square moved by 2 px down and right (2.8 px diagonally)
    stats = boundary.boundary_stats(pred, gt, 2)
    np.testing.assert_array_equal(stats, reference_boundary_stats(pred, gt, 2, 0.0075))
    assert stats[1, 0] == stats[1, 1]  # all matched
    # A tolerance as small as one derived from the crop matches only where the outlines cross.
    tiny = boundary.boundary_stats(pred, gt, 2, max_dist=0.0006)
    assert tiny[1, 0] < 0.2 * tiny[1, 1]


def test_two_exact_matchers_agree_on_random_boundary_maps():
    rng = np.random.default_rng(4)
    for trial in range(300):
        shape = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
        bdry_a, bdry_b = boundary_map_pair(rng, shape)
        radius = float(rng.choice([1.0, 1.5, 2.5, 4.69, rng.uniform(0.5, 6.0)]))
        expected = reference_matching_size(np.argwhere(bdry_a), np.argwhere(bdry_b), radius)
        assert matcher_size(bdry_a, bdry_b, radius) == expected, trial
        assert matcher_size(bdry_b, bdry_a, radius) == expected, trial


def test_boundary_stats_equals_the_literal_pipeline():
    rng = np.random.default_rng(5)
    for trial in range(25):
        shape = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
        gt = blobs(rng, shape, 5, int(rng.integers(1, 6)))
        gt[rng.random(shape) < 0.03] = 255  # void is simply "not c"
        pred = perturb(rng, np.where(gt == 255, 0, gt).astype(np.uint8), 5)
        max_dist = float(rng.choice([0.0075, 0.02, 0.05]))
        np.testing.assert_array_equal(boundary.boundary_stats(pred, gt, 5, max_dist),
                                      reference_boundary_stats(pred, gt, 5, max_dist), err_msg=str(trial))


def test_matcher_is_fast_on_long_chains():
    # Staircase lines offset by one pixel: long alternating paths, the graphs on which scipy's
    # maximum_bipartite_matching takes exponential time (scipy issue 26147).
    n = 3000
    gt = np.zeros((n + 2, n + 2), dtype=bool)
    pred = np.zeros_like(gt)
    idx = np.arange(n)
    gt[idx, idx] = True
    pred[idx + 1, idx] = True
    pred[idx, idx + 1] = True
    start = time.perf_counter()
    assert matcher_size(gt, pred, 1.5) == n
    assert matcher_size(pred, gt, 1.5) == n
    assert time.perf_counter() - start < 10.0


def test_boundary_prf_conventions():
    counts = np.array([[8, 10, 8, 16],   # ordinary
                       [0, 0, 0, 5],     # only predicted: R = 0 (empty), P = 0
                       [0, 4, 0, 0],     # never predicted: R = 0
                       [0, 0, 0, 0]])    # absent everywhere: NaN, left out of the means
    recall, precision, f = boundary.boundary_prf(counts)
    np.testing.assert_allclose(recall[:3], [0.8, 0.0, 0.0])
    np.testing.assert_allclose(precision[:3], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(f[:3], [2 * 0.8 * 0.5 / 1.3, 0.0, 0.0])
    assert np.isnan(recall[3]) and np.isnan(precision[3]) and np.isnan(f[3])
    assert evaluate.nanmean(recall) == pytest.approx(0.8 / 3)


def test_boundary_pool_workers_give_the_same_counts():
    rng = np.random.default_rng(6)
    pairs = []
    for _ in range(6):
        gt = blobs(rng, (40, 50), 4, 3)
        pairs.append((perturb(rng, gt, 4), gt))
    serial = sum(boundary.boundary_stats(p, g, 4) for p, g in pairs)
    pool = boundary.BoundaryPool(4, boundary.DEFAULT_MAX_DIST, workers=2)
    for p, g in pairs:
        pool.add(p, g)
    np.testing.assert_array_equal(pool.result(), serial)
