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


# --------------------------------------------------------------------------------------------
# The fast pipeline's parts against the literal rules
# --------------------------------------------------------------------------------------------
def test_boundary_points_of_all_classes_equal_seg2bdry_of_each_mask():
    """One pass over the label map gives every class's seg2bdry map: odd shapes (one row, one
    column, one pixel), void and out-of-range values, uint8 and int64 labels."""
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (1, 9), (8, 1), (2, 2)] + [tuple(int(v) for v in rng.integers(2, 30, size=2)) for _ in range(60)]
    for trial, shape in enumerate(shapes):
        num_classes = int(rng.integers(1, 6))
        labels = rng.integers(-1, num_classes + 2, size=shape) if trial % 3 == 0 else blobs(rng, shape, 5, 3)
        labels[rng.random(shape) < 0.1] = 255
        if trial % 2:
            labels = labels.astype(np.int64)
        frame = shape[1] + 2
        points = boundary.boundary_points(labels, num_classes)
        assert len(points) == num_classes
        for c in range(num_classes):
            ys, xs = np.nonzero(literal_seg2bdry(labels == c))
            np.testing.assert_array_equal(np.sort(points[c]), (ys + 1) * frame + xs + 1, err_msg=f"{trial} {c}")


def test_greedy_start_is_completed_by_augmenting_paths():
    # Left a = (0, 2), b = (0, 4); right p = (0, 3), q = (0, 0); radius 2. Nearest first, a and b
    # both want p; a gets it and b has nothing else, so the greedy start has 1 pair; the maximum
    # is 2 (a-q, b-p), reached through the augmenting path b -> p -> a -> q.
    graph = boundary.radius_graph((np.array([0, 0]), np.array([2, 4])), (np.array([0, 0]), np.array([3, 0])),
                                  (1, 6), 2.0)
    match_left, _ = boundary.greedy_matching(graph)
    assert np.count_nonzero(match_left >= 0) == 1
    assert boundary.max_matching_size(graph) == 2
    assert reference_matching_size(np.array([[0, 2], [0, 4]]), np.array([[0, 3], [0, 0]]), 2.0) == 2


# --------------------------------------------------------------------------------------------
# Boundary IoU (docs/metrics.md §4) against brute force
# --------------------------------------------------------------------------------------------
def literal_inner_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of `mask` whose Chebyshev distance to the nearest pixel that is not in the mask, or
    to the nearest pixel outside the image, is <= d: brute force over all pixels."""
    height, width = mask.shape
    ys, xs = np.nonzero(~mask)
    out = np.zeros_like(mask)
    for i in range(height):
        for j in range(width):
            if not mask[i, j]:
                continue
            nearest = min(i + 1, j + 1, height - i, width - j)  # rows -1 and H, columns -1 and W
            if ys.size:
                nearest = min(nearest, int(np.max([np.abs(ys - i), np.abs(xs - j)], axis=0).min()))
            out[i, j] = nearest <= d
    return out


def eroded_band(mask: np.ndarray, d: int) -> np.ndarray:
    """The authors' construction, literally: pad with one zero pixel, erode d times with a 3x3
    square (outside the padded image does not erode), and take the mask minus the erosion."""
    padded = np.pad(mask, 1)
    for _ in range(d):
        grown = np.pad(padded, 1, constant_values=True)  # beyond the padding: no erosion
        padded = np.logical_and.reduce([grown[1 + dy:grown.shape[0] - 1 + dy, 1 + dx:grown.shape[1] - 1 + dx]
                                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return mask & ~padded[1:-1, 1:-1]


def literal_biou_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, ratio: float,
                        band=literal_inner_band) -> np.ndarray:
    """[C, 2] (intersection, union) of the classes' inner bands, void pixels not counted."""
    d = max(int(round(ratio * math.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2))), 1)
    valid = gt < num_classes
    out = np.zeros((num_classes, 2), dtype=np.int64)
    for c in range(num_classes):
        band_gt = band(gt == c, d) & valid
        band_pred = band(pred == c, d) & valid
        out[c] = (np.sum(band_gt & band_pred), np.sum(band_gt | band_pred))
    return out


def test_inner_band_is_the_distance_rule_and_the_authors_erosion():
    rng = np.random.default_rng(8)
    for trial in range(40):
        shape = (int(rng.integers(1, 16)), int(rng.integers(1, 19)))
        labels = blobs(rng, shape, 4, 3) if trial % 2 else rng.integers(0, 3, size=shape).astype(np.uint8)
        labels[rng.random(shape) < 0.1] = 255
        d = int(rng.integers(1, 6))
        band = boundary.inner_band(labels, d)
        for c in (0, 1, 2, 255):
            mask = labels == c
            expected = literal_inner_band(mask, d)
            np.testing.assert_array_equal(band & mask, expected, err_msg=f"{trial} {c}")
            np.testing.assert_array_equal(eroded_band(mask, d), expected, err_msg=f"{trial} {c}")


def test_biou_counts_equal_brute_force_with_void():
    rng = np.random.default_rng(9)
    total, expected_total = np.zeros((5, 2), np.int64), np.zeros((5, 2), np.int64)
    for trial in range(12):
        shape = (int(rng.integers(6, 24)), int(rng.integers(6, 28)))
        gt = blobs(rng, shape, 5, int(rng.integers(1, 5)))
        gt[rng.random(shape) < 0.05] = 255  # void: bounds the bands, never counted
        pred = perturb(rng, np.where(gt == 255, 0, gt).astype(np.uint8), 5)
        pred[rng.random(shape) < 0.03] = 255  # "no prediction": a miss, in no class's band
        ratio = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        counts = boundary.biou_stats(pred, gt, 5, ratio)
        expected = literal_biou_counts(pred, gt, 5, ratio)
        np.testing.assert_array_equal(counts, expected, err_msg=str(trial))
        total += counts
        expected_total += expected
    per_class, mean = boundary.biou(total)
    present = expected_total[:, 1] > 0
    np.testing.assert_allclose(per_class[present], expected_total[present, 0] / expected_total[present, 1])
    assert np.isnan(per_class[~present]).all()
    assert mean == pytest.approx(np.mean(expected_total[present, 0] / expected_total[present, 1]))


def test_biou_hand_computed_square():
    # 12 x 14 image (diagonal 18.4): ratio 0.06 -> d = round(1.1) = 1. GT: a 6 x 6 square of class 1
    # at rows 3-8, columns 4-9; its band is the 20-pixel outer ring. Prediction: the same square
    # moved one column right; the two rings share 5 pixels of the top row and 5 of the bottom row
    # (their side columns 4, 9 and 5, 10 differ): intersection 10, union 20 + 20 - 10 = 30.
    gt = np.zeros((12, 14), np.uint8)
    gt[3:9, 4:10] = 1
    pred = np.zeros_like(gt)
    pred[3:9, 5:11] = 1
    ring_gt = {(i, j) for i in range(3, 9) for j in range(4, 10)} - {(i, j) for i in range(4, 8) for j in range(5, 9)}
    ring_pred = {(i, j + 1) for i, j in ring_gt}
    counts = boundary.biou_stats(pred, gt, 2, 0.06)
    assert boundary.biou_band_width(gt.shape, 0.06) == 1
    assert tuple(counts[1]) == (len(ring_gt & ring_pred), len(ring_gt | ring_pred)) == (10, 30)
    # Class 0 (background): its band is the image's outer ring plus the ring around the square.
    assert counts[0, 1] > 0 and counts[0, 0] < counts[0, 1]
    # A band wider than half the image: every pixel of a class is in its band.
    wide = boundary.biou_stats(pred, gt, 2, 0.5)
    np.testing.assert_array_equal(wide, [[np.sum((gt == 0) & (pred == 0)), np.sum((gt == 0) | (pred == 0))],
                                         [np.sum((gt == 1) & (pred == 1)), np.sum((gt == 1) | (pred == 1))]])


def test_biou_band_width_rounds_like_the_authors():
    assert boundary.biou_band_width((1024, 2048), 0.005) == 11  # 0.005 * 2289.7 = 11.4
    assert boundary.biou_band_width((1024, 2048), 0.02) == 46  # 45.8
    assert boundary.biou_band_width((375, 500), 0.02) == 12  # 12.5 -> round half to even
    assert boundary.biou_band_width((10, 10), 0.01) == 1  # 0.14 -> 0 -> at least 1


def test_boundary_pool_gives_biou_counts_in_workers_too():
    rng = np.random.default_rng(10)
    pairs = []
    for _ in range(5):
        gt = blobs(rng, (30, 44), 4, 3)
        gt[rng.random(gt.shape) < 0.05] = 255
        pairs.append((perturb(rng, np.where(gt == 255, 0, gt).astype(np.uint8), 4), gt))
    serial_biou = sum(boundary.biou_stats(p, g, 4, 0.03) for p, g in pairs)
    serial_prf = sum(boundary.boundary_stats(p, g, 4) for p, g in pairs)
    for workers in (0, 2):
        pool = boundary.BoundaryPool(4, boundary.DEFAULT_MAX_DIST, workers, biou_dilation=0.03)
        for p, g in pairs:
            pool.add(p, g)
        totals = pool.totals()
        np.testing.assert_array_equal(totals["biou"], serial_biou)
        np.testing.assert_array_equal(totals["boundary"], serial_prf)
        only_biou = boundary.BoundaryPool(4, None, workers, biou_dilation=0.03)
        for p, g in pairs:
            only_biou.add(p, g)
        assert set(only_biou.totals()) == {"biou"}


def test_both_ways_of_augmenting_reach_the_reference_maximum():
    """`augment` finishes with Python searches or, when they grow long, with the compiled maximum
    flow; each path alone, from the greedy start, must give the exact maximum."""
    rng = np.random.default_rng(4)  # the maps of test_two_exact_matchers_agree_on_random_boundary_maps
    for trial in range(150):
        shape = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
        bdry_a, bdry_b = boundary_map_pair(rng, shape)
        radius = float(rng.choice([1.0, 1.5, 2.5, 4.69, rng.uniform(0.5, 6.0)]))
        expected = reference_matching_size(np.argwhere(bdry_a), np.argwhere(bdry_b), radius)
        graph = boundary.radius_graph(np.nonzero(bdry_a), np.nonzero(bdry_b), shape, radius)
        for finish in ("dfs", "flow", "both"):
            match_left, match_right = boundary.greedy_matching(graph)
            if finish == "dfs":
                _, finished = boundary.dfs_augment(graph, match_left, match_right)
                assert finished
            elif finish == "flow":
                boundary.max_flow_augment(graph, match_left, match_right)
            else:  # a few searches, then the flow from wherever they stopped
                _, finished = boundary.dfs_augment(graph, match_left, match_right, base=3, per_search=0)
                if not finished:
                    boundary.max_flow_augment(graph, match_left, match_right)
            matched = np.flatnonzero(match_left >= 0)
            assert matched.size == expected, (trial, finish)
            # a valid matching: partners agree both ways and every pair is within the radius
            np.testing.assert_array_equal(match_right[match_left[matched]], matched)
            ay, ax = np.nonzero(bdry_a)
            by, bx = np.nonzero(bdry_b)
            v = match_left[matched]
            assert np.all(np.hypot(ay[matched] - by[v], ax[matched] - bx[v]) <= radius)


def test_all_edges_are_every_pair_within_the_radius():
    rng = np.random.default_rng(12)
    for trial in range(60):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        a = np.nonzero(rng.random(shape) < 0.2)
        b = np.nonzero(rng.random(shape) < rng.uniform(0.01, 0.5))
        radius = float(rng.choice([0.0, 1.0, 1.5, 2.0, 4.69, 7.3]))
        graph = boundary.radius_graph(a, b, shape, radius)
        # every pair, by brute force (np.hypot, as the disk of offsets is drawn)
        dist = np.hypot(a[0][:, None] - b[0][None, :], a[1][:, None] - b[1][None, :])
        expected = sorted(zip(*(idx.tolist() for idx in np.nonzero(dist <= radius))))
        u, v = graph.all_edges()
        assert sorted(zip(u.tolist(), v.tolist())) == expected, trial
