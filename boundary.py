"""The boundary metric of the paper's Tables 4 and 8: BSDS500 boundary precision / recall / F.

Per class c, on the binary masks gt == c and pred == c at full resolution (docs/metrics.md §3):
the BSDS seg2bdry boundary map, thinned to one pixel (MATLAB bwmorph 'thin', the Guo-Hall
algorithm of skimage.morphology.thin), and an exact one-to-one maximum matching of predicted and
ground-truth boundary pixels within 0.75% of the image diagonal. Counts are summed over the data
set; evaluate.py turns them into the per-class tables.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
from collections import deque

import numpy as np

DEFAULT_MAX_DIST = 0.0075  # BSDS tolerance: fraction of the image diagonal (docs/metrics.md §3.3)


def seg2bdry(mask: np.ndarray) -> np.ndarray:
    """Boundary map of a binary mask, BSDS `seg2bdry(mask, 'imageSize')` (docs/metrics.md §3.1).

    Pixel (i, j) is a boundary pixel iff the 2x2 block whose top-left corner it is is not
    constant; on the last row only the right neighbour counts, on the last column only the one
    below, and the bottom-right pixel never. One pixel thick on straight edges (the "any
    4-neighbour differs" rule would mark both sides).
    """
    m = np.asarray(mask, dtype=bool)
    out = np.zeros(m.shape, dtype=bool)
    top_left = m[:-1, :-1]
    out[:-1, :-1] = (top_left != m[:-1, 1:]) | (top_left != m[1:, :-1]) | (top_left != m[1:, 1:])
    out[-1, :-1] = m[-1, :-1] != m[-1, 1:]
    out[:-1, -1] = m[:-1, -1] != m[1:, -1]
    return out


def _guo_hall_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo-Hall thinning, indexed by the 8-bit
    neighbour code (bit k-1 = x_k; x1 = east, then counter-clockwise: NE, N, NW, W, SW, S, SE).

    Conditions of Guo & Hall (1989), the algorithm of MATLAB's bwmorph 'thin' and of
    skimage.morphology.thin: G1 crossing number X_H = 1; G2 2 <= min(n1, n2) <= 3;
    G3 (first pass) (x2 | x3 | ~x8) & x1 == 0, G3' (second pass) (x6 | x7 | ~x4) & x5 == 0.
    """
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [bool((code >> k) & 1) for k in range(8)]

        def nb(k: int) -> bool:  # x_k with x_9 = x_1, 1-based as in the paper
            return x[(k - 1) % 8]

        crossing = sum(1 for i in range(1, 5) if not nb(2 * i - 1) and (nb(2 * i) or nb(2 * i + 1)))
        n1 = sum(1 for k in range(1, 5) if nb(2 * k - 1) or nb(2 * k))
        n2 = sum(1 for k in range(1, 5) if nb(2 * k) or nb(2 * k + 1))
        g12 = crossing == 1 and 2 <= min(n1, n2) <= 3
        first[code] = g12 and not ((nb(2) or nb(3) or not nb(8)) and nb(1))
        second[code] = g12 and not ((nb(6) or nb(7) or not nb(4)) and nb(5))
    return first, second


_THIN_LUTS = _guo_hall_luts()
# (dy, dx, bit) of the 8 neighbours in the order of the code bits above.
_NEIGHBOUR_BITS = ((0, 1, 1), (-1, 1, 2), (-1, 0, 4), (-1, -1, 8),
                   (0, -1, 16), (1, -1, 32), (1, 0, 64), (1, 1, 128))


def thin_points(bmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-major (ys, xs) of the pixels of `thin(bmap)`; the boundary metric only needs these."""
    b = np.asarray(bmap, dtype=bool)
    ys, xs = np.nonzero(b)
    ys, xs = ys + 1, xs + 1
    padded = np.zeros((b.shape[0] + 2, b.shape[1] + 2), dtype=np.uint8)  # 1-pixel zero frame
    padded[ys, xs] = 1
    changed = True
    while changed and ys.size:
        changed = False
        for lut in _THIN_LUTS:
            code = np.zeros(ys.size, dtype=np.uint8)  # 8-bit neighbour code of each pixel
            for dy, dx, bit in _NEIGHBOUR_BITS:
                code |= padded[ys + dy, xs + dx] * np.uint8(bit)
            delete = lut[code]  # decided from the map before this sub-iteration (parallel)
            if delete.any():
                changed = True
                padded[ys[delete], xs[delete]] = 0
                ys, xs = ys[~delete], xs[~delete]
    return ys - 1, xs - 1


def thin(bmap: np.ndarray) -> np.ndarray:
    """Thin a boundary map to one pixel: MATLAB `bwmorph(b, 'thin', Inf)` (docs/metrics.md §3.2).

    The same parallel Guo-Hall algorithm as skimage.morphology.thin, and the same result
    (test_boundary checks equality on hundreds of maps), but each sub-iteration only looks at
    the current foreground pixels instead of correlating the whole image: boundary maps are
    sparse, so this is about 20x faster on VOC-sized images, and thinning was most of the
    boundary metric's time. Outside the image counts as background, as in skimage.
    """
    ys, xs = thin_points(bmap)
    out = np.zeros(np.shape(bmap), dtype=bool)
    out[ys, xs] = True
    return out


def match_radius(shape: tuple[int, int], max_dist: float = DEFAULT_MAX_DIST) -> float:
    """Tolerance in pixels: max_dist times the diagonal of the full image (docs/metrics.md §3.3)."""
    return max_dist * math.hypot(shape[0], shape[1])


@functools.lru_cache(maxsize=16)
def disk_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (dy, dx) with sqrt(dy^2 + dx^2) <= radius, nearest first."""
    reach = int(math.floor(radius))
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    dy, dx = dy.ravel(), dx.ravel()
    dist = np.hypot(dy, dx)
    keep = dist <= radius
    order = np.argsort(dist[keep], kind="stable")
    return dy[keep][order], dx[keep][order]


def radius_graph(points_a: tuple[np.ndarray, np.ndarray], points_b: tuple[np.ndarray, np.ndarray],
                 shape: tuple[int, int], radius: float, chunk: int = 4096) -> list[list[int]]:
    """Bipartite graph between two pixel sets of an image of `shape`: a-pixel u is joined to
    every b-pixel within `radius`. Points are (ys, xs) arrays.

    Returns, for each a-pixel, the indices of its b-pixels, nearest first. Built by looking up
    each disk offset in an index image of b, so the cost is (a-pixels x offsets), independent
    of the image area.
    """
    ay, ax = points_a
    by, bx = points_b
    reach = int(math.ceil(radius))
    index = np.full((shape[0] + 2 * reach, shape[1] + 2 * reach), -1, dtype=np.int32)
    index[by + reach, bx + reach] = np.arange(by.size, dtype=np.int32)
    off_y, off_x = disk_offsets(radius)
    adjacency: list[list[int]] = []
    for start in range(0, ay.size, chunk):  # chunks bound memory for Cityscapes-size radii
        rows = ay[start:start + chunk, None] + reach + off_y[None, :]
        cols = ax[start:start + chunk, None] + reach + off_x[None, :]
        targets = index[rows, cols]  # [n, offsets], -1 where no b-pixel
        hit = targets >= 0
        flat = targets[hit].tolist()  # row-major, so each row keeps the nearest-first order
        begin = 0
        for end in np.cumsum(hit.sum(axis=1)).tolist():
            adjacency.append(flat[begin:end])
            begin = end
    return adjacency


def max_matching_size(adjacency: list[list[int]], num_right: int) -> int:
    """Size of a maximum-cardinality bipartite matching (exact; docs/metrics.md §3.4).

    Greedy nearest-free start, then one augmenting-path search (iterative DFS: paths can be
    thousands of pixels long) from every left vertex the greedy pass left free. Dead-end
    pruning: when a search fails, the left vertices it reached form a Hungarian tree (all
    their neighbours are matched inside the tree), and deleting the tree with its matched
    edges leaves the maximum matching size of the rest unchanged, so those vertices are
    never entered again. When every free left vertex has failed, no augmenting path is left
    and by Berge's theorem the matching is maximum. Deterministic, O(V E) at worst, and each
    failed search is paid once.
    """
    num_left = len(adjacency)
    match_left = [-1] * num_left
    match_right = [-1] * num_right
    size = 0
    for u in range(num_left):  # greedy start: nearest free partner (lists are nearest first)
        for v in adjacency[u]:
            if match_right[v] < 0:
                match_left[u] = v
                match_right[v] = u
                size += 1
                break
    dead = [False] * num_left  # left vertices of Hungarian trees, removed for good
    seen = [0] * num_left  # search number that last entered the vertex
    for search, root in enumerate((u for u in range(num_left) if match_left[u] < 0 and adjacency[u]), 1):
        seen[root] = search
        stack = [root]  # left vertices of the alternating path root -> ... -> stack[-1]
        pointer = {root: 0}  # next edge to try, per entered left vertex
        augmented = False
        while stack:
            u = stack[-1]
            neighbours = adjacency[u]
            degree = len(neighbours)
            i = pointer[u]
            while i < degree:
                v = neighbours[i]
                i += 1
                w = match_right[v]
                if w < 0:  # free right vertex: flip the path root -> ... -> u -> v
                    for x in reversed(stack):
                        previous = match_left[x]
                        match_left[x] = v
                        match_right[v] = x
                        v = previous
                    size += 1
                    augmented = True
                    break
                if not dead[w] and seen[w] != search:  # go on through v's partner w
                    seen[w] = search
                    pointer[u] = i
                    pointer[w] = 0
                    stack.append(w)
                    break
            else:  # every edge of u tried: backtrack
                stack.pop()
                continue
            if augmented:
                break
        if not augmented:
            for x in pointer:  # every vertex this search entered
                dead[x] = True
    return size


def class_boundary_counts(mask_gt: np.ndarray, mask_pred: np.ndarray, radius: float
                          ) -> tuple[int, int, int]:
    """(matched pairs k, GT boundary pixels, predicted boundary pixels) of one class's masks."""
    points_gt = thin_points(seg2bdry(mask_gt))
    points_pred = thin_points(seg2bdry(mask_pred))
    num_gt, num_pred = points_gt[0].size, points_pred[0].size
    if num_gt == 0 or num_pred == 0:
        return 0, num_gt, num_pred
    # The smaller side on the left keeps the Python loops short; k does not depend on it.
    left, right = (points_gt, points_pred) if num_gt <= num_pred else (points_pred, points_gt)
    adjacency = radius_graph(left, right, mask_gt.shape, radius)
    return max_matching_size(adjacency, right[0].size), num_gt, num_pred


def union_crop(mask_a: np.ndarray, mask_b: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Bounding box of mask_a | mask_b grown by `margin` pixels, clipped to the image.

    Both masks are constant (False) outside the box and for `margin` >= 2 the boundary rule,
    the 3x3 thinning and the distances are the same inside the crop as in the full image;
    only the radius must still come from the full image (docs/metrics.md §3, "Speed").
    """
    union = mask_a | mask_b
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    height, width = union.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, height)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, width)))


def boundary_stats(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                   max_dist: float = DEFAULT_MAX_DIST) -> np.ndarray:
    """Per-class boundary counts of one image, `[C, 4]` int64 (docs/metrics.md §3):
    (matched GT pixels, GT boundary pixels, matched predicted pixels, predicted boundary pixels).

    Masks are `gt == c` and `pred == c` at full resolution (void is just "not c"). Matching is
    one-to-one, so both matched counts equal the maximum matching size k. Classes absent from
    both maps are skipped (all zeros); each present class is cropped to the union bounding box
    grown by ceil(r) + 2, with r from the full image's diagonal.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be equal 2-D shapes")
    radius = match_radius(gt.shape, max_dist)
    margin = int(math.ceil(radius)) + 2
    stats = np.zeros((num_classes, 4), dtype=np.int64)
    for c in np.flatnonzero(class_histogram(gt, num_classes) + class_histogram(pred, num_classes)):
        mask_gt, mask_pred = gt == c, pred == c
        rows, cols = union_crop(mask_gt, mask_pred, margin)
        k, num_gt, num_pred = class_boundary_counts(mask_gt[rows, cols], mask_pred[rows, cols], radius)
        stats[c] = (k, num_gt, k, num_pred)
    return stats


def class_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class `[C]`; values outside [0, C) are not counted."""
    flat = labels.ravel()
    if flat.dtype == np.uint8:  # the usual case: a direct bincount, no mask
        return np.bincount(flat, minlength=256)[:num_classes]
    flat = flat[(flat >= 0) & (flat < num_classes)].astype(np.intp)
    return np.bincount(flat, minlength=num_classes)


def boundary_prf(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class recall, precision and F `[C]` each from summed `[C, 4]` counts (docs/metrics.md §3.5).

    R = cntR / sumR, P = cntP / sumP, F = 2PR / (P + R). Like the BSDS code, an empty
    denominator gives 0 (GT without boundary: every predicted pixel is a false positive; no
    prediction: every GT pixel a miss) and F = 0 when P + R = 0. A class with no boundary pixel
    on either side anywhere in the data set is NaN in all three and left out of the means.
    """
    counts = np.asarray(counts, dtype=np.float64)
    cnt_r, sum_r, cnt_p, sum_p = counts.T
    recall = np.divide(cnt_r, sum_r, out=np.zeros_like(cnt_r), where=sum_r > 0)
    precision = np.divide(cnt_p, sum_p, out=np.zeros_like(cnt_p), where=sum_p > 0)
    f = np.divide(2 * precision * recall, precision + recall,
                  out=np.zeros_like(recall), where=(precision + recall) > 0)
    absent = (sum_r == 0) & (sum_p == 0)
    for values in (recall, precision, f):
        values[absent] = np.nan
    return recall, precision, f


def _boundary_task(pred: np.ndarray, gt: np.ndarray, num_classes: int, max_dist: float) -> np.ndarray:
    """Top-level (picklable) wrapper so that worker processes can run boundary_stats."""
    return boundary_stats(pred, gt, num_classes, max_dist)


class BoundaryPool:
    """boundary_stats over images in worker processes while the caller keeps predicting.

    At most 4 images per worker wait in the queue, so memory stays bounded when the workers are
    slower than the model. workers=0 runs in the calling process.
    """

    def __init__(self, num_classes: int, max_dist: float, workers: int):
        self.num_classes, self.max_dist, self.workers = num_classes, max_dist, workers
        self.total = np.zeros((num_classes, 4), dtype=np.int64)
        self.pending: deque = deque()
        self.pool = None
        if workers > 0:
            # fork: the children inherit the imported modules and only run numpy code.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self.pool = multiprocessing.get_context(method).Pool(workers)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if self.pool is None:
            self.total += boundary_stats(pred, gt, self.num_classes, self.max_dist)
            return
        self.pending.append(self.pool.apply_async(_boundary_task, (pred, gt, self.num_classes, self.max_dist)))
        while len(self.pending) > 4 * self.workers:
            self.total += self.pending.popleft().get()

    def result(self) -> np.ndarray:
        while self.pending:
            self.total += self.pending.popleft().get()
        self.close()
        return self.total

    def close(self) -> None:
        """Stop the workers; after an error (tasks still pending) without waiting for them."""
        if self.pool is not None:
            if self.pending:
                self.pool.terminate()
                self.pending.clear()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
