"""The boundary metrics: BSDS500 boundary precision / recall / F of the paper's Tables 4 and 8,
and Boundary IoU (Cheng et al., CVPR 2021; not in the paper).

P/R/F (docs/metrics.md §3), per class c, on the binary masks gt == c and pred == c at full
resolution: the BSDS seg2bdry boundary map, thinned to one pixel (MATLAB bwmorph 'thin', the
Guo-Hall algorithm of skimage.morphology.thin), and an exact one-to-one maximum matching of
predicted and ground-truth boundary pixels within 0.75% of the image diagonal. Fast without
changing a count: the boundary maps of all classes come from one pass over the label map, the
thinning revisits only pixels next to a deletion, and the matching starts from a vectorised
greedy one that Hopcroft-Karp phases (scipy's compiled maximum flow) make maximum.

Boundary IoU (docs/metrics.md §4), per class: the IoU of the inner bands of width d of the two
masks, void pixels not counted. Counts of both are summed over the data set (BoundaryPool, in
worker processes); evaluate.py turns them into the per-class tables.
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
# The same as columns: [2, 8, 1] (dy, dx) and [8, 1] bit weights, shaped to broadcast over [8, n] look-ups.
_NEIGHBOUR_STEPS = np.array([(dy, dx) for dy, dx, _ in _NEIGHBOUR_BITS], dtype=np.intp).T[:, :, None]
_NEIGHBOUR_WEIGHTS = np.array([bit for _, _, bit in _NEIGHBOUR_BITS], dtype=np.uint8)[:, None]


def boundary_points(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """seg2bdry(labels == c) of every class c < C in one pass over the label map.

    Returns, per class, the pixels of its boundary map as flat indices into the image framed by a
    1-pixel border, `(i + 1) * (W + 2) + (j + 1)` (the frame that `thin_flat` works in). A 2x2
    block that is not constant holds at least two labels, and for the mask of class c it is
    non-constant iff c is one of them; so each non-constant block marks its top-left pixel for
    each distinct label among its 4 pixels (the last row and column compare 2 pixels). This
    replaces C comparisons of the whole map per image by one.
    """
    lab = np.ascontiguousarray(labels)
    height, width = lab.shape
    flat = lab.ravel()
    frame = width + 2
    parts_cls, parts_pos = [], []

    def mark(pos: np.ndarray, corners: list[np.ndarray]) -> None:
        # corners: the labels of the blocks at `pos` (frame indices); each distinct one marks once
        for k, values in enumerate(corners):
            new = np.ones(values.shape, dtype=bool)
            for earlier in corners[:k]:
                new &= values != earlier
            parts_cls.append(values[new])
            parts_pos.append(pos[new])

    # 2x2 blocks with their top-left pixel p = i * W + j, i < H - 1, j < W - 1 (flat indices are
    # much faster to find and read than 2-D ones): right p + 1, below p + W, diagonal p + W + 1.
    n = (height - 1) * width
    if n > 1:
        top_left = flat[:n - 1]
        changes = np.zeros(n, dtype=bool)
        changes[:n - 1] = (top_left != flat[1:n]) | (top_left != flat[width:n - 1 + width]) | (
            top_left != flat[width + 1:n + width])
        changes[width - 1::width] = False  # the last column has no right neighbour: below
        p = np.flatnonzero(changes)
        mark(p + 2 * (p // width) + frame + 1,  # (i + 1) * (W + 2) + (j + 1)
             [flat[p], flat[p + 1], flat[p + width], flat[p + width + 1]])
    row, col = lab[-1], lab[:, -1]
    xs = np.flatnonzero(row[:-1] != row[1:])  # last row: only the right neighbour counts
    mark(height * frame + xs + 1, [row[xs], row[xs + 1]])
    ys = np.flatnonzero(col[:-1] != col[1:])  # last column: only the one below
    mark((ys + 1) * frame + width, [col[ys], col[ys + 1]])
    cls = np.concatenate(parts_cls)
    pos = np.concatenate(parts_pos).astype(np.intp)
    keep = (cls >= 0) & (cls < num_classes)  # void (255) and other values are "not c" for every c
    # int16 class ids: argsort's stable sort is then a radix sort
    cls, pos = cls[keep].astype(np.int16 if num_classes <= 2 ** 15 else np.int64), pos[keep]
    order = np.argsort(cls, kind="stable")
    return np.split(pos[order], np.cumsum(np.bincount(cls, minlength=num_classes))[:-1])


def thin_flat(points: np.ndarray, canvas: np.ndarray, frame: int, scratch: np.ndarray) -> np.ndarray:
    """Guo-Hall thinning (the tables above) of the pixel set `points`, flat indices into
    `canvas`, a zero uint8 image of row length `frame` with a zero border of >= 1 pixel;
    `scratch` is an integer array of the canvas's size whose contents do not matter.

    Returns the surviving points; `canvas` is zero again afterwards. Parallel sub-iterations as in
    skimage: a pixel's fate is decided from the map before the sub-iteration. Each table must see
    every pixel once, but the codes change only next to deleted pixels: the first sub-iteration
    computes every code, the second reuses them and recomputes those beside its deletions, and
    later ones look only at the neighbours of the pixels deleted in the previous two (any other
    pixel has the neighbourhood it had when the same table last kept it, so it keeps it again).
    Stops when two sub-iterations in a row delete nothing, i.e. the map is a fixed point of both
    tables, where skimage's loop ends too.
    """
    offsets = _NEIGHBOUR_STEPS[0] * frame + _NEIGHBOUR_STEPS[1]  # [8, 1] flat steps to the neighbours

    def code(pixels: np.ndarray) -> np.ndarray:  # [8, n] neighbour values -> 8-bit codes (bit k-1 = x_k)
        return (canvas[offsets + pixels] * _NEIGHBOUR_WEIGHTS).sum(axis=0, dtype=np.uint8)

    canvas[points] = 1
    codes = code(points)
    first = points[_THIN_LUTS[0][codes]]
    canvas[first] = 0
    scratch[points] = np.arange(points.size)  # pixel -> its place in `points`
    near = (offsets + first).ravel()
    near = near[canvas[near] == 1]
    codes[scratch[near]] = code(near)  # repeated pixels just write the same code twice
    second = points[(canvas[points] == 1) & _THIN_LUTS[1][codes]]
    canvas[second] = 0
    deleted = [first, second]  # deletions of the last two sub-iterations
    step = 2
    while True:
        near = (offsets + np.concatenate(deleted)).ravel()
        near = near[canvas[near] == 1]
        scratch[near] = np.arange(near.size)  # one write survives per pixel: keep that copy
        check = near[scratch[near] == np.arange(near.size)]
        if check.size == 0:
            break
        gone = check[_THIN_LUTS[step % 2][code(check)]]
        canvas[gone] = 0
        deleted = [deleted[1], gone]
        step += 1
    kept = points[canvas[points] == 1]
    canvas[kept] = 0
    return kept


def thin_points(bmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-major (ys, xs) of the pixels of `thin(bmap)`; the boundary metric only needs these."""
    b = np.asarray(bmap, dtype=bool)
    frame = b.shape[1] + 2
    ys, xs = np.nonzero(b)
    canvas = np.zeros((b.shape[0] + 2) * frame, dtype=np.uint8)  # 1-pixel zero frame
    kept = np.sort(thin_flat((ys + 1) * frame + (xs + 1), canvas, frame, np.empty(canvas.size, dtype=np.intp)))
    return kept // frame - 1, kept % frame - 1


def thin(bmap: np.ndarray) -> np.ndarray:
    """Thin a boundary map to one pixel: MATLAB `bwmorph(b, 'thin', Inf)` (docs/metrics.md §3.2).

    The same parallel Guo-Hall algorithm as skimage.morphology.thin, and the same result
    (test_boundary checks equality on hundreds of maps), but each sub-iteration only looks at
    the current foreground pixels near the last changes instead of correlating the whole image:
    boundary maps are sparse. Outside the image counts as background, as in skimage.
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


# Distance bands of the greedy start (px): nearest pairs are matched first, band by band.
_GREEDY_BANDS = (1.0, 2.0, 4.0, 8.0)
_CHUNK = 4096  # left pixels per neighbour look-up: bounds the [rows, offsets] arrays (~15 MB at r = 17)
_TILE = 32  # px: `RadiusGraph.adjacency` looks up the left pixels of one tile at a time


class RadiusGraph:
    """Bipartite graph between two pixel sets of an image: left pixel u and right pixel v are
    joined iff their Euclidean distance is <= radius (docs/metrics.md §3.3-4).

    The graph is not built up front: the greedy start and the Python searches look up the
    neighbours of the left pixels they need at every disk offset of an index image of the right
    pixels (-1 elsewhere; framed by the radius so that no look-up leaves it), and only the
    compiled maximum flow asks for all edges (`all_edges`). The index image is allocated once and
    reused by `set_points`, which costs the number of points, not the image area.
    """

    def __init__(self, shape: tuple[int, int], radius: float):
        self.reach = int(math.floor(radius))  # largest |dy|, |dx| of a disk offset
        self.frame = shape[1] + 2 * self.reach
        self.index = np.full((shape[0] + 2 * self.reach) * self.frame, -1, dtype=np.int32)
        dy, dx = disk_offsets(radius)
        self.disk_dy, self.disk_dx = dy, dx
        self.offsets = (dy * self.frame + dx).astype(np.intp)  # nearest first
        edges = np.searchsorted(np.hypot(dy, dx), _GREEDY_BANDS, side="right")
        self.bands = [slice(a, b) for a, b in zip((0, *edges), (*edges, dy.size)) if b > a]
        self.left = np.zeros(0, dtype=np.intp)
        self.right = np.zeros(0, dtype=np.intp)

    def flat(self, points: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        ys, xs = points
        return (np.asarray(ys, np.intp) + self.reach) * self.frame + np.asarray(xs, np.intp) + self.reach

    def set_points(self, left: tuple[np.ndarray, np.ndarray], right: tuple[np.ndarray, np.ndarray]) -> None:
        self.index[self.right] = -1  # forget the previous right pixels
        self.left, self.right = self.flat(left), self.flat(right)
        self.index[self.right] = np.arange(self.right.size, dtype=np.int32)
        # Left pixels grouped by _TILE x _TILE tile, for `adjacency`.
        ys, xs = (np.asarray(a, np.intp) for a in left)
        self.tile_of = (ys // _TILE) * (self.frame // _TILE + 1) + xs // _TILE  # [n]
        self.by_tile = np.argsort(self.tile_of, kind="stable")  # left pixels, tile after tile
        self.sorted_tiles = self.tile_of[self.by_tile]
        self.lists: list[list[int] | None] = [None] * self.left.size  # adjacency lists looked up so far

    @property
    def num_right(self) -> int:
        return self.right.size

    def neighbours(self, rows: np.ndarray, band: slice = slice(None)) -> np.ndarray:
        """`[len(rows), offsets]` int32: the right pixel at each offset of `band` from each of
        the left pixels `rows`, nearest first, -1 where there is none."""
        return self.index[self.left[rows, None] + self.offsets[None, band]]

    def adjacency(self, u: int) -> list[int]:
        """The right pixels joined to left pixel u, nearest first, as a list (for the Python
        search of `augment`). Looked up for u's whole tile at once and kept: a search moves along
        a boundary, so the next pixels it needs are mostly in the same tile."""
        found = self.lists[u]
        if found is None:
            tile = self.tile_of[u]
            rows = self.by_tile[np.searchsorted(self.sorted_tiles, tile):
                                np.searchsorted(self.sorted_tiles, tile, side="right")]
            targets = self.neighbours(rows)  # [rows, offsets]
            hit = targets >= 0
            flat = targets[hit].tolist()  # row-major: each row keeps the nearest-first order
            begin = 0
            for row, end in zip(rows.tolist(), np.cumsum(hit.sum(axis=1)).tolist()):
                self.lists[row] = flat[begin:end]
                begin = end
            found = self.lists[u]
        return found

    def all_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v): every edge of the graph. Per left pixel and row offset dy, the right pixels of
        row y + dy within x +- half(dy) (the disk's half width there) form one run of the right
        pixels sorted row-major, found by two binary searches: the cost grows with the edges and
        left pixels x rows, not with the disk's area like a look-up at every offset."""
        dy, dx = self.disk_dy, self.disk_dx
        rows = np.arange(-self.reach, self.reach + 1)
        half = np.array([dx[dy == r].max() for r in rows.tolist()])  # [rows]
        order = np.argsort(self.right, kind="stable")
        keys = self.right[order]  # flat positions: row-major order
        first = (self.left[:, None] + rows * self.frame - half).ravel()  # [n * rows] run starts
        start = np.searchsorted(keys, first, side="left")
        stop = np.searchsorted(keys, first + np.tile(2 * half, self.left.size), side="right")
        counts = stop - start
        u = np.repeat(np.repeat(np.arange(self.left.size), rows.size), counts)
        begin = np.repeat(start - (np.cumsum(counts) - counts), counts)  # run start - its place in the output
        return u, order[begin + np.arange(u.size)]


def radius_graph(points_a: tuple[np.ndarray, np.ndarray], points_b: tuple[np.ndarray, np.ndarray],
                 shape: tuple[int, int], radius: float) -> RadiusGraph:
    """The bipartite radius graph between a-pixels (left) and b-pixels (right) of an image of
    `shape`; points are (ys, xs) arrays."""
    graph = RadiusGraph(shape, radius)
    graph.set_points(points_a, points_b)
    return graph


def greedy_matching(graph: RadiusGraph) -> tuple[np.ndarray, np.ndarray]:
    """A maximal matching (match_left [n], match_right [m], -1 = free), nearest pairs first.

    Band by band of distance, every free left pixel proposes to its nearest free right pixel in
    the band and each right pixel accepts its first proposer; rounds repeat until no free left
    pixel has a free right pixel in the band. After the last band no edge joins two free pixels
    (the matching is maximal), so `augment`, exact from any start, has little left to do. All
    numpy: the rounds are few and the work per round is (free left pixels x offsets of the band).
    """
    n, m = graph.left.size, graph.num_right
    match_left = np.full(n, -1, dtype=np.intp)
    match_right = np.full(m, -1, dtype=np.intp)
    taken = np.zeros(m + 1, dtype=bool)
    taken[m] = True  # index -1 (no right pixel) reads this entry: never free
    todo = np.arange(n)
    for band in graph.bands:
        for start in range(0, todo.size, _CHUNK):
            rows = todo[start:start + _CHUNK]
            targets = graph.neighbours(rows, band)  # [rows, offsets of the band]
            while rows.size:
                free = ~taken[targets]
                has = free.any(axis=1)
                rows, targets, free = rows[has], targets[has], free[has]
                if not rows.size:
                    break
                proposal = targets[np.arange(rows.size), free.argmax(axis=1)]  # nearest free right pixel
                accepted, first = np.unique(proposal, return_index=True)
                match_left[rows[first]] = accepted
                match_right[accepted] = rows[first]
                taken[accepted] = True
                lost = np.ones(rows.size, dtype=bool)
                lost[first] = False
                rows, targets = rows[lost], targets[lost]
        todo = todo[match_left[todo] < 0]
    return match_left, match_right


def augment(graph: RadiusGraph, match_left: np.ndarray, match_right: np.ndarray) -> int:
    """Grow the matching (in place) to a maximum one; returns the number of pairs it gained (exact).

    Two exact ways; which is faster depends on the graph (bench.py eval). Augmenting-path
    searches in Python (`dfs_augment`) settle it at once where the greedy start leaves few free
    vertices and short paths (VOC-sized images; fragmented predictions, whose boundaries are much
    longer than the ground truth's). Where the two sides are large and about as long (smoothly
    displaced boundaries at Cityscapes size), free vertices sit at the ends of long chains of
    shifted pairs and the searches end up looking at most of the graph: there
    `max_flow_augment` builds the whole graph and solves it in compiled code, at once, or when
    the searches grow long (more vertex entries than 200 plus a tenth of the right pixels, as
    the flow's cost grows with them, plus 40 per search).
    """
    n, m = graph.left.size, graph.num_right
    if n > 1000 and m < 2 * n:
        return max_flow_augment(graph, match_left, match_right)
    gained, finished = dfs_augment(graph, match_left, match_right, base=200 + m / 10, per_search=40)
    if not finished:
        gained += max_flow_augment(graph, match_left, match_right)
    return gained


def dfs_augment(graph: RadiusGraph, match_left: np.ndarray, match_right: np.ndarray,
                base: float = math.inf, per_search: float = 0.0) -> tuple[int, bool]:
    """Augmenting-path searches from the free left vertices, in place, while the vertices they
    entered stay within base + per_search x searches; returns (pairs gained, whether the
    matching is now maximum).

    One search (iterative DFS: paths can be thousands of pixels long) per free left vertex.
    Dead-end pruning: when a search fails, the left vertices it reached form a Hungarian tree
    (all their neighbours are matched inside the tree), and deleting the tree with its matched
    edges leaves the maximum matching size of the rest unchanged, so those vertices are never
    entered again. When every free left vertex has failed, no augmenting path is left and by
    Berge's theorem the matching is maximum. Only the vertices a search enters have their
    neighbours looked up (`RadiusGraph.adjacency`).
    """
    adjacency = graph.adjacency
    ml = match_left.tolist()
    mr = match_right.tolist()
    n = len(ml)
    dead = [False] * n  # left vertices of Hungarian trees, removed for good
    seen = [0] * n  # search number that last entered the vertex
    gained = entries = 0
    finished = True
    for search, root in enumerate((u for u in range(n) if ml[u] < 0), 1):
        if entries > base + per_search * search:
            finished = False
            break
        seen[root] = search
        stack = [root]  # left vertices of the alternating path root -> ... -> stack[-1]
        pointer = {root: 0}  # next edge to try, per entered left vertex
        augmented = False
        while stack:
            u = stack[-1]
            neighbours = adjacency(u)
            degree = len(neighbours)
            i = pointer[u]
            while i < degree:
                v = neighbours[i]
                i += 1
                w = mr[v]
                if w < 0:  # free right vertex: flip the path root -> ... -> u -> v
                    for x in reversed(stack):
                        previous = ml[x]
                        ml[x] = v
                        mr[v] = x
                        v = previous
                    gained += 1
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
        entries += len(pointer)
        if not augmented:
            for x in pointer:  # every vertex this search entered
                dead[x] = True
    match_left[:] = ml
    match_right[:] = mr
    return gained, finished


def max_flow_augment(graph: RadiusGraph, match_left: np.ndarray, match_right: np.ndarray) -> int:
    """Grow the matching (in place) to a maximum one with scipy's maximum_flow (Dinic's
    algorithm, compiled; not maximum_bipartite_matching, docs/metrics.md §3.4); returns the pairs
    gained.

    The residual network of the matching over all edges: source -> free left pixels -> right
    pixels by non-matching edges -> their partners by reversed matching edges -> ... -> free right
    pixels -> sink, all capacities 1. A maximum flow is a set of vertex-disjoint augmenting paths
    (and perhaps alternating cycles) of greatest total, so flipping its edges gives a maximum
    matching (exact from any start; the greedy start makes the phases few).
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    n, m = graph.left.size, graph.num_right
    source, sink, left0, right0 = 0, 1, 2, 2 + n  # vertex numbers of the flow network
    u, v = graph.all_edges()
    in_matching = match_left[u] == v
    free_left = np.flatnonzero(match_left < 0)
    free_right = np.flatnonzero(match_right < 0)
    tails = np.concatenate([np.full(free_left.size, source), np.where(in_matching, right0 + v, left0 + u),
                            right0 + free_right])
    heads = np.concatenate([left0 + free_left, np.where(in_matching, left0 + u, right0 + v),
                            np.full(free_right.size, sink)])
    network = csr_array((np.ones(tails.size, dtype=np.int32), (tails, heads)), shape=(right0 + m,) * 2)
    result = maximum_flow(network, source, sink, method="dinic")
    flow = result.flow.tocoo()
    moved = flow.data > 0
    tails, heads = flow.row[moved], flow.col[moved]
    dropped = (tails >= right0) & (heads >= left0) & (heads < right0)  # matching edges given up
    match_left[heads[dropped] - left0] = -1
    match_right[tails[dropped] - right0] = -1
    added = (tails >= left0) & (tails < right0) & (heads >= right0)  # new pairs
    match_left[tails[added] - left0] = heads[added] - right0
    match_right[heads[added] - right0] = tails[added] - left0
    return int(result.flow_value)


def max_matching_size(graph: RadiusGraph, num_right: int | None = None) -> int:
    """Size of a maximum-cardinality bipartite matching of the radius graph (exact;
    docs/metrics.md §3.4): a greedy maximal matching, then the augmentations it misses."""
    if num_right is not None and num_right != graph.num_right:
        raise ValueError(f"the graph has {graph.num_right} right pixels, not {num_right}")
    if graph.left.size == 0 or graph.num_right == 0:
        return 0
    match_left, match_right = greedy_matching(graph)
    augment(graph, match_left, match_right)
    return int(np.count_nonzero(match_left >= 0))


def boundary_stats(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                   max_dist: float = DEFAULT_MAX_DIST) -> np.ndarray:
    """Per-class boundary counts of one image, `[C, 4]` int64 (docs/metrics.md §3):
    (matched GT pixels, GT boundary pixels, matched predicted pixels, predicted boundary pixels).

    Masks are `gt == c` and `pred == c` at full resolution (void is just "not c"). Matching is
    one-to-one, so both matched counts equal the maximum matching size k. The boundary maps of
    all classes come from one pass over each label map; the thinning canvas and the index image
    of the matcher are allocated once per image and reused by every class; the radius comes from
    the full image's diagonal.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be equal 2-D shapes")
    height, width = gt.shape
    frame = width + 2
    canvas = np.zeros((height + 2) * frame, dtype=np.uint8)  # thinning, 1-pixel zero frame
    scratch = np.empty(canvas.size, dtype=np.intp)  # thinning's bookkeeping; never read before written
    graph = RadiusGraph(gt.shape, match_radius(gt.shape, max_dist))
    stats = np.zeros((num_classes, 4), dtype=np.int64)
    for c, (flat_gt, flat_pred) in enumerate(zip(boundary_points(gt, num_classes),
                                                 boundary_points(pred, num_classes))):
        if flat_gt.size == 0 and flat_pred.size == 0:
            continue
        sides = []
        for flat in (flat_gt, flat_pred):
            kept = thin_flat(flat, canvas, frame, scratch)
            sides.append((kept // frame - 1, kept % frame - 1))  # (ys, xs) in the image
        num_gt, num_pred = sides[0][0].size, sides[1][0].size
        k = 0
        if num_gt and num_pred:
            # The smaller side on the left keeps the look-ups few; k does not depend on it.
            graph.set_points(*(sides if num_gt <= num_pred else sides[::-1]))
            k = max_matching_size(graph)
        stats[c] = (k, num_gt, k, num_pred)
    return stats


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


# --------------------------------------------------------------------------------------------
# Boundary IoU (Cheng et al., CVPR 2021; docs/metrics.md §4)
# --------------------------------------------------------------------------------------------
DEFAULT_BIOU_DILATION = 0.02  # band width d as a fraction of the image diagonal (the authors' default)


def biou_band_width(shape: tuple[int, int], dilation_ratio: float = DEFAULT_BIOU_DILATION) -> int:
    """d in pixels, as the authors' API computes it: round(ratio * image diagonal), at least 1."""
    return max(int(round(dilation_ratio * math.hypot(shape[0], shape[1]))), 1)


def inner_band(labels: np.ndarray, width: int) -> np.ndarray:
    """`[H, W]` bool: pixels within Chebyshev distance `width` of a pixel of another value or of
    the outside of the image (docs/metrics.md §4).

    For every class c at once: `inner_band(labels, d) & (labels == c)` is the inner boundary band
    of the mask labels == c, M minus its erosion by a (2d + 1)-square with the outside counting
    as background (the authors' d-fold 3x3 erosion of the mask padded with one zero pixel). A
    pixel's square holds another value iff its minimum and maximum differ: two separable
    min / max filters instead of one erosion per class.
    """
    from scipy import ndimage

    lab = np.asarray(labels)
    size = 2 * width + 1
    band = ndimage.minimum_filter(lab, size=size, mode="nearest") != ndimage.maximum_filter(lab, size=size, mode="nearest")
    # Within `width` of the border the square leaves the image: band (the zero padding).
    band[:width] = band[-width:] = True
    band[:, :width] = band[:, -width:] = True
    return band


def biou_stats(pred: np.ndarray, gt: np.ndarray, num_classes: int,
               dilation_ratio: float = DEFAULT_BIOU_DILATION) -> np.ndarray:
    """Per-class Boundary IoU counts of one image, `[C, 2]` int64: (|Gb & Pb|, |Gb | Pb|), where
    Gb = G_d & G and Pb = P_d & P are the inner bands of G = (gt == c) and P = (pred == c)
    (docs/metrics.md §4).

    d comes from this image's diagonal. Void pixels (gt outside [0, C)) are "not c" for the
    masks, so they bound the bands like any other class, and are then left out of both counts.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be equal 2-D shapes")
    width = biou_band_width(gt.shape, dilation_ratio)
    valid = (gt >= 0) & (gt < num_classes)
    in_gt = inner_band(gt, width) & valid  # pixel of Gb for the class gt holds there
    in_pred = inner_band(pred, width) & valid & (pred >= 0) & (pred < num_classes)
    both = in_gt & in_pred & (gt == pred)
    count_gt = np.bincount(gt[in_gt].astype(np.intp), minlength=num_classes)
    count_pred = np.bincount(pred[in_pred].astype(np.intp), minlength=num_classes)
    intersection = np.bincount(gt[both].astype(np.intp), minlength=num_classes)
    return np.stack([intersection, count_gt + count_pred - intersection], axis=1).astype(np.int64)


def biou(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class Boundary IoU `[C]` = intersection / union of the summed `[C, 2]` counts, and the
    mean over the classes whose union is not empty (a class in neither band anywhere is NaN)."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], np.nan)
    finite = per_class[~np.isnan(per_class)]
    return per_class, float(finite.mean()) if finite.size else math.nan


# --------------------------------------------------------------------------------------------
# Both metrics over a data set, in worker processes
# --------------------------------------------------------------------------------------------
def image_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, max_dist: float | None,
                 biou_dilation: float | None) -> dict[str, np.ndarray]:
    """One image's counts: "boundary" `[C, 4]` (boundary_stats) unless max_dist is None and
    "biou" `[C, 2]` (biou_stats) unless biou_dilation is None. Top level, so workers can run it."""
    counts = {}
    if max_dist is not None:
        counts["boundary"] = boundary_stats(pred, gt, num_classes, max_dist)
    if biou_dilation is not None:
        counts["biou"] = biou_stats(pred, gt, num_classes, biou_dilation)
    return counts


class BoundaryPool:
    """The boundary metrics over images in worker processes while the caller keeps predicting:
    BSDS counts (boundary_stats, unless max_dist is None) and, with biou_dilation, Boundary IoU
    counts (biou_stats).

    At most 4 images per worker wait in the queue, so memory stays bounded when the workers are
    slower than the model. workers=0 runs in the calling process.
    """

    def __init__(self, num_classes: int, max_dist: float | None, workers: int, biou_dilation: float | None = None):
        self.num_classes, self.max_dist, self.workers = num_classes, max_dist, workers
        self.biou_dilation = biou_dilation
        self.total: dict[str, np.ndarray] = {}
        self.pending: deque = deque()
        self.pool = None
        if workers > 0:
            # fork: the children inherit the imported modules and only run numpy code.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self.pool = multiprocessing.get_context(method).Pool(workers)

    def _collect(self, counts: dict[str, np.ndarray]) -> None:
        for name, value in counts.items():
            self.total[name] = self.total[name] + value if name in self.total else value

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        task = (pred, gt, self.num_classes, self.max_dist, self.biou_dilation)
        if self.pool is None:
            self._collect(image_counts(*task))
            return
        self.pending.append(self.pool.apply_async(image_counts, task))
        while len(self.pending) > 4 * self.workers:
            self._collect(self.pending.popleft().get())

    def totals(self) -> dict[str, np.ndarray]:
        """Counts summed over the images added ("boundary" [C, 4], "biou" [C, 2]; zeros without
        images); stops the workers."""
        while self.pending:
            self._collect(self.pending.popleft().get())
        self.close()
        shapes = {"boundary": (self.max_dist, 4), "biou": (self.biou_dilation, 2)}
        for name, (setting, columns) in shapes.items():
            if setting is not None and name not in self.total:
                self.total[name] = np.zeros((self.num_classes, columns), dtype=np.int64)
        return self.total

    def result(self) -> np.ndarray:
        """The BSDS counts `[C, 4]` summed over the images (see `totals`)."""
        return self.totals()["boundary"]

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
