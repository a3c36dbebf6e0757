"""Exactness tests for losses.py (issue "losses.py", section "Exactness").

Every reference below is written from docs/protocol.md §1-4 and the paper
(Eqs. 1, 4-10) as plain Python loops over batch, pixels, directions and
classes, with explicit clipping and explicit validity checks. Nothing is vectorised in a
reference and nothing is imported from losses.py to build one.

The loop references run on nested lists whose entries are either Python floats (value only)
or 0-d float64 torch tensors (value and, through autograd, the reference gradient). The same
code serves both: `min`/`max` on a 0-d tensor keep the tensor (gradient flows) or return the
float bound (gradient 0), which is exactly the derivative of clipping.

Inputs are small and non-square with B != C != h != w, so that a layout mix-up (channels-last
masks on a channels-first tensor, h and w swapped, B and C swapped) cannot go unnoticed.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import losses

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead, and on a busy 2-core machine an
    oversubscribed thread pool turned a 10 ms discriminator step into 1 s. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IGNORE = 255
MARGIN = 3.0
CLIP_LO, CLIP_HI = 1e-4, 1.0  # docs/protocol.md §2: p, q, 1-p, 1-q each clipped to [1e-4, 1]


# ---------------------------------------------------------------------------------------------
# Scalar helpers shared by the float path and the 0-d-tensor (autograd) path
# ---------------------------------------------------------------------------------------------
def _log(x):
    return torch.log(x) if isinstance(x, torch.Tensor) else math.log(x)


def _exp(x):
    return torch.exp(x) if isinstance(x, torch.Tensor) else math.exp(x)


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def _value(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _clip(x):
    """clip to [1e-4, 1]; a clipped value is the float bound, so it carries no gradient."""
    return min(max(x, CLIP_LO), CLIP_HI)


def _hinge(x):
    """max(0, x) with a zero (float) result on the flat side."""
    return x if x > 0 else 0.0


def _valid(label: int, num_classes: int) -> bool:
    """docs/protocol.md §1: 255 is ignored, and so is any label >= C."""
    return label != IGNORE and 0 <= label < num_classes


def _nested(t: torch.Tensor):
    """[B, C, h, w] tensor -> nested lists of 0-d tensors (views: autograd reaches t)."""
    return [[[list(row.unbind()) for row in ch.unbind()] for ch in im.unbind()] for im in t.unbind()]


def _shape4(z):
    return len(z), len(z[0]), len(z[0][0]), len(z[0][0][0])


def ref_pick_labels(labels: list, h: int, w: int) -> list:
    """docs/protocol.md §1: output pixel (i, j) takes label pixel (s*i, s*j); identity at equal size."""
    H, W = len(labels[0]), len(labels[0][0])
    if (H, W) == (h, w):
        return labels
    sy, sx = H // h, W // w
    assert sy * h == H and sx * w == W, "test inputs use exact multiples"
    return [[[labels[b][sy * i][sx * j] for j in range(w)] for i in range(h)] for b in range(len(labels))]


def ref_softmax(z):
    """P_c = exp(z_c) / sum_c' exp(z_c') per pixel, by loops (max subtracted for range only)."""
    B, C, h, w = _shape4(z)
    P = [[[[None] * w for _ in range(h)] for _ in range(C)] for _ in range(B)]
    for b in range(B):
        for y in range(h):
            for x in range(w):
                zs = [z[b][c][y][x] for c in range(C)]
                mx = max(_value(v) for v in zs)
                es = [_exp(v - mx) for v in zs]
                tot = 0.0
                for e in es:
                    tot = tot + e
                for c in range(C):
                    P[b][c][y][x] = es[c] / tot
    return P


def ref_stencil(k: int) -> list[tuple[int, int]]:
    """docs/protocol.md §2: the 8 offsets (dy, dx) in {-s, 0, s}^2 minus (0, 0), s = (k - 1) / 2."""
    s = (k - 1) // 2
    return [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)]


# ---------------------------------------------------------------------------------------------
# Reference: Eq. (7) (Affinity) and Eqs. (8)-(10) (AAF), docs/protocol.md §2, §3
# ---------------------------------------------------------------------------------------------
def ref_affinity(z, labels, kernel_sizes, margin=MARGIN, lambda_edge=1.0, lambda_nonedge=1.0,
                 w_edge=None, w_nonedge=None):
    """Literal Eq. (7) (or, with w_edge / w_nonedge [C][K], Eq. (10)).

    z: nested [B][C][h][w] logits; labels: nested [B][H][W] ints (H = s*h allowed).
    Returns (loss, stats). stats[k] holds the element counts, the number of edge elements at or
    beyond the margin, and per-centre-class sums of the unweighted terms (for the AAF checks).
    """
    B, C, h, w = _shape4(z)
    lab = ref_pick_labels(labels, h, w)
    P = ref_softmax(z)
    # clip(p) and clip(1 - p) per pixel and class; the complement comes from the unclipped p.
    clipped = [[[[(_clip(P[b][c][y][x]), _clip(1.0 - P[b][c][y][x])) for x in range(w)]
                 for y in range(h)] for c in range(C)] for b in range(B)]
    total = 0.0
    stats = {}
    for ki, k in enumerate(kernel_sizes):
        edge_sum, edge_n, nonedge_sum, nonedge_n, beyond = 0.0, 0, 0.0, 0, 0
        edge_by_class = [0.0] * C
        nonedge_by_class = [0.0] * C
        for b in range(B):
            for yi in range(h):
                for xi in range(w):
                    li = lab[b][yi][xi]
                    if not _valid(li, C):
                        continue  # ignored centre: every pair dropped
                    for dy, dx in ref_stencil(k):
                        yj, xj = yi + dy, xi + dx
                        if not (0 <= yj < h and 0 <= xj < w):
                            continue  # pair leaves the image: dropped (no wrap, no padding)
                        lj = lab[b][yj][xj]
                        if not _valid(lj, C):
                            continue  # ignored neighbour: dropped
                        for c in range(C):
                            pc, npc = clipped[b][c][yi][xi]  # centre i: p
                            qc, nqc = clipped[b][c][yj][xj]  # neighbour j: q
                            kl = qc * _log(qc / pc) + nqc * _log(nqc / npc)  # KL(q || p)
                            if (li == c) != (lj == c):  # edge in channel c
                                term = _hinge(margin - kl)
                                beyond += _value(kl) >= margin
                                edge_by_class[li] = edge_by_class[li] + term
                                if w_edge is not None:
                                    term = w_edge[li][ki] * term  # weight of the centre's class
                                edge_sum = edge_sum + term
                                edge_n += 1
                            else:
                                term = kl
                                nonedge_by_class[li] = nonedge_by_class[li] + term
                                if w_nonedge is not None:
                                    term = w_nonedge[li][ki] * term
                                nonedge_sum = nonedge_sum + term
                                nonedge_n += 1
        edge_mean = edge_sum / edge_n if edge_n else 0.0  # empty set contributes 0
        nonedge_mean = nonedge_sum / nonedge_n if nonedge_n else 0.0
        total = total + lambda_edge * edge_mean + lambda_nonedge * nonedge_mean
        stats[k] = dict(edge_n=edge_n, nonedge_n=nonedge_n, beyond_margin=beyond,
                        edge_by_class=[_value(v) for v in edge_by_class],
                        nonedge_by_class=[_value(v) for v in nonedge_by_class])
    return total, stats


def ref_simplex(logits_ck):
    """softmax over the K sizes, per class, by loops: [C][K] -> [C][K]."""
    out = []
    for row in logits_ck:
        mx = max(_value(v) for v in row)
        es = [_exp(v - mx) for v in row]
        tot = 0.0
        for e in es:
            tot = tot + e
        out.append([e / tot for e in es])
    return out


def ref_unary(z, labels):
    """Eq. (1): mean over valid pixels of -log softmax(z)_label; 0 when none is valid."""
    B, C, h, w = _shape4(z)
    lab = ref_pick_labels(labels, h, w)
    total, n = 0.0, 0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                l = lab[b][y][x]
                if not _valid(l, C):
                    continue
                zs = [z[b][c][y][x] for c in range(C)]
                mx = max(_value(v) for v in zs)
                s = 0.0
                for v in zs:
                    s = s + _exp(v - mx)
                total = total + (mx + _log(s) - zs[l])
                n += 1
    return total / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# Running the reference and the module
# ---------------------------------------------------------------------------------------------
def reference_with_grad(fn, logits: torch.Tensor, *args, **kwargs):
    """Run a loop reference on float64 0-d tensors; return (loss float, d loss / d logits)."""
    z = logits.detach().double().requires_grad_(True)
    out = fn(_nested(z), *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
        grad = z.grad
    else:
        grad = torch.zeros_like(z)
    return _value(loss), grad, (out[1] if isinstance(out, tuple) else None)


def module_with_grad(fn, logits: torch.Tensor, labels: torch.Tensor):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels)
    loss.backward()
    return loss.detach(), x.grad


def assert_loss_close(got, expected: float, tol: float = 1e-6, what: str = "loss"):
    got = _value(got)
    assert math.isfinite(got), f"{what}: not finite ({got})"
    assert abs(got - expected) <= tol * max(1.0, abs(expected)), \
        f"{what}: got {got!r}, reference {expected!r}, diff {got - expected:.3e}"


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "grad"):
    """max |g - g_ref| <= tol (absolute) and <= 10 tol * max |g_ref| (relative to the scale).

    float32 noise: 1 - p for p close to 1 loses digits (the complements come from the unclipped
    p, docs/protocol.md §2), which gives errors ~1e-7 on gradients of size ~1e-2 at near-saturated pixels."""
    assert got is not None, f"{what}: no gradient reached the input"
    assert got.shape == expected.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient"
    err = (got.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert err <= tol and err <= 10 * tol * scale, f"{what}: max abs error {err:.3e} vs scale {scale:.3e}"


def check_module_against_reference(loss_fn, logits, labels, ref_loss, ref_grad, what="loss"):
    """float32 logits: loss within 1e-6, gradient within 1e-5 (see assert_grad_close).
    float64 logits, when the module keeps float64 (it may compute half/float32 inputs in float32
    only): the same quantities to 1e-12 / 1e-10, which pins down terms the float32 noise hides
    (e.g. the clipping of p ~ 1e-6)."""
    loss, grad = module_with_grad(loss_fn, logits.float(), labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32, (loss.shape, loss.dtype)
    assert_loss_close(loss, ref_loss, what=what + " (float32)")
    assert_grad_close(grad, ref_grad, what=what + " grad (float32)")
    loss64, grad64 = module_with_grad(loss_fn, logits.double(), labels)
    if loss64.dtype == torch.float64:
        assert_loss_close(loss64, ref_loss, tol=1e-12, what=what + " (float64)")
        assert_grad_close(grad64, ref_grad, tol=1e-11, what=what + " grad (float64)")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
B_, C_, H_, W_ = 2, 5, 7, 9  # all different


def make_case(seed: int = 0, B: int = B_, C: int = C_, h: int = H_, w: int = W_, scale: float = 3.0,
              absent_class: bool = False):
    """Random logits and labels with uniform patches, ignored pixels (255 and >= C, at borders
    and inside) and a few saturated pixels that exercise the 1e-4 clipping."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, C, h, w, generator=g)
    top = C - 1 if absent_class else C
    labels = torch.randint(0, top, (B, h, w), generator=g)
    # Uniform patches: plenty of non-edge pairs; their borders are closed edges.
    labels[0, :4, :5] = 1
    labels[0, 4:, 5:] = 3 % top
    labels[B - 1, 2:6, 3:8] = 2 % top
    labels[B - 1, :2, :] = 0
    # Ignored pixels: 255 and values >= C, at a corner, on a border and inside.
    labels[0, 0, w - 1] = IGNORE
    labels[0, 3, 4] = IGNORE
    labels[0, h - 1, 2] = C           # >= C counts as ignored
    labels[B - 1, 4, 0] = C + 7
    labels[B - 1, 3, 5] = IGNORE
    # Saturated predictions: p ~ 1 and p ~ 1e-13 (clipping active for p, q, 1-p, 1-q).
    logits[0, :, 1, 1] = -15.0
    logits[0, 1, 1, 1] = 15.0
    logits[B - 1, :, 5, 6] = -15.0
    logits[B - 1, 2, 5, 6] = 15.0
    return logits, labels


def upsample_labels_with_noise(labels: torch.Tensor, s: int, num_classes: int, seed: int = 1):
    """A label map s times larger whose pixel (s*i, s*j) is labels[i, j] and every other pixel is
    random (so any other pick, pooling or interpolation gives a different loss)."""
    g = torch.Generator().manual_seed(seed)
    B, h, w = labels.shape
    big = torch.randint(0, num_classes, (B, s * h, s * w), generator=g)
    big[:, ::s, ::s] = labels
    return big


# =============================================================================================
# Eq. (7): AffinityFieldLoss against the literal loop reference
# =============================================================================================
@pytest.mark.parametrize("kernel_sizes", [(3,), (5,), (7,), (3, 5)])
def test_affinity_matches_loop_reference(kernel_sizes):
    """Catches: wrong KL formula/direction of terms, probabilities vs log-probabilities, missing or
    wrong clipping, edge decided on labels instead of per one-hot channel, full k x k patch instead
    of the dilated 8-neighbour stencil, torch.roll wrap-around at borders, ignored pairs counted
    (255 and >= C), one mean over edge+non-edge or a per-image mean, wrong sum over sizes, layout
    mix-ups (B, C, h, w all differ), gradient stopped at the neighbour."""
    logits, labels = make_case(seed=0)
    ref, ref_grad, stats = reference_with_grad(ref_affinity, logits, labels.tolist(), kernel_sizes)
    # The inputs must exercise both sets and both sides of the hinge, or the test proves little.
    for k in kernel_sizes:
        st = stats[k]
        assert st["edge_n"] > 50 and st["nonedge_n"] > 50, st
        assert 0.05 * st["edge_n"] < st["beyond_margin"] < 0.95 * st["edge_n"], st
    check_module_against_reference(losses.AffinityFieldLoss(C_, kernel_sizes=kernel_sizes),
                                   logits, labels, ref, ref_grad)


@pytest.mark.parametrize("s", [2, 8])
def test_affinity_labels_at_higher_resolution(s):
    """Labels [B, s*h, s*w] are reduced by the nearest pick (s*i, s*j) (docs/protocol.md §1). Catches pooling,
    interpolation with another alignment (centre pick), or a transposed pick."""
    logits, labels = make_case(seed=3)
    big = upsample_labels_with_noise(labels, s, C_)
    ref, ref_grad, _ = reference_with_grad(ref_affinity, logits, big.tolist(), (3,))
    check_module_against_reference(losses.AffinityFieldLoss(C_), logits, big, ref, ref_grad)


def test_affinity_lambdas():
    """lambda_edge scales the edge mean and lambda_nonedge the non-edge mean (not swapped, not
    applied once to the sum)."""
    logits, labels = make_case(seed=4)
    kw = dict(lambda_edge=0.3, lambda_nonedge=1.7)
    ref, ref_grad, _ = reference_with_grad(ref_affinity, logits, labels.tolist(), (3, 5), **kw)
    check_module_against_reference(losses.AffinityFieldLoss(C_, kernel_sizes=(3, 5), **kw),
                                   logits, labels, ref, ref_grad)


def test_affinity_margin_and_channels_last():
    """A non-default margin is honoured, and a channels-last logits tensor (same values, other
    strides) gives the same result: catches code that assumes contiguous NCHW storage."""
    logits, labels = make_case(seed=5)
    ref, ref_grad, _ = reference_with_grad(ref_affinity, logits, labels.tolist(), (3,), margin=1.5)
    x = logits.to(memory_format=torch.channels_last)
    check_module_against_reference(losses.AffinityFieldLoss(C_, margin=1.5), x, labels, ref, ref_grad)


def test_affinity_clipping_at_saturation():
    """Half the probabilities below 1e-4 and many above 1 - 1e-4: the clipping of p, q, 1-p, 1-q
    dominates. Catches the subtle clipping variants that a random case barely sees: the leading
    factor q (or 1-q) left unclipped (~1.2e-4 off here) and complements taken from the clipped p,
    1 - clip(p) (~7e-5 off). The float32 tolerance is 1e-5 relative because 1 - p loses digits in
    float32 near p = 1 (observed error ~1e-6); the float64 check is exact to rounding."""
    g = torch.Generator().manual_seed(9)
    logits = 12.0 * torch.randn(3, 4, 5, 6, generator=g)
    labels = torch.randint(0, 4, (3, 5, 6), generator=g)
    labels[0, 1, 1] = IGNORE
    labels[2, 4, 5] = 9
    ref, ref_grad, _ = reference_with_grad(ref_affinity, logits, labels.tolist(), (3,))
    loss_fn = losses.AffinityFieldLoss(4)
    loss, grad = module_with_grad(loss_fn, logits, labels)
    assert_loss_close(loss, ref, tol=1e-5, what="saturated (float32)")
    assert_grad_close(grad, ref_grad, what="saturated grad (float32)")
    loss64, grad64 = module_with_grad(loss_fn, logits.double(), labels)
    if loss64.dtype == torch.float64:
        assert_loss_close(loss64, ref, tol=1e-12, what="saturated (float64)")
        assert_grad_close(grad64, ref_grad, tol=1e-11, what="saturated grad (float64)")


def test_affinity_hand_example_edge_channels():
    """Two pixels, labels 0 and 1, C = 4: each ordered pair is an edge in channels 0 and 1 and a
    non-edge in channels 2 and 3 (docs/protocol.md §2), so 4 edge and 4 non-edge elements. Written out by hand."""
    z = torch.tensor([[[[2.0, -1.0]], [[0.5, 1.5]], [[-1.0, 0.0]], [[0.0, 0.3]]]])  # [1, 4, 1, 2]
    labels = torch.tensor([[[0, 1]]])
    P = torch.softmax(z.double(), dim=1)[0, :, 0, :]  # [4, 2]

    def kl(q, p):  # KL(q || p), nothing clipped at these values
        return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))

    edge, nonedge = [], []
    for i, j in ((0, 1), (1, 0)):
        for c in range(4):
            d = kl(float(P[c, j]), float(P[c, i]))
            if c in (0, 1):
                edge.append(max(0.0, MARGIN - d))
            else:
                nonedge.append(d)
    expected = sum(edge) / 4 + sum(nonedge) / 4
    got = losses.AffinityFieldLoss(4)(z, labels)
    assert_loss_close(got, expected)


# =============================================================================================
# Gradient direction (paper Sec. 3.2: pull same-label pixels, push others to the margin)
# =============================================================================================
def _pair_probs(x):
    p = torch.softmax(x.double(), dim=1)
    return p[0, :, 0, 0], p[0, :, 0, 1]


def test_same_label_pair_is_pulled_together():
    """Two pixels with the same label: descent steps reduce |p_i - p_j| (per class summed) and the
    loss. A sign error or an edge/non-edge swap pushes them apart instead."""
    x = torch.tensor([[[[1.5, -0.5]], [[0.0, 1.0]], [[-1.0, 0.2]]]], requires_grad=True)  # [1,3,1,2]
    labels = torch.tensor([[[2, 2]]])
    loss_fn = losses.AffinityFieldLoss(3)
    prev_loss, prev_dist = None, None
    for _ in range(5):
        loss = loss_fn(x, labels)
        pi, pj = _pair_probs(x.detach())
        dist = (pi - pj).abs().sum().item()
        if prev_loss is not None:
            assert loss.item() < prev_loss and dist < prev_dist, (loss.item(), prev_loss, dist, prev_dist)
        prev_loss, prev_dist = loss.item(), dist
        x.grad = None
        loss.backward()
        assert x.grad.abs().sum() > 0
        with torch.no_grad():
            x -= 0.5 * x.grad


def test_different_label_pair_is_pushed_to_the_margin_then_left_alone():
    """Two pixels with labels 0 and 1, C = 2 (both channels are edges, no non-edge element):
    descent increases KL and separates the pixels until KL >= m in both directions; from then on the
    loss is exactly 0 and so is the gradient (the hinge is flat)."""
    x = torch.tensor([[[[0.3, 0.0]], [[0.0, 0.3]]]], requires_grad=True)  # [1, 2, 1, 2]
    labels = torch.tensor([[[0, 1]]])
    loss_fn = losses.AffinityFieldLoss(2)
    prev = None
    reached = False
    for step in range(200):
        loss = loss_fn(x, labels)
        pi, pj = _pair_probs(x.detach())
        # pushed apart in the right direction (no overshoot that swaps the two pixels): class 0
        # rises at pixel i (label 0) and falls at pixel j (label 1) at every step
        if prev is not None:
            assert pi[0] > prev[0] and pj[0] < prev[1], f"step {step}: {prev} -> {(pi[0], pj[0])}"
        prev = (pi[0], pj[0])
        x.grad = None
        loss.backward()
        if loss.item() == 0.0:
            reached = True
            break
        with torch.no_grad():
            x -= 0.5 * x.grad
    assert reached, f"KL never reached the margin, loss {loss.item()}"
    # Both directed KLs are at or beyond the margin now ...
    pi, pj = _pair_probs(x.detach())
    for c in range(2):
        for p, q in ((pi[c], pj[c]), (pj[c], pi[c])):
            p, q = float(p), float(q)
            assert q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)) >= MARGIN - 1e-5
    # ... so the term is flat: exactly zero gradient.
    assert torch.equal(x.grad, torch.zeros_like(x))
    # And well beyond the margin as well.
    far = torch.tensor([[[[8.0, -8.0]], [[-8.0, 8.0]]]], requires_grad=True)
    loss = loss_fn(far, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(far.grad, torch.zeros_like(far))


def test_edge_pair_below_margin_gets_pushed():
    """Just below the margin the hinge is active: the gradient is non-zero and a step raises KL."""
    x = torch.tensor([[[[1.2, -1.2]], [[-1.2, 1.2]]]], requires_grad=True)
    labels = torch.tensor([[[0, 1]]])
    loss = losses.AffinityFieldLoss(2)(x, labels)
    assert 0 < loss.item() < MARGIN
    loss.backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        x2 = x - 0.1 * x.grad
    assert losses.AffinityFieldLoss(2)(x2, labels).item() < loss.item()
    # descent on logits of pixel 0 raises class 0 there (it is class 0's pixel) and lowers it at pixel 1
    assert x.grad[0, 0, 0, 0] < 0 and x.grad[0, 0, 0, 1] > 0


# =============================================================================================
# Empty sets (docs/protocol.md §2: an empty set contributes 0; the official code gives NaN)
# =============================================================================================
def _assert_finite_grad(loss_fn, logits, labels):
    loss, grad = module_with_grad(loss_fn, logits, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    return loss, grad


def test_no_edge_pairs_single_label():
    """All pixels one label: no edge element; the loss is the non-edge mean alone (edge term 0,
    not NaN) and the gradients are finite."""
    logits, _ = make_case(seed=6)
    labels = torch.full((B_, H_, W_), 2, dtype=torch.long)
    ref, ref_grad, stats = reference_with_grad(ref_affinity, logits, labels.tolist(), (3,))
    assert stats[3]["edge_n"] == 0
    _assert_finite_grad(losses.AffinityFieldLoss(C_), logits, labels)
    check_module_against_reference(losses.AffinityFieldLoss(C_), logits, labels, ref, ref_grad)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5))
    _assert_finite_grad(aaf, logits, labels)


def test_no_nonedge_elements():
    """Two pixels, labels 0 and 1, C = 2: every element is an edge; the non-edge mean is 0."""
    z = torch.tensor([[[[0.4, -0.2]], [[0.1, 0.5]]]])
    labels = torch.tensor([[[0, 1]]])
    ref, ref_grad, stats = reference_with_grad(ref_affinity, z, labels.tolist(), (3,))
    assert stats[3]["nonedge_n"] == 0 and stats[3]["edge_n"] == 4
    _assert_finite_grad(losses.AffinityFieldLoss(2), z, labels)
    check_module_against_reference(losses.AffinityFieldLoss(2), z, labels, ref, ref_grad)


@pytest.mark.parametrize("fill", [IGNORE, C_, C_ + 40])
def test_all_pixels_ignored(fill):
    """Every pixel ignored (255 or >= C): all losses are exactly 0 with finite (zero) gradients."""
    logits, _ = make_case(seed=7)
    labels = torch.full((B_, H_, W_), fill, dtype=torch.long)
    for fn in (losses.AffinityFieldLoss(C_, kernel_sizes=(3, 5)),
               losses.AdaptiveAffinityFieldLoss(C_),
               lambda x, y: losses.unary_loss(x, y)):
        loss, grad = _assert_finite_grad(fn, logits, labels)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_kernel_larger_than_map():
    """A 7x7 field (s = 3) on a 2x3 map has no pair inside the image: loss 0, finite gradients.
    Catches padding or wrap-around that would invent pairs."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 4, 2, 3, generator=g)
    labels = torch.randint(0, 4, (2, 2, 3), generator=g)
    loss, grad = _assert_finite_grad(losses.AffinityFieldLoss(4, kernel_sizes=(7,)), logits, labels)
    assert loss.item() == 0.0
    aaf = losses.AdaptiveAffinityFieldLoss(4, kernel_sizes=(3, 7))
    ref, _, _ = reference_with_grad(ref_affinity, logits, labels.tolist(), (3,))
    loss = aaf(logits, labels)  # size 7 contributes 0; size 3 weighted 1/2 at init
    assert_loss_close(loss, 0.5 * ref)


# =============================================================================================
# Eqs. (8)-(10): AdaptiveAffinityFieldLoss
# =============================================================================================
def _set_aaf_logits(aaf, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        aaf.edge_logits.copy_(1.5 * torch.randn(aaf.edge_logits.shape, generator=g))
        aaf.nonedge_logits.copy_(1.5 * torch.randn(aaf.nonedge_logits.shape, generator=g))


@pytest.mark.parametrize("kernel_sizes", [(3, 5, 7), (3, 5)])
def test_aaf_matches_loop_reference(kernel_sizes):
    """Eq. (10) with arbitrary weights: each element weighted by w[y_centre, k] (softmax over K),
    divided by the count of its own size's set. With unequal weights the KL direction matters
    (the two directed elements of a pair carry different weights), so this also catches
    KL(centre || neighbour), weights picked by the neighbour's class, softmax over classes instead
    of sizes, and edge/non-edge weights swapped. Gradients checked for logits and weight logits."""
    logits, labels = make_case(seed=10)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=kernel_sizes)
    _set_aaf_logits(aaf, seed=11)
    ae = aaf.edge_logits.detach().double().requires_grad_(True)
    an = aaf.nonedge_logits.detach().double().requires_grad_(True)
    nest2 = lambda t: [list(r.unbind()) for r in t.unbind()]  # noqa: E731

    def ref_fn(z, lab):
        return ref_affinity(z, lab, kernel_sizes, w_edge=ref_simplex(nest2(ae)),
                            w_nonedge=ref_simplex(nest2(an)))

    ref, ref_grad, _ = reference_with_grad(ref_fn, logits, labels.tolist())
    # The inputs must make the KL direction visible: weighting by the neighbour's class (the same
    # as swapping centre and neighbour in the KL, the ordered pairs being symmetric) moves the
    # value far beyond the tolerance.
    wrong = _ref_aaf_weight_by_neighbour(logits.double().tolist(), labels.tolist(), kernel_sizes,
                                         _weights_by_loops(aaf.edge_logits), _weights_by_loops(aaf.nonedge_logits))
    assert abs(wrong - ref) > 1e-3
    # float32 module and input; then a float64 copy of the module (same weight-logit values) on
    # float64 input, which must agree to rounding when the module keeps float64.
    for mod, dtype, tol_loss, tol_grad in ((aaf, torch.float32, 1e-6, 1e-5),
                                           (copy.deepcopy(aaf).double(), torch.float64, 1e-12, 1e-11)):
        x = logits.detach().to(dtype).clone().requires_grad_(True)
        loss = mod(x, labels)
        loss.backward()
        if dtype == torch.float32:
            assert loss.dim() == 0 and loss.dtype == torch.float32
        elif loss.dtype != torch.float64:
            continue  # the module computes float64 inputs in float32: the float32 check stands
        assert_loss_close(loss, ref, tol=tol_loss, what=f"AAF ({dtype})")
        assert_grad_close(x.grad, ref_grad, tol=tol_grad, what=f"d/d logits ({dtype})")
        assert_grad_close(mod.edge_logits.grad, ae.grad, tol=tol_grad, what=f"d/d edge_logits ({dtype})")
        assert_grad_close(mod.nonedge_logits.grad, an.grad, tol=tol_grad, what=f"d/d nonedge_logits ({dtype})")


def _ref_aaf_weight_by_neighbour(z, labels, kernel_sizes, w_edge, w_nonedge):
    """Eq. (10) with the WRONG weight owner (neighbour's class); only to show that the AAF test
    inputs can tell the two apart.
    Since the set of ordered pairs is symmetric, this equals the correct owner with KL(p || q)."""
    B, C, h, w = _shape4(z)
    P = ref_softmax(z)
    total = 0.0
    for ki, k in enumerate(kernel_sizes):
        es, en, ns, nn_ = 0.0, 0, 0.0, 0
        for b in range(B):
            for yi in range(h):
                for xi in range(w):
                    li = labels[b][yi][xi]
                    if not _valid(li, C):
                        continue
                    for dy, dx in ref_stencil(k):
                        yj, xj = yi + dy, xi + dx
                        if not (0 <= yj < h and 0 <= xj < w) or not _valid(labels[b][yj][xj], C):
                            continue
                        lj = labels[b][yj][xj]
                        for c in range(C):
                            p, q = P[b][c][yi][xi], P[b][c][yj][xj]
                            pc, qc, npc, nqc = _clip(p), _clip(q), _clip(1 - p), _clip(1 - q)
                            kl = qc * math.log(qc / pc) + nqc * math.log(nqc / npc)
                            if (li == c) != (lj == c):
                                es += w_edge[lj][ki] * max(0.0, MARGIN - kl)
                                en += 1
                            else:
                                ns += w_nonedge[lj][ki] * kl
                                nn_ += 1
        total += (es / en if en else 0.0) + (ns / nn_ if nn_ else 0.0)
    return total


def test_aaf_at_init_is_mean_of_affinity_terms():
    """Zero-initialised logits give w = 1/K, so AAF(init) = (1/K) sum_k Affinity_k (docs/protocol.md §3), checked
    against the loop reference and against AffinityFieldLoss(kernel_sizes=(k,))."""
    logits, labels = make_case(seed=12)
    sizes = (3, 5, 7)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=sizes)
    assert torch.equal(aaf.edge_logits, torch.zeros(C_, 3)) and torch.equal(aaf.nonedge_logits, torch.zeros(C_, 3))
    per_size = [ref_affinity(logits.double().tolist(), labels.tolist(), (k,))[0] for k in sizes]
    expected = sum(per_size) / len(sizes)
    got = aaf(logits, labels)
    assert_loss_close(got, expected)
    modules = sum(float(losses.AffinityFieldLoss(C_, kernel_sizes=(k,))(logits, labels)) for k in sizes) / 3
    assert_loss_close(got, modules, what="AAF(init) vs mean of AffinityFieldLoss")


def _weights_by_loops(param) -> list[list[float]]:
    return ref_simplex(param.detach().double().tolist())


def test_aaf_ascent_step_moves_weights_towards_larger_loss():
    """One SGD(maximize=True) step from init: for each class c, the weight of size k grows exactly
    when that size's per-class term A[c, k] (sum over elements whose centre has class c, divided by
    the size's element count) is above the class's average over sizes, so the argmax moves to the
    size with the larger loss; a class that never occurs as a centre keeps uniform weights; the loss
    increases (the weights maximise, Eq. 9); the weights stay on the simplex; kernel_size_per_class
    is 5.0 at init and sum_k w[c, k] * k after the step."""
    sizes = (3, 5, 7)
    logits, labels = make_case(seed=13, absent_class=True)  # class C-1 never appears
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=sizes)
    edge_ks, nonedge_ks = aaf.kernel_size_per_class()
    assert edge_ks.shape == (C_,) and nonedge_ks.shape == (C_,)
    assert torch.allclose(edge_ks, torch.full((C_,), 5.0)) and torch.allclose(nonedge_ks, torch.full((C_,), 5.0))
    two = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5)).kernel_size_per_class()
    assert torch.allclose(two[0], torch.full((C_,), 4.0))

    _, stats = ref_affinity(logits.double().tolist(), labels.tolist(), sizes)
    opt = torch.optim.SGD(aaf.parameters(), lr=0.5, momentum=0.9, maximize=True)
    loss0 = aaf(logits, labels)
    loss0.backward()
    opt.step()
    loss1 = aaf(logits, labels)
    assert loss1.item() > loss0.item(), "the weights must ascend the loss"

    for name, param, key, cnt in (("edge", aaf.edge_logits, "edge_by_class", "edge_n"),
                                  ("nonedge", aaf.nonedge_logits, "nonedge_by_class", "nonedge_n")):
        w = _weights_by_loops(param)
        for c in range(C_):
            A = [stats[k][key][c] / stats[k][cnt] for k in sizes]
            if c == C_ - 1:
                assert all(v == 0 for v in A)
                assert all(abs(wk - 1 / 3) < 1e-7 for wk in w[c]), f"{name}: absent class {c} moved: {w[c]}"
                continue
            mean_a = sum(A) / 3
            for ki in range(3):
                assert (w[c][ki] > 1 / 3) == (A[ki] > mean_a), f"{name} c={c}: A={A}, w={w[c]}"
            assert max(range(3), key=lambda i: w[c][i]) == max(range(3), key=lambda i: A[i])
        # kernel_size_per_class after the step
        ks = aaf.kernel_size_per_class()[0 if name == "edge" else 1]
        for c in range(C_):
            assert abs(float(ks[c]) - sum(w[c][i] * sizes[i] for i in range(3))) < 1e-5

    # weights() (documented) are the same softmax rows, on the simplex
    we, wn = aaf.weights()
    for wt, param in ((we, aaf.edge_logits), (wn, aaf.nonedge_logits)):
        ref_w = torch.tensor(_weights_by_loops(param), dtype=torch.float64)
        assert torch.allclose(wt.double(), ref_w, atol=1e-7)


def test_aaf_weights_stay_on_simplex_after_many_ascent_steps():
    logits, labels = make_case(seed=14)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5, 7))
    opt = torch.optim.SGD(aaf.parameters(), lr=50.0, momentum=0.9, maximize=True)
    for _ in range(20):
        opt.zero_grad()
        aaf(logits, labels).backward()
        opt.step()
    for wt in aaf.weights():
        assert torch.isfinite(wt).all() and (wt >= 0).all()
        assert torch.allclose(wt.sum(dim=1), torch.ones(C_), atol=1e-6)
    for ks in aaf.kernel_size_per_class():
        assert ((ks >= 3 - 1e-5) & (ks <= 7 + 1e-5)).all()


def test_aaf_labels_at_higher_resolution():
    logits, labels = make_case(seed=15)
    big = upsample_labels_with_noise(labels, 8, C_)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5))
    _set_aaf_logits(aaf, seed=16)
    we, wn = _weights_by_loops(aaf.edge_logits), _weights_by_loops(aaf.nonedge_logits)
    ref, _ = ref_affinity(logits.double().tolist(), big.tolist(), (3, 5), w_edge=we, w_nonedge=wn)
    assert_loss_close(aaf(logits, big), ref)


# =============================================================================================
# Eq. (1) and the label pick
# =============================================================================================
@pytest.mark.parametrize("s", [1, 2])
def test_unary_loss_matches_loop_reference(s):
    """Mean of -log softmax over valid pixels only (255 and >= C excluded from sum and count).
    Catches: ignored pixels averaged in, labels >= C crashing or counted, log of probabilities
    vs log_softmax mix-ups, channel axis confusion."""
    logits, labels = make_case(seed=20)
    lab = upsample_labels_with_noise(labels, s, C_) if s > 1 else labels
    ref, ref_grad, _ = reference_with_grad(ref_unary, logits, lab.tolist())
    check_module_against_reference(lambda x, y: losses.unary_loss(x, y), logits, lab, ref, ref_grad)


def test_downsample_labels_nearest_pick():
    """out[b, i, j] = labels[b, s*i, s*j] (docs/protocol.md §1), for s = 8 (training) and s = 2, on a
    non-square map; the dtype is kept."""
    g = torch.Generator().manual_seed(21)
    for s, (h, w) in ((8, (3, 5)), (2, (4, 7)), (1, (4, 7))):
        labels = torch.randint(0, 256, (2, s * h, s * w), generator=g)
        out = losses.downsample_labels(labels, (h, w))
        assert out.shape == (2, h, w)
        for b in range(2):
            for i in range(h):
                for j in range(w):
                    assert out[b, i, j].item() == labels[b, s * i, s * j].item(), (s, b, i, j)


# =============================================================================================
# Eq. (4): RandomProjectionLoss, literal outer products vs the module's closed form
# =============================================================================================
def ref_random_projection(z, labels, weight, pad):
    """phi = the module's fixed conv (cross-correlation, zero padding, no bias) applied to the
    softmax P and to the one-hot Y, both zeroed at ignored pixels (module docstring); per valid
    pixel the explicit C x C matrices a a^T and b b^T and the squared Frobenius norm of their
    difference; mean over valid pixels (0 if none)."""
    B, C, h, w = _shape4(z)
    lab = ref_pick_labels(labels, h, w)
    P = ref_softmax(z)
    Co, Ci, kh, kw = len(weight), len(weight[0]), len(weight[0][0]), len(weight[0][0][0])
    Pm = [[[[P[b][c][y][x] if _valid(lab[b][y][x], C) else 0.0 for x in range(w)] for y in range(h)]
           for c in range(C)] for b in range(B)]
    Ym = [[[[1.0 if lab[b][y][x] == c and _valid(lab[b][y][x], C) else 0.0 for x in range(w)]
            for y in range(h)] for c in range(C)] for b in range(B)]

    def conv(X, b, o, y, x):
        acc = 0.0
        for ci in range(Ci):
            for u in range(kh):
                for v in range(kw):
                    yy, xx = y + u - pad, x + v - pad
                    if 0 <= yy < h and 0 <= xx < w and weight[o][ci][u][v] != 0.0:
                        val = X[b][ci][yy][xx]
                        if isinstance(val, torch.Tensor) or val != 0.0:
                            acc = acc + weight[o][ci][u][v] * val
        return acc

    total, n = 0.0, 0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                if not _valid(lab[b][y][x], C):
                    continue
                a = [conv(Pm, b, o, y, x) for o in range(Co)]
                bb = [conv(Ym, b, o, y, x) for o in range(Co)]
                fro = 0.0
                for r in range(Co):
                    for s in range(Co):
                        d = a[r] * a[s] - bb[r] * bb[s]  # (a a^T - b b^T)[r, s]
                        fro = fro + d * d
                total = total + fro
                n += 1
    return total / n if n else 0.0


def _projection_weight(mod) -> torch.Tensor:
    buffers = dict(mod.named_buffers())
    assert "weight" in buffers, f"expected the fixed conv weights as buffer 'weight', have {list(buffers)}"
    return buffers["weight"]


@pytest.mark.parametrize("C,seed", [(3, 30), (4, 31)])
def test_random_projection_closed_form_equals_outer_products(C, seed):
    """Catches: a wrong closed form (e.g. (a.a - b.b)^2 or a missing factor 2), projecting
    log-probabilities or logits, one-hot on the wrong axis, ignored pixels counted or not zeroed,
    a trained (non-fixed) projection, mean over the wrong set."""
    g = torch.Generator().manual_seed(seed)
    B, h, w = 2, 5, 6  # B, C (3 or 4), h, w all differ
    logits = 2.0 * torch.randn(B, C, h, w, generator=g)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[0, 1, 2] = IGNORE
    labels[1, 3, 5] = C + 1
    labels[1, 0, 0] = IGNORE
    mod = losses.RandomProjectionLoss(C)
    weight = _projection_weight(mod)
    assert weight.shape == (C, C, 5, 5)
    assert not any(p.requires_grad for p in mod.parameters()), "the projection must be fixed"
    ref, ref_grad, _ = reference_with_grad(ref_random_projection, logits, labels.tolist(),
                                           weight.double().tolist(), 2)
    check_module_against_reference(mod, logits, labels, ref, ref_grad)
    # fixed: same seed -> same weights; another seed -> other weights
    assert torch.equal(_projection_weight(losses.RandomProjectionLoss(C)), weight)
    assert not torch.equal(_projection_weight(losses.RandomProjectionLoss(C, seed=1)), weight)


def test_random_projection_ignored_pixels_do_not_matter():
    """Changing logits or the ignore value at ignored pixels changes nothing (they are zeroed in
    both maps and excluded from the mean)."""
    g = torch.Generator().manual_seed(32)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    labels = torch.randint(0, 3, (2, 5, 4), generator=g)
    labels[0, 2, 1] = IGNORE
    labels[1, 4, 3] = IGNORE
    mod = losses.RandomProjectionLoss(3)
    base = mod(logits, labels)
    other = logits.clone()
    other[0, :, 2, 1] = torch.tensor([9.0, -3.0, 1.0])
    other[1, :, 4, 3] = torch.tensor([-2.0, 7.0, 0.0])
    lab2 = labels.clone()
    lab2[lab2 == IGNORE] = 3 + 9
    assert torch.equal(mod(other, labels), base)
    assert torch.equal(mod(logits, lab2), base)


# =============================================================================================
# Eqs. (5)-(6): AdversarialProjection
# =============================================================================================
def _gan_case(seed=40, C=4, B=3, h=6, w=10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, h, w, generator=g)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[0, :2, :3] = IGNORE
    labels[1, h - 1, w - 1] = C + 2
    labels[B - 1, 3, 4] = IGNORE
    return logits, labels


def test_gan_discriminator_learns_on_fixed_fakes():
    """A few Adam steps on D alone, fixed predictions: D's loss goes down (it is a loss D can
    minimise, with the real/fake labels the right way round)."""
    torch.manual_seed(0)
    logits, labels = _gan_case(B=2, h=5, w=8)
    adv = losses.AdversarialProjection(4, width=16)
    opt = torch.optim.Adam(adv.parameters(), lr=3e-3)
    first = adv.discriminator_loss(logits, labels).item()
    for _ in range(10):
        opt.zero_grad()
        loss = adv.discriminator_loss(logits, labels)
        loss.backward()
        opt.step()
    last = adv.discriminator_loss(logits, labels).item()
    assert math.isfinite(first) and last < 0.8 * first, (first, last)


def test_gan_generator_loss_only_reaches_logits():
    """generator_loss: gradient into the logits, none into D (it must not change D)."""
    torch.manual_seed(1)
    logits, labels = _gan_case(seed=41)
    adv = losses.AdversarialProjection(4)
    before = {k: v.clone() for k, v in adv.state_dict().items()}
    x = logits.clone().requires_grad_(True)
    loss = adv.generator_loss(x, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in adv.named_parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad)), f"{name} got a gradient"
    for k, v in adv.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    # the parameters stay trainable for discriminator_loss afterwards
    assert all(p.requires_grad for p in adv.parameters())


def test_gan_discriminator_loss_does_not_reach_logits():
    torch.manual_seed(2)
    logits, labels = _gan_case(seed=42)
    adv = losses.AdversarialProjection(4)
    x = logits.clone().requires_grad_(True)
    loss = adv.discriminator_loss(x, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x.grad))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adv.parameters())


def test_gan_losses_match_documented_formulas():
    """Docstring: fake = softmax prediction, real = one-hot, both zeroed at ignored pixels;
    discriminator_loss = BCE(D(real), 1) + BCE(D(fake), 0); generator_loss = -log D(fake), each a
    mean over D's output patches. Written here with the module's own D (`disc`)."""
    torch.manual_seed(3)
    logits, labels = _gan_case(seed=43)
    adv = losses.AdversarialProjection(4)
    B, C, h, w = logits.shape
    fake = torch.zeros(B, C, h, w, dtype=torch.float64)
    real = torch.zeros(B, C, h, w, dtype=torch.float64)
    P = torch.softmax(logits.double(), dim=1)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                l = int(labels[b, y, x])
                if _valid(l, C):
                    fake[b, :, y, x] = P[b, :, y, x]
                    real[b, l, y, x] = 1.0
    with torch.no_grad():
        d_fake = adv.disc(fake.float()).double()
        d_real = adv.disc(real.float()).double()
    expected_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()  # -log s(r) - log(1 - s(f))
    expected_g = F.softplus(-d_fake).mean()  # -log s(f)
    assert_loss_close(adv.discriminator_loss(logits, labels), float(expected_d), tol=1e-5)
    assert_loss_close(adv.generator_loss(logits, labels), float(expected_g), tol=1e-5)


def test_gan_ignored_pixels_do_not_leak():
    """D must not tell real from fake by the ignored pixels: changing the predictions or the ignore
    value there changes neither D's inputs nor either loss."""
    torch.manual_seed(4)
    logits, labels = _gan_case(seed=44)
    adv = losses.AdversarialProjection(4)
    other = logits.clone()
    ign = ~((labels >= 0) & (labels < 4))  # [B, h, w]
    other.permute(0, 2, 3, 1)[ign] = 10.0 * torch.randn(int(ign.sum()), 4)
    lab2 = labels.clone()
    lab2[ign] = 17
    for fn in (adv.discriminator_loss, adv.generator_loss):
        base = fn(logits, labels)
        assert torch.equal(fn(other, labels), base)
        assert torch.equal(fn(logits, lab2), base)
    fake, real = adv._maps(logits, labels)  # documented (fake, real) D inputs
    assert torch.equal(fake.permute(0, 2, 3, 1)[ign], torch.zeros(int(ign.sum()), 4))
    assert torch.equal(real.permute(0, 2, 3, 1)[ign], torch.zeros(int(ign.sum()), 4))


# =============================================================================================
# "Emb." baseline: EmbeddingContrastiveLoss (Chopra et al. 2005) over the same stencil
# =============================================================================================
def ref_embedding(f, labels, kernel_size, margin, normalize, num_classes=None):
    """Docstring form: per directed pair (i, j = i + d) with both labels valid and
    d_ij = ||f_i - f_j||_2: same label 0.5 d^2, different 0.5 max(0, m - d)^2; mean over all pairs
    of the batch (0 if none). normalize: f_i / ||f_i||_2 per pixel first."""
    B, Fd, h, w = _shape4(f)
    lab = ref_pick_labels(labels, h, w)
    ncls = num_classes if num_classes is not None else 10 ** 9
    if normalize:
        g = [[[[None] * w for _ in range(h)] for _ in range(Fd)] for _ in range(B)]
        for b in range(B):
            for y in range(h):
                for x in range(w):
                    nrm = 0.0
                    for c in range(Fd):
                        nrm = nrm + f[b][c][y][x] * f[b][c][y][x]
                    nrm = _sqrt(nrm)
                    for c in range(Fd):
                        g[b][c][y][x] = f[b][c][y][x] / nrm
        f = g
    total, n = 0.0, 0
    for b in range(B):
        for yi in range(h):
            for xi in range(w):
                li = lab[b][yi][xi]
                if not _valid(li, ncls):
                    continue
                for dy, dx in ref_stencil(kernel_size):
                    yj, xj = yi + dy, xi + dx
                    if not (0 <= yj < h and 0 <= xj < w):
                        continue
                    lj = lab[b][yj][xj]
                    if not _valid(lj, ncls):
                        continue
                    d2 = 0.0
                    for c in range(Fd):
                        diff = f[b][c][yi][xi] - f[b][c][yj][xj]
                        d2 = d2 + diff * diff
                    if li == lj:
                        total = total + 0.5 * d2
                    else:
                        total = total + 0.5 * _hinge(margin - _sqrt(d2)) ** 2
                    n += 1
    return total / n if n else 0.0


@pytest.mark.parametrize("kernel_size,normalize,margin", [(3, True, 1.0), (5, True, 1.3), (3, False, 2.5)])
def test_embedding_contrastive_matches_loop_reference(kernel_size, normalize, margin):
    """Catches: squared vs plain distances, a missing 1/2, the hinge on d^2 instead of d, same/diff
    swapped, ignored or out-of-image pairs counted, wrong stencil, normalisation over the wrong axis."""
    g = torch.Generator().manual_seed(50)
    B, Fd, h, w = 2, 6, 5, 7
    feats = torch.randn(B, Fd, h, w, generator=g) * (0.4 if not normalize else 1.0)
    labels = torch.randint(0, 3, (B, h, w), generator=g)
    labels[0, :3, :3] = 1
    labels[0, 4, 6] = IGNORE
    labels[1, 2, 3] = IGNORE
    mod = losses.EmbeddingContrastiveLoss(margin=margin, kernel_size=kernel_size, normalize=normalize)
    ref, ref_grad, _ = reference_with_grad(ref_embedding, feats, labels.tolist(), kernel_size, margin, normalize)
    check_module_against_reference(mod, feats, labels, ref, ref_grad)


def test_embedding_labels_ge_num_classes_and_higher_resolution():
    g = torch.Generator().manual_seed(51)
    B, Fd, h, w = 3, 4, 5, 6
    feats = torch.randn(B, Fd, h, w, generator=g)
    labels = torch.randint(0, 5, (B, h, w), generator=g)  # 3 and 4 are >= num_classes=3
    big = upsample_labels_with_noise(labels, 2, 5)
    mod = losses.EmbeddingContrastiveLoss(margin=1.0, kernel_size=3, num_classes=3)
    ref = ref_embedding(feats.double().tolist(), big.tolist(), 3, 1.0, True, num_classes=3)
    assert_loss_close(mod(feats, big), ref)


def every_loss(aaf_seed: int, adv: "losses.AdversarialProjection") -> dict:
    """name -> loss(logits, labels) for every projection loss (and the unary term), at C_ classes;
    AAF gets non-uniform weights from `aaf_seed`, the GAN terms come from `adv`."""
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5))
    _set_aaf_logits(aaf, seed=aaf_seed)
    return {
        "affinity": losses.AffinityFieldLoss(C_, kernel_sizes=(3, 5)),
        "aaf": aaf,
        "unary": lambda x, y: losses.unary_loss(x, y),
        "random": losses.RandomProjectionLoss(C_),
        "gan_g": adv.generator_loss,
        "gan_d": adv.discriminator_loss,
        "emb": losses.EmbeddingContrastiveLoss(),
    }

# =============================================================================================
# Half precision: computed in float32 (float32 scalars even for bf16/fp16 logits)
# =============================================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_float32_result(dtype):
    """Each loss on half logits equals the float32 loss of the same rounded logits (the only
    difference allowed is the input rounding) and returns a float32 scalar. Catches computing
    softmax/KL in half (the 1e-4 clip is below fp16's resolution near 1, bf16 has 8 bits)."""
    logits, labels = make_case(seed=60)
    half = logits.to(dtype)
    rounded = half.float()
    cases = every_loss(aaf_seed=61, adv=losses.AdversarialProjection(C_))
    for name, fn in cases.items():
        x = half.clone().requires_grad_(True)
        got = fn(x, labels)
        expected = fn(rounded, labels)
        assert got.dtype == torch.float32 and got.dim() == 0, f"{name}: {got.dtype}"
        assert_loss_close(got, _value(expected), tol=1e-6, what=name)
        if got.requires_grad and name != "gan_d":
            got.backward()
            assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name
    # and the half result of the affinity loss is the loop reference on the rounded values
    ref, _ = ref_affinity(rounded.double().tolist(), labels.tolist(), (3, 5))
    assert_loss_close(cases["affinity"](half, labels), ref)


def test_affinity_hand_written_backward_passes_gradcheck():
    """The custom autograd.Function's backward against finite differences (float64), on the
    per-class sums themselves (both edge and non-edge outputs, several sizes, ignored pixels)."""
    gen = torch.Generator().manual_seed(7)
    B, C, h, w = 2, 4, 6, 7
    logits = torch.randn(B, C, h, w, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (B, h, w), generator=gen)
    labels[:, 2:4, 2:5] = 1
    labels[0, 0, :3] = 255
    labels[1, 5, 6] = C + 3
    lab = losses._labels_at(labels, logits, 255)
    prob = logits.softmax(1).requires_grad_()

    def sums(p):
        edge, nonedge, _, _ = losses._AffinityFieldSums.apply(p, lab, (3, 5), 3.0)
        return edge, nonedge

    assert torch.autograd.gradcheck(sums, (prob,), eps=1e-6, atol=1e-7)


def test_the_modules_own_backward_passes_gradcheck():
    """The autograd path the loss modules use (gradient computed with the sums, backward scales it),
    against finite differences in float64: the logits of Affinity (3, 5) and of AAF (3, 5, 7), and
    AAF's two weight-logit tensors (non-uniform), with ignored pixels and a label >= C."""
    gen = torch.Generator().manual_seed(11)
    B, C, h, w = 2, 4, 6, 7
    logits = torch.randn(B, C, h, w, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, C, (B, h, w), generator=gen)
    labels[:, 2:4, 2:5] = 1
    labels[0, 0, :3] = 255
    labels[1, 5, 6] = C + 3
    affinity = losses.AffinityFieldLoss(C, kernel_sizes=(3, 5)).double()
    assert torch.autograd.gradcheck(lambda x: affinity(x, labels), (logits,), eps=1e-6, atol=1e-7)
    aaf = losses.AdaptiveAffinityFieldLoss(C, kernel_sizes=(3, 5, 7)).double()
    edge = torch.randn(C, 3, generator=gen, dtype=torch.float64).requires_grad_()
    nonedge = torch.randn(C, 3, generator=gen, dtype=torch.float64).requires_grad_()

    def aaf_loss(x, e, n):
        return torch.func.functional_call(aaf, {"edge_logits": e, "nonedge_logits": n}, (x, labels))

    assert torch.autograd.gradcheck(aaf_loss, (logits, edge, nonedge), eps=1e-6, atol=1e-7)


def test_double_backward_through_the_affinity_losses_is_an_error_not_zero():
    """The backward is first-order only; a gradient penalty (create_graph=True) must fail loudly
    rather than differentiate a constant."""
    logits = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 6))
    for loss in (losses.AffinityFieldLoss(3).double(), losses.AdaptiveAffinityFieldLoss(3).double()):
        with pytest.raises(RuntimeError, match="first-order gradients only"):
            torch.autograd.grad(loss(logits, labels), logits, create_graph=True)
        (grad,) = torch.autograd.grad(loss(logits, labels), logits)     # first order: fine
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_downsample_labels_picks_stride_8_for_sides_not_multiple_of_8():
    """A stride-8 network gives ceil(H/8) logits for any H; label pixel (8i, 8j) belongs to logit (i, j)."""
    for H, W in [(17, 23), (41, 50), (55, 33), (57, 60), (9, 31)]:
        h, w = -(-H // 8), -(-W // 8)
        labels = torch.arange(H * W).view(1, H, W)
        out = losses.downsample_labels(labels, (h, w))
        expected = torch.tensor([[[(8 * i) * W + 8 * j for j in range(w)] for i in range(h)]])
        assert torch.equal(out, expected), (H, W)
    with pytest.raises(ValueError):
        losses.downsample_labels(torch.zeros(1, 20, 20, dtype=torch.long), (6, 6))   # 6 divides not 20, ceil(20/8) = 3


# =============================================================================================
# Gradient accumulation: the mean's denominator of the whole optimizer batch (counts=...)
# =============================================================================================
def _micro_case(seed=70):
    """B = 3 split into micro-batches [0:2] and [2:3] with different numbers of ignored pixels
    and of edges (the second one is mostly one label, with an ignored block)."""
    logits, labels = make_case(seed=seed, B=3)
    labels[2, :, :6] = 1
    labels[2, 1:4, 6:] = IGNORE
    return logits, labels, (slice(0, 2), slice(2, 3))


def _accumulated(fn, counts, logits, labels, parts, params=()):
    """sum over micro-batches of fn(x_part, labels_part, counts_total) and the gradients."""
    x = logits.detach().clone().requires_grad_(True)
    total = sum(fn(x[p], labels[p], counts) for p in parts)
    grads = torch.autograd.grad(total, [x, *params])
    return total.detach(), grads


def _full(fn, logits, labels, params=()):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, None)
    return loss.detach(), torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("kernel_sizes", [(3,), (3, 5)])
def test_affinity_accumulation_with_total_counts_equals_full_batch(kernel_sizes):
    """sum over micro-batches of loss(part, counts=total) = loss(full batch), loss and gradient,
    against the loop reference; counts() are the reference's element counts and add up."""
    logits, labels, parts = _micro_case()
    mod = losses.AffinityFieldLoss(C_, kernel_sizes=kernel_sizes, lambda_edge=0.7, lambda_nonedge=1.3)
    counts = [mod.counts(labels[p], (H_, W_)) for p in parts]
    assert counts[0].dtype == torch.int64 and counts[0].shape == (2, len(kernel_sizes))
    assert not torch.equal(counts[0], counts[1])
    total = counts[0] + counts[1]
    ref, ref_grad, stats = reference_with_grad(ref_affinity, logits.double(), labels.tolist(), kernel_sizes,
                                               lambda_edge=0.7, lambda_nonedge=1.3)
    assert total.tolist() == [[stats[k]["edge_n"] for k in kernel_sizes], [stats[k]["nonedge_n"] for k in kernel_sizes]]
    assert torch.equal(mod.counts(labels, (H_, W_)), total)
    fn = lambda x, y, n: mod(x, y, counts=n)  # noqa: E731
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        acc, (grad,) = _accumulated(fn, total, logits.to(dtype), labels, parts)
        full, (full_grad,) = _full(fn, logits.to(dtype), labels)
        assert_loss_close(acc, ref, tol=tol, what=f"accumulated ({dtype})")
        assert_loss_close(acc, float(full), tol=tol, what=f"accumulated vs full ({dtype})")
        assert_grad_close(grad, ref_grad, tol=10 * tol, what=f"accumulated grad ({dtype})")
        assert torch.allclose(grad, full_grad, rtol=0, atol=10 * tol)
    # without the total counts each micro-batch is its own mean: a different (wrong) sum
    wrong = sum(float(mod(logits[p], labels[p])) for p in parts)
    assert abs(wrong - ref) > 1e-3


def test_aaf_accumulation_with_total_counts_equals_full_batch():
    """AAF: the same for the loss, the logits' and the weight logits' gradients (the weights
    ascend on the sum of the micro-batch gradients), against the loop reference."""
    logits, labels, parts = _micro_case(seed=71)
    sizes = (3, 5)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=sizes).double()
    _set_aaf_logits(aaf, seed=72)
    params = (aaf.edge_logits, aaf.nonedge_logits)
    total = sum(aaf.counts(labels[p], (H_, W_)) for p in parts)
    fn = lambda x, y, n: aaf(x, y, counts=n)  # noqa: E731
    acc, (grad, g_e, g_n) = _accumulated(fn, total, logits.double(), labels, parts, params)
    full, (full_grad, f_e, f_n) = _full(fn, logits.double(), labels, params)
    we, wn = _weights_by_loops(aaf.edge_logits), _weights_by_loops(aaf.nonedge_logits)
    ref, _ = ref_affinity(logits.double().tolist(), labels.tolist(), sizes, w_edge=we, w_nonedge=wn)
    assert_loss_close(acc, ref, tol=1e-12)
    assert_loss_close(acc, float(full), tol=1e-12)
    for a, b in ((grad, full_grad), (g_e, f_e), (g_n, f_n)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12) and b.abs().max() > 1e-4


def test_unary_projection_embedding_accumulation_with_total_counts():
    """unary_loss(count=valid_count total), RandomProjectionLoss and EmbeddingContrastiveLoss
    (counts=sum of counts()): the micro-batch sum equals the full batch (and the references)."""
    logits, labels, parts = _micro_case(seed=73)
    big = upsample_labels_with_noise(labels, 2, C_)                    # counts pick labels down too
    n = [losses.valid_count(big[p], C_, size=(H_, W_)) for p in parts]
    assert n[0].dtype == torch.int64 and n[0].dim() == 0 and int(n[0]) != int(n[1])
    assert int(n[0] + n[1]) == int(losses.valid_count(labels, C_))
    proj = losses.RandomProjectionLoss(C_)
    emb = losses.EmbeddingContrastiveLoss(margin=1.0, kernel_size=3)
    cases = {
        "unary": (lambda x, y, c: losses.unary_loss(x, y, count=c), sum(n), lambda z, y: ref_unary(z, y)),
        "random": (lambda x, y, c: proj(x, y, counts=c), sum(proj.counts(big[p], (H_, W_)) for p in parts),
                   lambda z, y: ref_random_projection(z, y, _projection_weight(proj).double().tolist(), 2)),
        "embedding": (lambda x, y, c: emb(x, y, counts=c), sum(emb.counts(big[p], (H_, W_)) for p in parts),
                      lambda z, y: ref_embedding(z, y, 3, 1.0, True)),
    }
    for name, (fn, total, ref_fn) in cases.items():
        acc, (grad,) = _accumulated(fn, total, logits.double(), labels, parts)
        full, (full_grad,) = _full(fn, logits.double(), labels)
        ref, ref_grad, _ = reference_with_grad(ref_fn, logits.double(), labels.tolist())
        assert_loss_close(acc, ref, tol=1e-12, what=name)
        assert_loss_close(acc, float(full), tol=1e-12, what=name)
        assert_grad_close(grad, ref_grad, tol=1e-11, what=name)
        assert torch.allclose(grad, full_grad, rtol=0, atol=1e-12), name
        wrong = sum(float(fn(logits.double()[p], labels[p], None)) for p in parts)
        assert abs(wrong - ref) > 1e-3, name


# =============================================================================================
# Autocast does not reach inside the losses (they promise float32)
# =============================================================================================
def test_losses_under_cpu_bf16_autocast_equal_float32_eager():
    """Under torch.autocast("cpu", bfloat16) each loss and its gradient equal the float32 result
    without autocast to float32 precision: catches the random projection's convolution or the
    GAN discriminator (or the affinity field's contractions) running in bf16 (~1e-3 off)."""
    logits, labels = make_case(seed=80)
    torch.manual_seed(82)
    adv = losses.AdversarialProjection(C_, width=16)
    cases = every_loss(aaf_seed=81, adv=adv)
    for name, fn in cases.items():
        params = list(adv.disc.parameters()) if name == "gan_d" else [torch.zeros(())]
        results = []
        for enabled in (False, True):
            x = logits.clone().requires_grad_(name != "gan_d")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = fn(x, labels)
            assert loss.dtype == torch.float32, (name, loss.dtype)
            grads = torch.autograd.grad(loss, [x] if name != "gan_d" else params, allow_unused=True)
            results.append((loss.detach(), grads))
        (ref, ref_grads), (got, got_grads) = results
        assert_loss_close(got, float(ref), tol=1e-6, what=name)
        for g, r in zip(got_grads, ref_grads):
            if r is not None:
                assert torch.allclose(g, r, rtol=1e-5, atol=1e-7), (name, (g - r).abs().max())


# =============================================================================================
# torch.compile(fullgraph=True) of the affinity losses (one small compile: marked "compile")
# =============================================================================================
@pytest.mark.compile
def test_affinity_losses_compile_fullgraph_equal_eager():
    """AffinityFieldLoss and AdaptiveAffinityFieldLoss traced together in one fullgraph compile
    (no graph break allowed) give the eager losses and gradients (logits and AAF weights)."""
    logits, labels = make_case(seed=90)
    aff = losses.AffinityFieldLoss(C_, kernel_sizes=(3, 5))
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5))
    _set_aaf_logits(aaf, seed=91)
    both = lambda x, y: (aff(x, y), aaf(x, y))  # noqa: E731
    compiled = torch.compile(both, fullgraph=True)
    params = [aaf.edge_logits, aaf.nonedge_logits]
    results = []
    for fn in (both, compiled):
        x = logits.clone().requires_grad_(True)
        l_aff, l_aaf = fn(x, labels)
        g_aff = torch.autograd.grad(l_aff, x, retain_graph=True)[0]
        g_aaf = torch.autograd.grad(l_aaf, [x, *params])
        results.append(((l_aff.detach(), l_aaf.detach()), (g_aff, *g_aaf)))
    (ref_l, ref_g), (got_l, got_g) = results
    for a, b in zip(got_l, ref_l):
        assert_loss_close(a, float(b), tol=1e-6)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7) and b.abs().max() > 0


# =============================================================================================
# losses.affinity_field_reference: the readable Eq. (7) / (10) equals the fused engine
# =============================================================================================
def _blocky_case(B, C, h, w, seed, block=3):
    """float64 logits and blocky labels (edges and non-edges both common) with 255 and >= C."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B, -(-h // block), -(-w // block)), generator=g)
    labels = labels.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w].contiguous()
    labels[0, 0, :] = IGNORE                                            # an ignored border row
    labels[B - 1, h // 2, w // 2] = C + 2                               # >= C: ignored
    return logits, labels


def _assert_same(got, ref, what, tol=1e-10):
    """|got - ref| <= tol * max(1, |ref|) elementwise scale (float64 rounding is ~1e-16)."""
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{what}: max error {err:.3e}"


@pytest.mark.parametrize("shape", [(8, 21, 42, 42), (2, 19, 90, 90), (2, 5, 7, 9), (3, 4, 1, 6), (1, 3, 5, 2)],
                         ids=["voc-336", "cityscapes-720", "odd-7x9", "one-row", "narrow"])
def test_fused_equals_reference(shape):
    """AffinityFieldLoss (3) and (3, 5, 7) and AdaptiveAffinityFieldLoss (3, 5, 7) with uneven
    weights against losses.affinity_field_reference: loss and gradients (logits, AAF weight logits)
    in float64 to 1e-10, at the VOC and Cityscapes crops (stride 8) and on small odd shapes."""
    B, C, h, w = shape
    logits, labels = _blocky_case(B, C, h, w, seed=sum(shape))
    for sizes in ((3,), (3, 5, 7)):
        x = logits.clone().requires_grad_(True)
        fused = losses.AffinityFieldLoss(C, kernel_sizes=sizes).double()(x, labels)
        (g_fused,) = torch.autograd.grad(fused, x)
        ref = losses.affinity_field_reference(x, labels, sizes)
        (g_ref,) = torch.autograd.grad(ref, x)
        _assert_same(fused, ref, f"affinity {sizes} loss")
        _assert_same(g_fused, g_ref, f"affinity {sizes} grad")
    if h * w > 1:
        assert g_ref.abs().max() > 0 and fused > 0, "the case must exercise the loss"
    aaf = losses.AdaptiveAffinityFieldLoss(C, kernel_sizes=(3, 5, 7)).double()
    _set_aaf_logits(aaf, seed=B + C)
    params = [x, aaf.edge_logits, aaf.nonedge_logits]
    fused = aaf(x, labels)
    ref = losses.affinity_field_reference(x, labels, (3, 5, 7), 3.0, IGNORE, *aaf.weights())
    for a, b, name in zip(torch.autograd.grad(fused, params), torch.autograd.grad(ref, params),
                          ("logits", "edge_logits", "nonedge_logits")):
        _assert_same(a, b, f"AAF grad {name}")
    _assert_same(fused, ref, "AAF loss")


def test_reference_matches_loop_reference():
    """The readable reference itself against the literal loops (Affinity and AAF, several sizes,
    labels at twice the logits' size), so the fused == reference test compares with a known truth."""
    logits, labels = make_case(seed=100)
    big = upsample_labels_with_noise(labels, 2, C_)
    for sizes in ((3,), (3, 5, 7)):
        ref, ref_grad, _ = reference_with_grad(ref_affinity, logits, labels.tolist(), sizes)
        x = logits.double().requires_grad_(True)
        got = losses.affinity_field_reference(x, big, sizes)
        got.backward()
        assert_loss_close(got, ref, tol=1e-12)
        assert_grad_close(x.grad, ref_grad, tol=1e-11)
    aaf = losses.AdaptiveAffinityFieldLoss(C_, kernel_sizes=(3, 5)).double()
    _set_aaf_logits(aaf, seed=101)
    we, wn = _weights_by_loops(aaf.edge_logits), _weights_by_loops(aaf.nonedge_logits)
    ref, _ = ref_affinity(logits.double().tolist(), labels.tolist(), (3, 5), w_edge=we, w_nonedge=wn)
    assert_loss_close(losses.affinity_field_reference(logits.double(), labels, (3, 5), 3.0, IGNORE,
                                                      *aaf.weights()), ref, tol=1e-12)


# =============================================================================================
# Binary (sigmoid) models: one-channel logits with num_classes=2 are the two channels (0, x)
# =============================================================================================
def _binary_case(seed=110, B=3, h=5, w=7):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(B, 1, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (B, h, w), generator=g)
    labels[:, 1:3, 2:5] = 1
    labels[0, 0, :3] = IGNORE
    labels[B - 1, h - 1, w - 1] = 2                                      # >= C: ignored
    return x, labels


def _two_class_fns(aaf_seed=111):
    """name -> fn(logits, labels) for every loss that takes class logits, at 2 classes."""
    aaf = losses.AdaptiveAffinityFieldLoss(2, kernel_sizes=(3, 5)).double()
    _set_aaf_logits(aaf, seed=aaf_seed)
    torch.manual_seed(aaf_seed)
    adv = losses.AdversarialProjection(2, width=8).double()
    return {
        "unary": lambda x, y: losses.unary_loss(x, y),
        "affinity": losses.AffinityFieldLoss(2, kernel_sizes=(3, 5)).double(),
        "aaf": aaf,
        "random": losses.RandomProjectionLoss(2).double(),
        "gan_g": adv.generator_loss,
        "gan_d": lambda x, y: adv.discriminator_loss(x, y) + 0 * x.sum(),   # reaches D only
    }


def test_binary_logits_equal_two_channel_logits():
    """Every loss on one-channel logits x equals the same loss on the two channels (0, x): value,
    and gradient of x = gradient of the second channel (float64). The unary term is also checked
    against the sigmoid cross-entropy by hand (so (x, 0) instead of (0, x) would fail)."""
    x, labels = _binary_case()
    two = torch.cat([torch.zeros_like(x), x], 1)
    for name, fn in _two_class_fns().items():
        a = x.clone().requires_grad_(True)
        b = two.clone().requires_grad_(True)
        la, lb = fn(a, labels), fn(b, labels)
        (ga,), (gb,) = torch.autograd.grad(la, a), torch.autograd.grad(lb, b)
        assert la.dtype == torch.float64 and la.item() != 0, name
        assert_loss_close(la, float(lb.detach()), tol=1e-12, what=name)
        assert torch.allclose(ga, gb[:, 1:], rtol=0, atol=1e-13), name
    valid = labels <= 1
    ref = F.binary_cross_entropy_with_logits(x[:, 0][valid], labels[valid].double())
    assert_loss_close(losses.unary_loss(x, labels), float(ref), tol=1e-12, what="sigmoid cross-entropy")
    # the affinity loss on the binary model against the literal loops on (0, x)
    ref, ref_grad, _ = reference_with_grad(ref_affinity, two, labels.tolist(), (3, 5))
    loss, grad = module_with_grad(losses.AffinityFieldLoss(2, kernel_sizes=(3, 5)), x, labels)
    assert_loss_close(loss, ref, tol=1e-12)
    assert_grad_close(grad, ref_grad[:, 1:], tol=1e-11)


def test_one_channel_logits_need_two_classes():
    x, labels = _binary_case()
    for loss in (losses.AffinityFieldLoss(3), losses.AdaptiveAffinityFieldLoss(3), losses.RandomProjectionLoss(3)):
        with pytest.raises(ValueError, match=r"expected logits \[B, 3, h, w\], got \[3, 1, 5, 7\]"):
            loss(x, labels)
    with pytest.raises(ValueError, match=r"or \[B, 1, h, w\] for a binary model"):
        losses.AffinityFieldLoss(2)(torch.zeros(3, 3, 5, 7), labels)


# =============================================================================================
# Full-resolution logits: stride= reads logits and labels at pixels (stride*i, stride*j)
# =============================================================================================
@pytest.mark.parametrize("size", [(48, 56), (43, 61)], ids=["multiple-of-8", "odd"])
def test_stride_reads_logits_and_labels_at_the_grid(size):
    """Each loss with stride=8 on full-resolution logits [B, C, H, W] and labels [B, H, W] equals
    the loss on logits[..., ::8, ::8] and labels[:, ::8, ::8]; the gradient is that one at those
    pixels and 0 elsewhere; counts() agree. Labels off the grid are random, so any other pick
    (or an upsampling of the logits) would change the value."""
    H, W = size
    g = torch.Generator().manual_seed(120)
    B, C = 2, 4
    small, small_labels = _blocky_case(B, C, -(-H // 8), -(-W // 8), seed=121, block=2)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    logits[..., ::8, ::8], labels[:, ::8, ::8] = small, small_labels
    aaf_args = dict(num_classes=C, kernel_sizes=(3, 5))
    adv = losses.AdversarialProjection(C, width=8, stride=8).double()
    adv_grid = copy.deepcopy(adv)
    adv_grid.stride = 1
    pairs = {  # name: (full-resolution loss, the same loss at the grid)
        "unary": (lambda x, y: losses.unary_loss(x, y, stride=8), lambda x, y: losses.unary_loss(x, y)),
        "affinity": (losses.AffinityFieldLoss(C, stride=8), losses.AffinityFieldLoss(C)),
        "aaf": (losses.AdaptiveAffinityFieldLoss(**aaf_args, stride=8), losses.AdaptiveAffinityFieldLoss(**aaf_args)),
        "random": (losses.RandomProjectionLoss(C, stride=8), losses.RandomProjectionLoss(C)),
        "emb": (losses.EmbeddingContrastiveLoss(stride=8), losses.EmbeddingContrastiveLoss()),
        "gan_g": (adv.generator_loss, adv_grid.generator_loss),
    }
    _set_aaf_logits(pairs["aaf"][0], seed=122)
    _set_aaf_logits(pairs["aaf"][1], seed=122)
    for name, (full_fn, grid_fn) in pairs.items():
        full_loss, full_grad = module_with_grad(full_fn, logits, labels)
        grid_loss, grid_grad = module_with_grad(grid_fn, small, small_labels)
        assert_loss_close(full_loss, float(grid_loss), tol=1e-12, what=name)
        assert full_grad[..., ::8, ::8].equal(grid_grad) and grid_grad.abs().max() > 0, name
        off_grid = full_grad.clone()
        off_grid[..., ::8, ::8] = 0
        assert off_grid.abs().max() == 0, name
        if hasattr(full_fn, "counts"):
            assert torch.equal(full_fn.counts(labels, (H, W)), grid_fn.counts(small_labels, small.shape[-2:])), name
    assert int(losses.valid_count(labels, C, stride=8)) == int(losses.valid_count(small_labels, C))
    # and the affinity loss at stride 8 against the literal loops on the grid
    ref, _, _ = reference_with_grad(ref_affinity, small, small_labels.tolist(), (3,))
    assert_loss_close(pairs["affinity"][0](logits, labels), ref, tol=1e-12)


def test_stride_needs_labels_at_the_logits_size():
    logits = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="stride=8 reads logits and labels of the same size, got logits 16x16 "
                                         "and labels 2x2"):
        losses.AffinityFieldLoss(3, stride=8)(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        losses.AdaptiveAffinityFieldLoss(3, stride=0)


def test_losses_over_class_logits_refuse_fewer_than_two_classes_and_a_zero_stride():
    """One class makes every pair a non-edge of equal probabilities: the loss would be 0 silently
    (a one-channel sigmoid model is num_classes=2). stride 0 / True are no strides."""
    for make in (lambda c: losses.AffinityFieldLoss(c), lambda c: losses.AdaptiveAffinityFieldLoss(c),
                 lambda c: losses.RandomProjectionLoss(c), lambda c: losses.AdversarialProjection(c)):
        for bad in (1, 0, True):
            with pytest.raises(ValueError, match=r"num_classes must be an int >= 2, got .*num_classes=2"):
                make(bad)
        make(2)
    logits, labels = torch.randn(2, 3, 9, 11), torch.randint(0, 3, (2, 9, 11))
    for stride in (0, True):
        with pytest.raises(ValueError, match=r"stride must be a positive int"):
            losses.unary_loss(logits, labels, stride=stride)
        with pytest.raises(ValueError, match=r"stride must be a positive int"):
            losses.valid_count(labels, 3, stride=stride)
