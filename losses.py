"""Projection losses of "Adaptive Affinity Field for Semantic Segmentation" (Ke et al., ECCV 2018).

Section 3 of the paper, one class per projection:

- ``unary_loss``                 Eq. (1)      per-pixel cross-entropy
- ``RandomProjectionLoss``       Eq. (4)      fixed random 5x5 convolution + Gram (perceptual) loss
- ``AdversarialProjection``      Eqs. (5)-(6) a discriminator over label maps (GAN baseline)
- ``AffinityFieldLoss``          Eq. (7)      the affinity field ("Affinity" in Tables 2-9)
- ``AdaptiveAffinityFieldLoss``  Eqs. (8)-(10) adaptive kernel sizes learnt by a minimax game (AAF)
- ``EmbeddingContrastiveLoss``   "Emb." baseline: Chopra et al.'s contrastive loss on features

Every loss takes ``logits [B, C, h, w]`` at output stride 8 and integer ``labels`` either
``[B, h, w]`` or ``[B, s*h, s*w]``; a larger label map is reduced by picking pixel (s*i, s*j),
as the official code trains at stride 8 without upsampling the logits (paper Sec. 4). Label 255
and any label outside [0, C) is ignored. Half-precision logits are computed in float32.

Training schedule (not in this file): the official code multiplies the whole affinity/AAF term
by 10^(-t/T) (t the step, T the total steps); that decay lives in train.py.

This file depends on torch alone so that it can be copied into other projects.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# The official code clips p, q, 1-p and 1-q to [1e-4, 1] before the KL divergence.
KL_CLIP = 1e-4


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
# The paper's networks give logits at output stride 8 (SPEC 1).
OUTPUT_STRIDE = 8


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest pick of a label map ``[B, H, W]`` to ``size = (h, w)``: out[i, j] = labels[s*i, s*j].

    When H and W are multiples of h and w, s = H / h (``labels[:, ::8, ::8]`` for a stride-8
    network on a crop whose side is a multiple of 8). Otherwise the stride cannot be read off the
    sizes (a 15-pixel side and 2 logits fit any s from 8 to 14), so s is the paper's output stride
    8, and the logits must then number ceil(H / 8) -- what a stride-8 network gives for any H.
    """
    h, w = size
    H, W = labels.shape[-2:]
    if (H, W) == (h, w):
        return labels
    if H % h == 0 and W % w == 0:
        sy, sx = H // h, W // w
    else:
        sy = sx = OUTPUT_STRIDE
    out = labels[..., ::sy, ::sx]
    if out.shape[-2:] != (h, w):
        raise ValueError(f"labels of size {H}x{W} do not match logits of size {h}x{w}: expected the same size, "
                         f"an integer multiple, or ceil(H/{OUTPUT_STRIDE}) x ceil(W/{OUTPUT_STRIDE})")
    return out


def _labels_at(labels: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels at the logits' resolution, int64, every ignored pixel set to C (a "void" slot).

    Ignored = ``ignore_index``, or anything outside [0, C). Using C as the void value lets
    per-class sums index a [C + 1] buffer and drop the last entry.
    """
    C = logits.shape[1]
    lab = downsample_labels(labels, logits.shape[-2:]).long()
    void = (lab < 0) | (lab >= C) | (lab == ignore_index)
    return lab.masked_fill(void, C)


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 inputs (the KL clipping at 1e-4 is below fp16's resolution near 1)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


# --------------------------------------------------------------------------------------------
# Eq. (1): unary supervision
# --------------------------------------------------------------------------------------------
def unary_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Eq. (1): mean cross-entropy over the valid pixels (0 when every pixel is ignored)."""
    logits = _as_float(logits)
    C = logits.shape[1]
    lab = _labels_at(labels, logits, ignore_index)
    n_valid = (lab < C).sum()
    # F.cross_entropy's own mean would be 0/0 = NaN on a fully ignored batch.
    total = F.cross_entropy(logits, lab.masked_fill(lab == C, -100), ignore_index=-100, reduction="sum")
    return total / n_valid.clamp(min=1)


# --------------------------------------------------------------------------------------------
# Eq. (7): the affinity field, computed once for every kernel size
# --------------------------------------------------------------------------------------------
def stencil(kernel_size: int) -> list[tuple[int, int]]:
    """The 8 neighbour offsets (dy, dx) of a k x k affinity field: Chebyshev distance s = (k-1)/2.

    A 5x5 field is the dilated 3x3 stencil {-2, 0, 2}^2 minus the centre (the official code's
    "eight corners"), not all 24 pixels of the patch.
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 3, got {kernel_size}")
    s = (kernel_size - 1) // 2
    return [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)]


def _half_stencil(kernel_size: int) -> list[tuple[int, int]]:
    """Four offsets, one per unordered neighbour pair: d and -d describe the same pixel pair."""
    return [(dy, dx) for dy, dx in stencil(kernel_size) if dy > 0 or (dy == 0 and dx > 0)]


def _pair_regions(h: int, w: int, dy: int, dx: int):
    """Index windows (first, second) such that second = first shifted by (dy, dx), both in the image.

    Pairs that would leave the image are simply not in the windows (no padding, no wrap-around).
    """
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    if y1 <= y0 or x1 <= x0:
        return None
    first = (Ellipsis, slice(y0, y1), slice(x0, x1))
    second = (Ellipsis, slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))
    return first, second


class _AffinityFieldSums(torch.autograd.Function):
    """Eq. (7) summed per kernel size and per centre class, with a hand-written backward.

    Element = (centre pixel i, neighbour j = i + d, class channel c, kernel size k), with
    p = P_c(i), q = P_c(j) and KL(q || p) = q log(q/p) + (1-q) log((1-q)/(1-p)) on clipped values.
    Both endpoints must be valid. The element is an *edge* iff onehot_c(i) != onehot_c(j): a pair
    with labels a != b is an edge in channels a and b only, and a non-edge in the other C-2.

    forward(prob [B,C,h,w], lab [B,h,w] (C = void), sizes, margin) returns
      edge_sum    [K, C]  sum of max(0, m - KL) over edge elements, split by the centre's class
      nonedge_sum [K, C]  sum of KL over non-edge elements, split by the centre's class
      edge_count  [K]     number of edge elements      (not differentiable)
      nonedge_count [K]   number of non-edge elements  (not differentiable)
    Splitting by the centre's class is what Eqs. (8)-(10) need: AAF weighs each element by
    w[y_i, k] (official code), so L_AAF = sum_k sum_c w[c, k] * sum[k, c] / count[k].

    Why a custom Function: autograd through 8 directions x K sizes would keep a dozen
    [B, C, h, w] intermediates per direction; here only the probabilities are saved and the
    backward recomputes the cheap elementwise terms (about 1/10 of the memory, and faster).
    Each unordered pair is visited once and gives both directed elements (i->j and j->i).
    """

    @staticmethod
    def forward(ctx, prob, lab, sizes, margin):
        B, C, h, w = prob.shape
        K = len(sizes)
        pc, npc, lp, lnp = _clipped_logs(prob)
        valid = lab < C                                       # [B, h, w]
        idx = lab.clamp(max=C - 1).unsqueeze(1)               # [B, 1, h, w] for gathers
        edge_sum = prob.new_zeros(K, C + 1)                   # slot C collects void centres (all 0)
        nonedge_sum = prob.new_zeros(K, C + 1)
        edge_count = prob.new_zeros(K)
        nonedge_count = prob.new_zeros(K)
        for k, size in enumerate(sizes):
            for dy, dx in _half_stencil(size):
                regions = _pair_regions(h, w, dy, dx)
                if regions is None:
                    continue
                x, y = regions                                # x: first endpoint, y = x + d
                pair_ok = valid[x] & valid[y]                 # [B, h', w']
                is_edge = pair_ok & (lab[x] != lab[y])
                kl_xy, kl_yx, _, _ = _pair_kl(pc, npc, lp, lnp, x, y)
                for kl, centre in ((kl_xy, x), (kl_yx, y)):   # kl_xy: centre x, neighbour y
                    kl_a = kl.gather(1, idx[x]).squeeze(1)    # channel of x's label
                    kl_b = kl.gather(1, idx[y]).squeeze(1)    # channel of y's label
                    # Non-edge: every channel of a valid pair, minus the two edge channels.
                    nonedge_px = pair_ok * kl.sum(1) - is_edge * (kl_a + kl_b)
                    edge_px = is_edge * ((margin - kl_a).clamp(min=0) + (margin - kl_b).clamp(min=0))
                    centre_lab = lab[centre].reshape(-1)
                    edge_sum[k].index_add_(0, centre_lab, edge_px.reshape(-1))
                    nonedge_sum[k].index_add_(0, centre_lab, nonedge_px.reshape(-1))
                n_pairs, n_edges = pair_ok.sum(), is_edge.sum()
                edge_count[k] += 2 * 2 * n_edges              # 2 directions x 2 channels
                nonedge_count[k] += 2 * (C * n_pairs - 2 * n_edges)
        ctx.save_for_backward(prob, lab)
        ctx.sizes, ctx.margin = sizes, margin
        ctx.mark_non_differentiable(edge_count, nonedge_count)
        return edge_sum[:, :C], nonedge_sum[:, :C], edge_count, nonedge_count

    @staticmethod
    def backward(ctx, g_edge, g_nonedge, _g_ec, _g_nc):
        prob, lab = ctx.saved_tensors
        B, C, h, w = prob.shape
        margin = ctx.margin
        pc, npc, lp, lnp = _clipped_logs(prob)
        # d clip(v)/dv: torch.clamp with scalar bounds passes the gradient strictly inside them.
        mp = ((prob > KL_CLIP) & (prob < 1)).to(prob.dtype)
        mnp = ((1 - prob > KL_CLIP) & (1 - prob < 1)).to(prob.dtype)
        valid = lab < C
        idx = lab.clamp(max=C - 1).unsqueeze(1)
        grad = torch.zeros_like(prob)
        zero = prob.new_zeros(len(ctx.sizes), 1)
        # Incoming gradient per element, looked up by the centre's class (void centres get 0).
        g_edge = torch.cat([g_edge, zero], 1)                 # [K, C + 1]
        g_nonedge = torch.cat([g_nonedge, zero], 1)
        for k, size in enumerate(ctx.sizes):
            ge_map, gn_map = g_edge[k][lab], g_nonedge[k][lab]   # [B, h, w]
            for dy, dx in _half_stencil(size):
                regions = _pair_regions(h, w, dy, dx)
                if regions is None:
                    continue
                x, y = regions
                pair_ok = valid[x] & valid[y]
                is_edge = pair_ok & (lab[x] != lab[y])
                kl_xy, kl_yx, D, Dn = _pair_kl(pc, npc, lp, lnp, x, y)
                # dL/dKL for each directed element: g_n on non-edge channels, -g_e on edge
                # channels still inside the margin.
                g_xy = _grad_wrt_kl(kl_xy, gn_map[x], ge_map[x], pair_ok, is_edge, idx[x], idx[y], margin)
                g_yx = _grad_wrt_kl(kl_yx, gn_map[y], ge_map[y], pair_ok, is_edge, idx[x], idx[y], margin)
                # KL(y||x) = yc (ly - lx) + nyc (lny - lnx);  KL(x||y) = xc (lx - ly) + nxc (lnx - lny)
                dxy_dy = mp[y] * (D + 1) - mnp[y] * (Dn + 1)
                dxy_dx = -mp[x] * pc[y] / pc[x] + mnp[x] * npc[y] / npc[x]
                dyx_dx = mp[x] * (1 - D) - mnp[x] * (1 - Dn)
                dyx_dy = -mp[y] * pc[x] / pc[y] + mnp[y] * npc[x] / npc[y]
                grad[x] += g_xy * dxy_dx + g_yx * dyx_dx
                grad[y] += g_xy * dxy_dy + g_yx * dyx_dy
        return grad, None, None, None


def _clipped_logs(prob: torch.Tensor):
    """clip(p), clip(1-p) and their logs; complements come from the unclipped p (official code)."""
    pc = prob.clamp(KL_CLIP, 1.0)
    npc = (1 - prob).clamp(KL_CLIP, 1.0)
    return pc, npc, pc.log(), npc.log()


def _pair_kl(pc, npc, lp, lnp, x, y):
    """Both directed Bernoulli KLs of the pixel pairs (x, y), each [B, C, h', w'].

    kl_xy = KL(P(y) || P(x)): centre x, neighbour y (SPEC: KL(neighbour || centre)).
    kl_yx = KL(P(x) || P(y)): centre y, neighbour x. They share the log differences
    D = log p(y) - log p(x) and Dn (of the complements), returned too for the backward.
    """
    D, Dn = lp[y] - lp[x], lnp[y] - lnp[x]
    kl_xy = pc[y] * D + npc[y] * Dn
    kl_yx = -(pc[x] * D + npc[x] * Dn)
    return kl_xy, kl_yx, D, Dn


def _grad_wrt_kl(kl, gn, ge, pair_ok, is_edge, idx_a, idx_b, margin):
    """dL/dKL [B, C, h', w'] for one direction: gn on non-edge channels, -ge * [KL < m] on edges."""
    g = (gn * pair_ok).unsqueeze(1).expand_as(kl).contiguous()
    for idx in (idx_a, idx_b):
        kl_c = kl.gather(1, idx)                                   # [B, 1, h', w']
        inside = (margin - kl_c > 0).to(kl.dtype)                  # max(0, m - KL) is active
        edge_grad = (-gn.unsqueeze(1) - ge.unsqueeze(1) * inside) * is_edge.unsqueeze(1)
        g.scatter_add_(1, idx, edge_grad)
    return g


def affinity_field_sums(logits: torch.Tensor, labels: torch.Tensor, kernel_sizes: Sequence[int],
                        margin: float, ignore_index: int = 255):
    """Per-size, per-centre-class sums and counts of Eq. (7); see ``_AffinityFieldSums``."""
    logits = _as_float(logits)
    lab = _labels_at(labels, logits, ignore_index)
    prob = logits.softmax(dim=1)                                   # [B, C, h, w]
    return _AffinityFieldSums.apply(prob, lab, tuple(kernel_sizes), float(margin))


def _safe_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 for an empty set (the official code returns NaN there)."""
    return total / count.clamp(min=1)


class AffinityFieldLoss(nn.Module):
    """Eq. (7), the affinity field loss ("Affinity" in the paper's tables with kernel_sizes=(3,)).

    For class c, centre pixel i and neighbour j on the k x k stencil (8 neighbours at distance
    (k-1)/2), with p = P_c(i), q = P_c(j) from the softmax and KL(q || p) the Bernoulli KL:
        non-edge (onehot_c(i) == onehot_c(j)):  KL(q || p)
        edge     (onehot_c(i) != onehot_c(j)):  max(0, margin - KL(q || p))
    Pairs leaving the image or with an ignored endpoint are dropped. (The official code also
    drops a pair whose mirror pixel i - d is ignored; we use the simpler "both endpoints valid".)
    Returns  sum_k  lambda_edge * mean_edge_k + lambda_nonedge * mean_nonedge_k,  where each mean
    runs over all surviving (pixel, class, direction) elements of the whole batch; an empty set
    contributes 0.
    """

    def __init__(self, num_classes: int, kernel_sizes: Sequence[int] = (3,), margin: float = 3.0,
                 ignore_index: int = 255, lambda_edge: float = 1.0, lambda_nonedge: float = 1.0):
        super().__init__()
        for k in kernel_sizes:
            stencil(k)                                              # validates the size
        self.num_classes = num_classes
        self.kernel_sizes = tuple(kernel_sizes)
        self.margin = margin
        self.ignore_index = ignore_index
        self.lambda_edge = lambda_edge
        self.lambda_nonedge = lambda_nonedge

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_classes(logits, self.num_classes)
        edge, nonedge, n_edge, n_nonedge = affinity_field_sums(
            logits, labels, self.kernel_sizes, self.margin, self.ignore_index)
        return (self.lambda_edge * _safe_mean(edge.sum(1), n_edge)
                + self.lambda_nonedge * _safe_mean(nonedge.sum(1), n_nonedge)).sum()


class AdaptiveAffinityFieldLoss(nn.Module):
    """Eqs. (8)-(10), adaptive affinity fields (AAF).

        L_AAF = sum_k [ mean_{edge elements of size k}     w_edge[y_i, k]    * max(0, m - KL)
                      + mean_{non-edge elements of size k} w_nonedge[y_i, k] * KL ]

    w = softmax over the K sizes of the learnable ``edge_logits`` / ``nonedge_logits`` [C, K]
    (zero-initialised, so every class starts with uniform weights 1/K), picked by the ground-truth
    class y_i of the centre pixel (official code), so each class's weights stay on the simplex.

    Minimax, Eq. (9): the network minimises this loss while these weights *maximise* it. Give
    them their own optimizer, e.g. ``torch.optim.SGD(aaf.parameters(), lr, momentum=0.9,
    maximize=True)`` at the backbone's learning rate, and step it after the same backward pass
    that updates the network (official code: one backward, negated gradient, no weight decay).
    """

    def __init__(self, num_classes: int, kernel_sizes: Sequence[int] = (3, 5, 7), margin: float = 3.0,
                 ignore_index: int = 255):
        super().__init__()
        for k in kernel_sizes:
            stencil(k)
        self.num_classes = num_classes
        self.kernel_sizes = tuple(kernel_sizes)
        self.margin = margin
        self.ignore_index = ignore_index
        K = len(self.kernel_sizes)
        self.edge_logits = nn.Parameter(torch.zeros(num_classes, K))
        self.nonedge_logits = nn.Parameter(torch.zeros(num_classes, K))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_edge, w_nonedge), each [C, K], rows on the simplex (Eq. 8's constraints)."""
        return self.edge_logits.softmax(dim=1), self.nonedge_logits.softmax(dim=1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_classes(logits, self.num_classes)
        edge, nonedge, n_edge, n_nonedge = affinity_field_sums(
            logits, labels, self.kernel_sizes, self.margin, self.ignore_index)   # [K, C], [K]
        w_edge, w_nonedge = self.weights()                                       # [C, K]
        # Eq. (10): weights of the centre's class times the per-class sums, over each size's count.
        return (_safe_mean((w_edge.t() * edge).sum(1), n_edge)
                + _safe_mean((w_nonedge.t() * nonedge).sum(1), n_nonedge)).sum()

    @torch.no_grad()
    def kernel_size_per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper Fig. 3: the optimal field size of class c, sum_k w[c, k] * k, for (edge, non-edge)."""
        sizes = torch.tensor(self.kernel_sizes, dtype=self.edge_logits.dtype, device=self.edge_logits.device)
        w_edge, w_nonedge = self.weights()
        return w_edge @ sizes, w_nonedge @ sizes


def _masked_maps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(softmax [B, C, h, w], one-hot [B, C, h, w], valid [B, 1, h, w]), the first two zero at
    ignored pixels so that void neither leaks (one-hot all zero) nor is penalised."""
    logits = _as_float(logits)
    C = logits.shape[1]
    lab = _labels_at(labels, logits, ignore_index)
    valid = (lab < C).unsqueeze(1).to(logits.dtype)
    onehot = F.one_hot(lab, C + 1)[..., :C].permute(0, 3, 1, 2).to(logits.dtype)
    return logits.softmax(dim=1) * valid, onehot, valid


def _check_classes(logits: torch.Tensor, num_classes: int) -> None:
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits [B, {num_classes}, h, w], got {list(logits.shape)}")


# --------------------------------------------------------------------------------------------
# Eq. (4): random projection
# --------------------------------------------------------------------------------------------
class RandomProjectionLoss(nn.Module):
    """Eq. (4): a fixed random convolution phi (k x k, C -> C) on the softmax prediction and on
    the one-hot ground truth; per pixel ||a a^T - b b^T||_F^2 with a = phi(P)(i), b = phi(Y)(i).

    Closed form without C x C tensors: ||a a^T - b b^T||_F^2 = (a.a)^2 - 2 (a.b)^2 + (b.b)^2.
    Ignored pixels are zeroed in both the prediction and the one-hot map (so they neither leak
    nor get penalised), the convolution is zero-padded ("same"), and the loss is the mean over
    valid pixels. The weights are N(0, 1 / (k*k*C)) from ``seed`` (the paper does not give the
    distribution) so that the projections are O(1); they are a buffer, never trained.
    """

    def __init__(self, num_classes: int, kernel_size: int = 5, seed: int = 0, ignore_index: int = 255):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(kernel_size * kernel_size * num_classes)
        weight = torch.randn(num_classes, num_classes, kernel_size, kernel_size, generator=gen) * std
        self.register_buffer("weight", weight)                    # [C_out, C_in, k, k]
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_classes(logits, self.num_classes)
        prob, onehot, valid = _masked_maps(logits, labels, self.ignore_index)   # [B, C, h, w] x2, [B, 1, h, w]
        weight, pad = self.weight.to(prob.dtype), self.weight.shape[-1] // 2
        a = F.conv2d(prob, weight, padding=pad)                             # [B, C, h, w]
        b = F.conv2d(onehot, weight, padding=pad)
        aa, bb, ab = (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)         # [B, h, w]
        per_pixel = aa ** 2 - 2 * ab ** 2 + bb ** 2
        return _safe_mean((per_pixel * valid[:, 0]).sum(), valid.sum())


# --------------------------------------------------------------------------------------------
# Eqs. (5)-(6): adversarial projection
# --------------------------------------------------------------------------------------------
class AdversarialProjection(nn.Module):
    """Eqs. (5)-(6): a fully convolutional discriminator D over label-map patches (after Luc et al.
    2016). Real = one-hot ground truth, fake = softmax prediction; D gives one logit per patch.

    Ignored pixels are zeroed in *both* maps: otherwise D could tell real from fake by the
    all-zero one-hot vector at void pixels. The two steps alternate (Eq. 6):
      - ``discriminator_loss``: BCE(D(real), 1) + BCE(D(fake), 0), predictions detached;
      - ``generator_loss``: what the segmentation network minimises, the non-saturating
        -log D(fake) (the usual replacement of log(1 - D(fake)), which has vanishing gradients
        while D wins); D's parameters receive no gradient from it.
    """

    def __init__(self, num_classes: int, width: int = 64, ignore_index: int = 255):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        act = nn.LeakyReLU(0.2)
        self.disc = nn.Sequential(                                 # receptive field 23 px at stride 8
            nn.Conv2d(num_classes, width, 3, padding=1), act,
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act,
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), act,
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def _maps(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake, real) label maps [B, C, h, w], both zero at ignored pixels."""
        _check_classes(logits, self.num_classes)
        fake, real, _ = _masked_maps(logits, labels, self.ignore_index)
        return fake, real

    def discriminator_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fake, real = self._maps(logits.detach(), labels)
        d_real, d_fake = self.disc(real), self.disc(fake)
        return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))

    def generator_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fake, _ = self._maps(logits, labels)
        # Run D with detached parameters: gradients reach the logits only.
        frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
        d_fake = torch.func.functional_call(self.disc, frozen, (fake,))
        return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


# --------------------------------------------------------------------------------------------
# "Emb." baseline: contrastive loss on the feature map (Chopra et al. 2005)
# --------------------------------------------------------------------------------------------
class EmbeddingContrastiveLoss(nn.Module):
    """The paper's "Emb." baseline: Chopra et al.'s contrastive loss on the last feature map before
    the classifier, over the same 8-neighbour stencils as the affinity field.

    For each directed pair (i, j = i + d) with both labels valid and d_ij = ||f_i - f_j||_2:
        same label:       0.5 * d_ij^2
        different label:  0.5 * max(0, margin - d_ij)^2
    averaged over all such pairs of the batch (0 when there are none); with several kernel sizes
    the pairs of every size are pooled into that one mean. With ``normalize=True``
    (default) features are L2-normalised per pixel first, so d lies in [0, 2] and the default
    margin 1.0 is meaningful whatever the feature scale (the paper gives neither; without it the
    pull term can shrink all features towards 0). Labels are picked down to the feature size.
    """

    def __init__(self, margin: float = 1.0, kernel_size: int | Sequence[int] = 3, normalize: bool = True,
                 ignore_index: int = 255, num_classes: int | None = None):
        super().__init__()
        sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        for k in sizes:
            stencil(k)
        self.margin = margin
        self.kernel_sizes = sizes
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = _as_float(features)                                  # [B, F, h, w]
        if self.normalize:
            features = F.normalize(features, dim=1)
        lab = downsample_labels(labels, features.shape[-2:]).long()
        valid = (lab >= 0) & (lab != self.ignore_index)
        if self.num_classes is not None:
            valid &= lab < self.num_classes
        h, w = features.shape[-2:]
        total, count = features.new_zeros(()), features.new_zeros(())
        for size in self.kernel_sizes:
            for dy, dx in _half_stencil(size):                     # each pair once, counted twice
                regions = _pair_regions(h, w, dy, dx)
                if regions is None:
                    continue
                x, y = regions
                pair_ok = valid[x] & valid[y]
                same = lab[x] == lab[y]
                d2 = (features[x] - features[y]).pow(2).sum(1)          # [B, h', w']
                # sqrt has an infinite derivative at 0: keep d2 off zero for the push term only.
                d = d2.clamp(min=1e-12).sqrt()
                per_pair = torch.where(same, 0.5 * d2, 0.5 * (self.margin - d).clamp(min=0) ** 2)
                total = total + 2 * (per_pair * pair_ok).sum()
                count = count + 2 * pair_ok.sum()
        return _safe_mean(total, count)
