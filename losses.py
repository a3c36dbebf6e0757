"""Projection losses of "Adaptive Affinity Field for Semantic Segmentation" (Ke et al., ECCV 2018).

Section 3 of the paper, in its order, one class per projection (the public API comes first in
this file; the fused engine behind the affinity losses is the appendix at the bottom):

- ``unary_loss``                 Eq. (1)      per-pixel cross-entropy
- ``RandomProjectionLoss``       Eq. (4)      fixed random 5x5 convolution + Gram (perceptual) loss
- ``AdversarialProjection``      Eqs. (5)-(6) a discriminator over label maps (GAN baseline)
- ``AffinityFieldLoss``          Eq. (7)      the affinity field ("Affinity" in Tables 2-9)
- ``affinity_field_reference``   Eqs. (7), (10) the same in ~30 plain lines (plain autograd)
- ``AdaptiveAffinityFieldLoss``  Eqs. (8)-(10) adaptive kernel sizes learnt by a minimax game (AAF)
- ``EmbeddingContrastiveLoss``   "Emb." baseline: Chopra et al.'s contrastive loss on features
- helpers: ``valid_count`` (the unary mean's denominator, for accumulation), ``downsample_labels``
  (labels picked at the logits' grid), ``stencil`` (the 8 neighbour offsets of a k x k field)

Every loss takes ``logits [B, C, h, w]`` at output stride 8 and integer ``labels`` either
``[B, h, w]`` or ``[B, s*h, s*w]``; a larger label map is reduced by picking pixel (s*i, s*j),
as the official code trains at stride 8 without upsampling the logits (paper Sec. 4). Label 255
and any label outside [0, C) is ignored. Half-precision logits are computed in float32.

Networks of other shapes (the README's "Using AAF in your own project"):
- binary models: one-channel logits ``[B, 1, h, w]`` with ``num_classes=2`` are read as the
  two-channel logits (0, x), whose softmax is (1 - sigmoid(x), sigmoid(x)): the same value and
  gradient as those two channels (``_class_logits``);
- full-resolution logits ``[B, C, H, W]`` with labels ``[B, H, W]``: ``stride=8`` makes a loss
  read both at pixels (8i, 8j), the grid a stride-8 network predicts on (``_at_stride``).

Gradient accumulation: ``count=`` / ``counts=`` (``valid_count`` / ``loss.counts(labels, size)`` added over
the micro-batches) divide each micro-batch's mean by the whole batch's, so the micro-batch losses add up exactly.
Under torch.autocast the losses still compute in float32 (autocast is switched off inside them).

Training objective (not in this file), Eq. (3): L_unary + lambda * L_pairwise; the official code
also multiplies the whole affinity/AAF term by 10^(-t/T) (t the step, T the total steps); that decay lives in train.py.

This file depends on torch alone (tested with torch 2.15) so that it can be copied into other projects. The
hand-written backwards are first-order only: a double backward (create_graph=True) through them is
an error, not a silent zero.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["unary_loss", "RandomProjectionLoss", "AdversarialProjection", "stencil", "AffinityFieldLoss",
           "affinity_field_reference", "AdaptiveAffinityFieldLoss", "EmbeddingContrastiveLoss", "valid_count",
           "downsample_labels", "KL_CLIP", "OUTPUT_STRIDE"]

# The official code clips p, q, 1-p and 1-q to [1e-4, 1] before the KL divergence.
KL_CLIP = 1e-4
# The paper's networks give logits at output stride 8 (docs/protocol.md §1).
OUTPUT_STRIDE = 8


# --------------------------------------------------------------------------------------------
# Eq. (1): unary supervision
# --------------------------------------------------------------------------------------------
def valid_count(labels: torch.Tensor, num_classes: int, ignore_index: int = 255, *,
                size: tuple[int, int] | None = None, stride: int = 1) -> torch.Tensor:
    """Number of valid pixels (0-d int64 tensor), the denominator of ``unary_loss``'s mean.

    ``labels`` at the logits' resolution, or at any resolution with ``size = (h, w)`` of the
    logits (picked down as the losses do); ``stride`` as in ``unary_loss``. Sum it over the
    micro-batches of an optimizer step and pass it as ``count`` to every micro-batch's ``unary_loss``.
    """
    labels, size = _labels_at_stride(labels, size, stride)
    lab = labels if size is None else downsample_labels(labels, tuple(size))
    return _n_valid(_void_marked(lab, num_classes, ignore_index), num_classes)


def unary_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, *,
               count: torch.Tensor | None = None, stride: int = 1) -> torch.Tensor:
    """Eq. (1): mean cross-entropy over the valid pixels (0 when every pixel is ignored),

        L_unary = -1/N sum_{valid i} log P_{y_i}(i),   P = softmax(logits), N = number of valid pixels;

    N is ``count`` (see ``valid_count``) instead of this batch's valid pixels if given.

    One-channel logits are a binary (sigmoid) model's (two classes). ``stride=8`` reads
    full-resolution logits and labels at pixels (8i, 8j), as the paper's training does; the default
    1 uses every pixel given."""
    with _float32_region(logits):
        logits, labels = _at_stride(logits, labels, stride)
        binary = logits.dim() == 4 and logits.shape[1] == 1                   # a sigmoid model
        logits = _as_float(_class_logits(logits, 2) if binary else logits)
        C = logits.shape[1]
        lab = _labels_at(labels, logits, ignore_index)
        n_valid = _n_valid(lab, C) if count is None else count
        # F.cross_entropy's own mean would be 0/0 = NaN on a fully ignored batch.
        total = F.cross_entropy(logits, lab.masked_fill(lab == C, -100), ignore_index=-100, reduction="sum")
        return total / n_valid.clamp(min=1)


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
    ``stride``: see ``unary_loss``.
    """

    def __init__(self, num_classes: int, kernel_size: int = 5, seed: int = 0, ignore_index: int = 255,
                 stride: int = 1):
        super().__init__()
        _check_num_classes(num_classes)
        gen = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(kernel_size * kernel_size * num_classes)
        weight = torch.randn(num_classes, num_classes, kernel_size, kernel_size, generator=gen) * std
        self.register_buffer("weight", weight)                    # [C_out, C_in, k, k]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.stride = _check_stride(stride)

    def counts(self, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Valid pixels (0-d int64) of ``labels`` picked down to ``size``: the mean's denominator."""
        return valid_count(labels, self.num_classes, self.ignore_index, size=size, stride=self.stride)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        # float32 even under autocast (which would run the convolutions in half precision).
        with _float32_region(logits):
            logits, labels = _inputs(logits, labels, self.num_classes, self.stride)
            lab = _labels_at(labels, logits, self.ignore_index)
            prob, onehot, valid = _masked_maps(logits, lab)                  # [B, C, h, w] x2, [B, 1, h, w]
            weight, pad = self.weight.to(prob.dtype), self.weight.shape[-1] // 2
            a = F.conv2d(prob, weight, padding=pad)                         # [B, C, h, w]
            b = F.conv2d(onehot, weight, padding=pad)
            aa, bb, ab = (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)     # [B, h, w]
            per_pixel = aa ** 2 - 2 * ab ** 2 + bb ** 2
            n = _n_valid(lab, self.num_classes) if counts is None else counts
            return _safe_mean((per_pixel * valid[:, 0]).sum(), n)


# --------------------------------------------------------------------------------------------
# Eqs. (5)-(6): adversarial projection
# --------------------------------------------------------------------------------------------
class AdversarialProjection(nn.Module):
    """Eqs. (5)-(6): a fully convolutional discriminator D over label-map patches (after Luc et al.
    2016). Real = one-hot ground truth, fake = softmax prediction; D gives one logit per patch.

        min_D  BCE(D(Y), 1) + BCE(D(P), 0)          max_net  log D(P)   (non-saturating form)

    Ignored pixels are zeroed in *both* maps: otherwise D could tell real from fake by the
    all-zero one-hot vector at void pixels. The two steps alternate (Eq. 6):
      - ``discriminator_loss``: BCE(D(real), 1) + BCE(D(fake), 0), predictions detached;
      - ``generator_loss``: what the segmentation network minimises, the non-saturating
        -log D(fake) (the usual replacement of log(1 - D(fake)), which has vanishing gradients
        while D wins); D's parameters receive no gradient from it.
    ``stride``: see ``unary_loss``.
    """

    def __init__(self, num_classes: int, width: int = 64, ignore_index: int = 255, stride: int = 1):
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self.stride = _check_stride(stride)
        act = nn.LeakyReLU(0.2)
        self.disc = nn.Sequential(                                 # receptive field 23 px at stride 8
            nn.Conv2d(num_classes, width, 3, padding=1), act,
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act,
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), act,
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def _maps(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake, real) label maps [B, C, h, w], both zero at ignored pixels."""
        logits, labels = _inputs(logits, labels, self.num_classes, self.stride)
        fake, real, _ = _masked_maps(logits, _labels_at(labels, logits, self.ignore_index))
        return fake, real

    def discriminator_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # D runs in float32 even under autocast (its inputs are float32 maps, see _maps).
        with _float32_region(logits):
            fake, real = self._maps(logits.detach(), labels)
            d_real, d_fake = self.disc(real), self.disc(fake)
            return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                    + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))

    def generator_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _float32_region(logits):
            fake, _ = self._maps(logits, labels)
            # Run D with detached parameters: gradients reach the logits only.
            frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
            d_fake = torch.func.functional_call(self.disc, frozen, (fake,))
            return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


# --------------------------------------------------------------------------------------------
# Eq. (7): the affinity field
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


class _AffinityFieldBase(nn.Module):
    """What Eq. (7) and Eq. (10) share: the field sizes, margin, ignore value and stride, the
    element counts (the means' denominators) and the pairs of one batch (appendix)."""

    def __init__(self, num_classes: int, kernel_sizes: Sequence[int], margin: float, ignore_index: int,
                 stride: int):
        super().__init__()
        for k in kernel_sizes:
            stencil(k)                                              # validates the size
        self.num_classes = _check_num_classes(num_classes)
        self.kernel_sizes = tuple(kernel_sizes)
        self.margin = margin
        self.ignore_index = ignore_index
        self.stride = _check_stride(stride)

    def counts(self, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[2, K] int64: the edge and non-edge element counts per size of ``labels`` picked down to
        ``size = (h, w)``, the denominators of the means (add them over micro-batches)."""
        return _pairs(_labels_at_size(labels, size, self.num_classes, self.ignore_index, self.stride),
                      self.kernel_sizes, self.num_classes).counts

    def _logits_and_pairs(self, logits: torch.Tensor, labels: torch.Tensor):
        """(logits [B, C, h, w] as the losses read them, the batch's pairs of every size)."""
        logits, labels = _inputs(logits, labels, self.num_classes, self.stride)
        lab = _labels_at(labels, logits, self.ignore_index, _PAIR_INDEX)
        return logits, _pairs(lab, self.kernel_sizes, self.num_classes)


class AffinityFieldLoss(_AffinityFieldBase):
    """Eq. (7), the affinity field loss ("Affinity" in the paper's tables with kernel_sizes=(3,)).

    For class c, centre pixel i and neighbour j on the k x k stencil (8 neighbours at distance
    (k-1)/2), with p = P_c(i), q = P_c(j) from the softmax, y the ground truth and KL(q || p) the
    Bernoulli KL (p, q, 1-p, 1-q each clipped to [1e-4, 1], as the official code does):
        non-edge (onehot_c(y_i) == onehot_c(y_j)):  KL(q || p)
        edge     (onehot_c(y_i) != onehot_c(y_j)):  max(0, margin - KL(q || p))
    Pairs leaving the image or with an ignored endpoint are dropped. (The official code also
    drops a pair whose mirror pixel i - d is ignored; we use the simpler "both endpoints valid".)
    Returns  sum_k  lambda_edge * mean_edge_k + lambda_nonedge * mean_nonedge_k,  where each mean
    runs over all surviving (pixel, class, direction) elements of the whole batch; an empty set
    contributes 0. ``forward(..., counts=n)`` divides by n [2, K] instead (``counts()`` of the
    labels of every micro-batch of an optimizer step, summed). ``stride``: see ``unary_loss``.

    ``affinity_field_reference`` (below) is the same loss written plainly; this class computes it
    with the fused engine of the appendix (equal to rounding, tested in float64).
    """

    def __init__(self, num_classes: int, kernel_sizes: Sequence[int] = (3,), margin: float = 3.0,
                 ignore_index: int = 255, lambda_edge: float = 1.0, lambda_nonedge: float = 1.0,
                 stride: int = 1):
        super().__init__(num_classes, kernel_sizes, margin, ignore_index, stride)
        self.lambda_edge = lambda_edge
        self.lambda_nonedge = lambda_nonedge
        # A buffer, so that it follows .to(device) and no host-to-device copy happens per step;
        # float64 so that float64 logits see the exact values.
        self.register_buffer("_lambdas", torch.tensor([[lambda_edge], [lambda_nonedge]], dtype=torch.float64),
                             persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        with _float32_region(logits):
            logits, pairs = self._logits_and_pairs(logits, labels)
            lam = self._lambdas.to(logits.dtype)                             # [2, 1]
            coef = lam / (pairs.counts if counts is None else counts).clamp(min=1)   # [2, K]
            return _affinity_loss(logits, pairs, self.kernel_sizes, self.margin,
                                  coef[..., None].expand(2, len(self.kernel_sizes), self.num_classes))


def affinity_field_reference(logits: torch.Tensor, labels: torch.Tensor, kernel_sizes: Sequence[int] = (3,),
                             margin: float = 3.0, ignore_index: int = 255, w_edge: torch.Tensor | None = None,
                             w_nonedge: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (7) (Eq. (10) with ``w_edge``, ``w_nonedge``) in the paper's variables, plain autograd.

    Without ``w_*`` it equals ``AffinityFieldLoss(C, kernel_sizes, margin)`` on C-channel logits
    (stride 1, both lambdas 1); with ``w_edge, w_nonedge = aaf.weights()`` it equals
    ``AdaptiveAffinityFieldLoss``: the [C, K] weights on the simplex (the softmax
    of the module's logits over the sizes), not the logits. Slow and memory-hungry (a
    [B, C, 8, h, w] tensor per size): the yardstick of tests and bench.py, not for training.
    """
    P = _as_float(logits).softmax(1)                                     # [B, C, h, w]
    B, C, h, w = P.shape
    y = _labels_at(labels, P, ignore_index)                              # [B, h, w], ignored = C
    classes = torch.arange(C, device=y.device).view(1, C, 1, 1, 1)
    clip = lambda t: t.clamp(KL_CLIP, 1.0)                               # noqa: E731
    loss = P.new_zeros(())
    for k, size in enumerate(kernel_sizes):
        s = (size - 1) // 2
        P_pad, y_pad = F.pad(P, (s, s, s, s)), F.pad(y, (s, s, s, s), value=C)   # outside = ignored
        at_j = lambda t, dy, dx: t[..., s + dy:s + dy + h, s + dx:s + dx + w]    # noqa: E731
        # Neighbour j = i + (dy, dx) of every centre pixel i, one slot per offset.
        q = torch.stack([at_j(P_pad, dy, dx) for dy, dx in stencil(size)], 2)   # [B, C, 8, h, w]
        y_j = torch.stack([at_j(y_pad, dy, dx) for dy, dx in stencil(size)], 1)  # [B, 8, h, w]
        p, y_i = P[:, :, None], y[:, None]                              # [B, C, 1, h, w], [B, 1, h, w]
        pair = ((y_i < C) & (y_j < C))[:, None]                         # [B, 1, 8, h, w] both valid
        edge = ((y_i[:, None] == classes) != (y_j[:, None] == classes)) & pair   # onehot_c(y_i) != onehot_c(y_j)
        nonedge = ~edge & pair
        # Bernoulli KL(q || p), p, q, 1-p, 1-q each clipped (complements of the unclipped values).
        kl = clip(q) * (clip(q).log() - clip(p).log()) + clip(1 - q) * (clip(1 - q).log() - clip(1 - p).log())
        hinge = (margin - kl).clamp(min=0)
        we = wn = 1.0
        if w_edge is not None:                 # Eq. (10): the weights of the centre's class y_i
            centre = y.clamp(max=C - 1)        # (an ignored centre is in no pair: any row will do)
            we, wn = (wt[centre, k].to(P.dtype)[:, None, None] for wt in (w_edge, w_nonedge))
        loss = loss + (we * hinge * edge).sum() / edge.sum().clamp(min=1) \
            + (wn * kl * nonedge).sum() / nonedge.sum().clamp(min=1)
    return loss


# --------------------------------------------------------------------------------------------
# Eqs. (8)-(10): adaptive affinity fields
# --------------------------------------------------------------------------------------------
class AdaptiveAffinityFieldLoss(_AffinityFieldBase):
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
    ``counts()`` / ``forward(..., counts=n)`` as in AffinityFieldLoss; ``stride``: see ``unary_loss``.
    ``affinity_field_reference(logits, labels, kernel_sizes, margin, ignore_index, *aaf.weights())``
    is the same loss written plainly.
    """

    def __init__(self, num_classes: int, kernel_sizes: Sequence[int] = (3, 5, 7), margin: float = 3.0,
                 ignore_index: int = 255, stride: int = 1):
        super().__init__(num_classes, kernel_sizes, margin, ignore_index, stride)
        K = len(self.kernel_sizes)
        self.edge_logits = nn.Parameter(torch.zeros(num_classes, K))
        self.nonedge_logits = nn.Parameter(torch.zeros(num_classes, K))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_edge, w_nonedge), each [C, K], rows on the simplex (Eq. 8's constraints)."""
        return self.edge_logits.softmax(dim=1), self.nonedge_logits.softmax(dim=1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, *,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        with _float32_region(logits):
            logits, pairs = self._logits_and_pairs(logits, labels)
            w_edge, w_nonedge = self.weights()                                   # [C, K]
            # Eq. (10): the weight of the centre's class, over each size's element count.
            n = (pairs.counts if counts is None else counts).clamp(min=1)       # [2, K]
            coef = torch.stack([w_edge.t(), w_nonedge.t()]).to(logits.dtype) / n[..., None]   # [2, K, C]
            return _affinity_loss(logits, pairs, self.kernel_sizes, self.margin, coef)

    @torch.no_grad()
    def kernel_size_per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper Fig. 3: the optimal field size of class c, sum_k w[c, k] * k, for (edge, non-edge)."""
        sizes = torch.tensor(self.kernel_sizes, dtype=self.edge_logits.dtype, device=self.edge_logits.device)
        w_edge, w_nonedge = self.weights()
        return w_edge @ sizes, w_nonedge @ sizes


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
    It takes features, not class logits (no binary case); ``stride``: see ``unary_loss``.
    """

    def __init__(self, margin: float = 1.0, kernel_size: int | Sequence[int] = 3, normalize: bool = True,
                 ignore_index: int = 255, num_classes: int | None = None, stride: int = 1):
        super().__init__()
        sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        for k in sizes:
            stencil(k)
        self.margin = margin
        self.kernel_sizes = sizes
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.stride = _check_stride(stride)

    def _valid(self, lab: torch.Tensor) -> torch.Tensor:
        valid = (lab >= 0) & (lab != self.ignore_index)                 # [B, h, w]
        if self.num_classes is not None:
            valid &= lab < self.num_classes
        return valid

    def _pair_masks(self, valid: torch.Tensor):
        """(regions, pair_ok) for every unordered pair offset of every size (each counted twice)."""
        h, w = valid.shape[-2:]
        for size in self.kernel_sizes:
            for dy, dx in _half_stencil(size):
                regions = _pair_regions(h, w, dy, dx)
                if regions is not None:
                    at_i, at_j = regions
                    yield regions, valid[at_i] & valid[at_j]

    def counts(self, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Directed valid pairs (0-d int64) of ``labels`` picked down to ``size``: the mean's
        denominator (add it over micro-batches)."""
        labels, size = _labels_at_stride(labels, size, self.stride)
        valid = self._valid(downsample_labels(labels, tuple(size)).long())
        return sum((2 * pair_ok.sum() for _, pair_ok in self._pair_masks(valid)),
                   torch.zeros((), dtype=torch.long, device=labels.device))

    def forward(self, features: torch.Tensor, labels: torch.Tensor, *,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        with _float32_region(features):
            features, labels = _at_stride(features, labels, self.stride)
            features = _as_float(features)                              # [B, F, h, w]
            if self.normalize:
                features = F.normalize(features, dim=1)
            lab = downsample_labels(labels, features.shape[-2:]).long()
            total, count = features.new_zeros(()), torch.zeros((), dtype=torch.long, device=features.device)
            for (at_i, at_j), pair_ok in self._pair_masks(self._valid(lab)):   # each pair once, counted twice
                same = lab[at_i] == lab[at_j]
                d2 = (features[at_i] - features[at_j]).pow(2).sum(1)    # [B, h', w']
                # sqrt has an infinite derivative at 0: keep d2 off zero for the push term only.
                d = d2.clamp(min=1e-12).sqrt()
                per_pair = torch.where(same, 0.5 * d2, 0.5 * (self.margin - d).clamp(min=0) ** 2)
                total = total + 2 * (per_pair * pair_ok).sum()
                count = count + 2 * pair_ok.sum()
            return _safe_mean(total, count if counts is None else counts)


# --------------------------------------------------------------------------------------------
# Inputs: labels at the logits' resolution, binary models, full-resolution logits
# --------------------------------------------------------------------------------------------
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


def _class_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits [B, C, h, w] as the losses read them, checked against ``num_classes``.

    A binary (sigmoid) model's one channel x, with ``num_classes=2``, becomes the two channels
    (0, x): their softmax is (1 - sigmoid(x), sigmoid(x)), so class 1 is the sigmoid's positive
    class, and value and gradient are those of the two-channel logits (0, x) exactly (the
    gradient of x is that of the second channel). Every loss then runs unchanged on 2 classes.
    """
    if logits.dim() == 4 and logits.shape[1] == 1 and num_classes == 2:
        return torch.cat([torch.zeros_like(logits), logits], 1)          # [B, 2, h, w]
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        binary = " (or [B, 1, h, w] for a binary model)" if num_classes == 2 else ""
        raise ValueError(f"expected logits [B, {num_classes}, h, w]{binary}, got {list(logits.shape)}")
    return logits


# Full-resolution logits (``stride=``): the paper's losses live on the grid of a stride-8 network,
# pixels (8i, 8j) of the input, with the field's neighbours 8 input pixels apart (a 3x3 field) and
# labels picked at those pixels (docs/protocol.md §1). Picking logits and labels at (8i, 8j) puts
# a full-resolution model on exactly that grid: the paper's loss, at 1/64 of the cost. (Every pixel
# a centre, with neighbours 8 pixels apart, is the other reading: kernel_sizes=(17,) on the full map,
# 64 times the elements; the README's "Using AAF in your own project" says so.)
def _check_num_classes(num_classes: int) -> int:
    """A loss over class logits needs two classes at least (a one-channel sigmoid model is
    num_classes=2); with one, every pair is a non-edge of equal probabilities and the loss is 0."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r} (a binary model with one "
                         "output channel: num_classes=2)")
    return num_classes


def _check_stride(stride: int) -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    return stride


def _at_stride(x: torch.Tensor, labels: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (or features) [B, C, H, W] and labels [B, H, W] of the same size, read at pixels
    (stride*i, stride*j): [B, C, ceil(H/stride), ceil(W/stride)] and the labels there."""
    if _check_stride(stride) == 1:
        return x, labels
    if labels.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"stride={stride} reads logits and labels of the same size, got logits "
                         f"{'x'.join(map(str, x.shape[-2:]))} and labels {'x'.join(map(str, labels.shape[-2:]))}")
    return x[..., ::stride, ::stride], labels[..., ::stride, ::stride]


def _labels_at_stride(labels: torch.Tensor, size: tuple[int, int] | None,
                      stride: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``_at_stride`` for the labels alone (the ``counts`` methods): (labels, size of the logits read)."""
    if _check_stride(stride) == 1:
        return labels, size
    if size is not None and tuple(labels.shape[-2:]) != tuple(size):
        raise ValueError(f"stride={stride} reads logits and labels of the same size, got logits "
                         f"{'x'.join(map(str, size))} and labels {'x'.join(map(str, labels.shape[-2:]))}")
    labels = labels[..., ::stride, ::stride]
    return labels, tuple(labels.shape[-2:])


def _inputs(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
            stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits [B, C, h, w], labels) as a loss reads them: picked at ``stride``, a binary
    model's channel made two, half precision computed in float32."""
    logits, labels = _at_stride(logits, labels, stride)
    return _as_float(_class_logits(logits, num_classes)), labels


def _labels_at(labels: torch.Tensor, logits: torch.Tensor, ignore_index: int,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Labels at the logits' resolution, int64 (or ``dtype``), every ignored pixel set to C (a "void" slot).

    Ignored = ``ignore_index``, or anything outside [0, C). Using C as the void value lets
    per-class sums index a [C + 1] buffer and drop the last entry.
    """
    return _void_marked(downsample_labels(labels, logits.shape[-2:]), logits.shape[1], ignore_index, dtype)


def _void_marked(lab: torch.Tensor, C: int, ignore_index: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Every label outside [0, C), and ``ignore_index``, set to C; then (values in [0, C]) ``dtype``."""
    lab = lab.long().clamp(max=C)                                 # >= C -> C
    lab = lab.masked_fill(lab < 0, C)
    if 0 <= ignore_index < C:                                     # else already void
        lab = lab.masked_fill(lab == ignore_index, C)
    return lab.to(dtype)


def _labels_at_size(labels: torch.Tensor, size: tuple[int, int], num_classes: int,
                    ignore_index: int, stride: int = 1) -> torch.Tensor:
    """``_labels_at`` for a given logits size ``(h, w)`` (the ``counts`` methods: no logits yet)."""
    labels, size = _labels_at_stride(labels, size, stride)
    return _void_marked(downsample_labels(labels, tuple(size)), num_classes, ignore_index, _PAIR_INDEX)


def _n_valid(lab: torch.Tensor, C: int) -> torch.Tensor:
    """Number of valid pixels (0-d int64) of void-marked labels (void = C)."""
    return (lab < C).sum()


def _masked_maps(logits: torch.Tensor, lab: torch.Tensor):
    """(softmax [B, C, h, w], one-hot [B, C, h, w], valid [B, 1, h, w]) for float logits and
    void-marked labels ``lab`` (``_labels_at``), the first two zero at ignored pixels so that
    void neither leaks (one-hot all zero) nor is penalised."""
    C = logits.shape[1]
    valid = (lab < C).unsqueeze(1).to(logits.dtype)
    onehot = F.one_hot(lab, C + 1)[..., :C].permute(0, 3, 1, 2).to(logits.dtype)
    return logits.softmax(dim=1) * valid, onehot, valid


def _safe_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 for an empty set (the official code returns NaN there)."""
    return total / count.clamp(min=1)


def _float32_region(t: torch.Tensor):
    """A region where autocast is off: the losses run in the dtype of their inputs (float32 for
    half inputs, see _as_float) even inside a caller's torch.autocast block."""
    return torch.autocast(t.device.type, enabled=False)


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 inputs (the KL clipping at 1e-4 is below fp16's resolution near 1)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _half_stencil(kernel_size: int) -> list[tuple[int, int]]:
    """Four offsets, one per unordered neighbour pair: d and -d describe the same pixel pair."""
    return [(dy, dx) for dy, dx in stencil(kernel_size) if dy > 0 or (dy == 0 and dx > 0)]


def _pair_regions(h: int, w: int, dy: int, dx: int):
    """Index windows (at_i, at_j) such that pixel j = i + (dy, dx), both in the image.

    Pairs that would leave the image are simply not in the windows (no padding, no wrap-around).
    """
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    if y1 <= y0 or x1 <= x0:
        return None
    at_i = (Ellipsis, slice(y0, y1), slice(x0, x1))
    at_j = (Ellipsis, slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))
    return at_i, at_j


# ============================================================================================
# Appendix: the fused engine behind AffinityFieldLoss and AdaptiveAffinityFieldLoss
# ============================================================================================
# It computes exactly what affinity_field_reference computes (test_losses.py checks loss and
# gradients in float64 to 1e-10), in about 100 operator calls for any number of sizes, with
# the gradient formed in the forward pass and a peak memory under 1/4 of the plain layout's.
#
# Eq. (7) in a few large operations. Element = (centre pixel i, neighbour j = i + d, class
# channel c, kernel size k) with p = P_c(i), q = P_c(j); y is the ground truth. Per pixel and
# channel let
#     u = (clip(p), clip(1 - p)),  v = log u     (the two outcomes of the Bernoulli variable),
# so that KL(q || p) = sum over the two outcomes of u(j) (v(j) - v(i)) = h(j) - <u(j), v(i)>,
# with h = <u, v>. The element is an edge iff onehot_c(y_i) != onehot_c(y_j): a pair with labels
# a != b is an edge in channels a and b and a non-edge in the other C - 2 channels; a pair with
# a == b is a non-edge in every channel. Every valid pair and channel is one of:
# (A) c is the label of neither pixel (a non-edge element): with other_c = [valid, c != label],
#         sum_j other_c(i) other_c(j) KL_c = other_c(i) (Rh_c(i) - <Ru_c(i), v_c(i)>),
#     Rh, Ru = the sums over the 8 neighbours j of other * h and other * u: no tensor of pairs,
#     one dilated depthwise 3x3 convolution per size (zero padding: no pair leaves the image).
#     The other channels are selected by exact zeros (nothing is subtracted), so a set that is
#     empty sums to exactly 0.
# (B) c = a or c = b: the 4 values (pc, npc, lp, lnp) of both pixels in those 2 channels, one
#     gather per unordered pair of every size (the half stencil) for both directed elements
#     i -> j and j -> i: max(0, m - KL) in both channels of an edge pair (a != b), KL in the one
#     shared channel of a pair with a == b (a non-edge element).
# The per-size, per-centre-class sums are then one index_add over bins k (C + 1) + class.
# The module losses are L = sum_{t,k,c} coef[t, k, c] * sum[t, k, c] (t = edge, non-edge; coef =
# weight / count): the gradient is computed in the same pass as the sums, while (A) and (B)
# are at hand, so nothing is recomputed and the backward only scales it (the one tensor kept,
# [B, C, h, w], has the size of the probabilities).


# The labels and bins of the pair tensors: int32 (values in [0, 2 K (C + 1)]), half the memory.
_PAIR_INDEX = torch.int32


def _is_compiling() -> bool:
    """torch.compiler.is_compiling() where it exists (torch >= 2.3); older torch never traces this file."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def _shape_cache(fn):
    """functools.lru_cache for eager calls; under torch.compile the function is traced instead
    (its tensors become constants of the graph)."""
    cached = functools.lru_cache(maxsize=16)(fn)

    @functools.wraps(fn)
    def call(*args):
        return fn(*args) if _is_compiling() else cached(*args)
    return call


class _Stencil(NamedTuple):
    """Index tensors that depend on the shapes alone (cached per shape). Pair tensors keep their
    small axes (pixel, channel, outcome) first and the M = B h w N pairs last, contiguous, so
    that every operation on them runs over long contiguous rows."""
    pad: int                    # S = the largest s: the maps are padded by S pixels
    pix: torch.Tensor           # [2, B, h, w, N]  flat index of (i, j = i + d_n) in the padded map
    pix_row: torch.Tensor       # [2, 1, B, h, w, N] the same times C + 1 (see _Pairs.cell)
    size_bin: torch.Tensor      # [N]              k (C + 1) for offset n (offsets size-major)
    centre_bin: torch.Tensor    # [K, 1, 1, 1]     K (C + 1) + k (C + 1): the non-edge bins
    count_matrix: torch.Tensor  # [2, 2, 1]        (edge pairs, valid pairs) -> (edge, non-edge) elements
    classes: torch.Tensor       # [1, C, 1, 1]     0 .. C-1
    dump: torch.Tensor          # []               C (edge type, size 0, void class): pairs that do not count
    first: torch.Tensor         # [1, 2, 1, 1, 1, 1] (True, False) over the channel axis


@_shape_cache
def _stencil(B: int, h: int, w: int, sizes: tuple[int, ...], C: int, device: torch.device) -> _Stencil:
    """Built once per shape (a cached tensor costs no operator call and, on a GPU, no copy from
    the host in the training loop). N = 4 K unordered offsets, size-major."""
    S = max(sizes) // 2
    Hp, Wp = h + 2 * S, w + 2 * S
    offsets = [(k, dy, dx) for k, size in enumerate(sizes) for dy, dx in _half_stencil(size)]
    centre = torch.arange(B * Hp * Wp).view(B, Hp, Wp)[:, S:S + h, S:S + w, None]   # [B, h, w, 1]
    delta = torch.tensor([dy * Wp + dx for _, dy, dx in offsets])                 # [N]
    pix = torch.stack([centre.expand(B, h, w, len(offsets)), centre + delta])     # [2, B, h, w, N]
    size_bin = torch.tensor([k * (C + 1) for k, _, _ in offsets])
    centre_bin = ((torch.arange(len(sizes)) + len(sizes)) * (C + 1)).view(-1, 1, 1, 1)
    # A valid pair with labels a != b gives 2 directions x 2 edge channels = 4 edge elements;
    # every valid pair gives 2 x C elements, so 2 C n_pairs - 4 n_edges non-edge elements.
    count_matrix = torch.tensor([[4, 0], [-4, 2 * C]]).view(2, 2, 1)
    # Label-valued constants in the labels' dtype (_PAIR_INDEX); the pixel indices stay int64
    # (index_select / index_add_ are much slower with int32 indices on a CPU).
    small = (size_bin, centre_bin, count_matrix, torch.arange(C).view(1, -1, 1, 1))
    return _Stencil(S, pix.to(device), (pix[:, None] * (C + 1)).to(device),
                    *(t.to(device, _PAIR_INDEX) for t in small),
                    torch.tensor(C).to(device), torch.tensor([True, False]).view(1, 2, 1, 1, 1, 1).to(device))


class _Pairs(NamedTuple):
    """What Eq. (7) needs from the labels, computed from the labels alone (``_pairs``). Axes:
    e = endpoint (pixel i or j, also the centre of the directed element), c = channel (label of i or of j)."""
    cell: torch.Tensor        # [2 e, 2 c, B, h, w, N] column of (endpoint e, channel c) in _eq7's table
    pair_bin: torch.Tensor    # [2 e, 2 c, B, h, w, N] bin of the directed element with centre e in
    #                           channel c: t K (C+1) + k (C+1) + class of e, t = 0 (edge) for an edge
    #                           pair, t = 1 (non-edge) for the one channel of a valid pair with equal
    #                           labels, the dump bin C (a void bin) otherwise
    is_edge: torch.Tensor     # [B, h, w, N]         valid pair with different labels
    centre_bin: torch.Tensor  # [K, B, h, w]         non-edge bin of centre i per size (class C if void)
    other: torch.Tensor       # [B, C, h, w]         valid and c is not the pixel's label (bool)
    counts: torch.Tensor      # [2, K] int64         edge / non-edge elements per size


def _pairs(lab: torch.Tensor, sizes: tuple[int, ...], C: int) -> _Pairs:
    """Pairs, element bins and element counts of Eq. (7) from ``lab`` [B, h, w] (void = C)."""
    B, h, w = lab.shape
    st = _stencil(B, h, w, sizes, C, lab.device)
    S = st.pad
    lab_p = F.pad(lab, (S, S, S, S), value=C)                          # [B, Hp, Wp]: outside = void
    cls = lab_p.view(-1)[st.pix]                                       # [2, B, h, w, N] labels of i, j
    pair_ok = cls.amax(0) < C                                          # [B, h, w, N] both valid
    is_edge = pair_ok & (cls[0] != cls[1])                             # labels differ
    # A value is computed for every pair and channel of the gather; the bins decide what counts.
    centre = cls[:, None] + st.size_bin                                # [2, 1, B, h, w, N] edge bin
    same = (pair_ok ^ is_edge) & st.first                              # [1, 2, B, h, w, N]
    pair_bin = torch.where(is_edge, centre, torch.where(same, centre + len(sizes) * (C + 1), st.dump))
    centre_bin = lab + st.centre_bin                                   # [K, B, h, w]
    # Element counts: sum over pixels and over the 4 offsets of each size.
    n = torch.stack([is_edge, pair_ok]).view(2, -1, len(sizes), 4).sum((1, 3))   # [2, K]
    counts = (st.count_matrix * n[None]).sum(1)                        # [2, K]
    other = (lab[:, None] != st.classes) & (lab < C)[:, None]          # [B, C, h, w]
    # Column of (endpoint e, channel c) in the table [4, B Hp Wp (C+1)]; void labels read channel C.
    cell = st.pix_row + cls[None]                                      # [2, 2, B, h, w, N]
    return _Pairs(cell, pair_bin, is_edge, centre_bin, other, counts)


_RING = ((1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0))            # the 8 neighbours of a 3x3 stencil


@_shape_cache
def _ring_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(_RING, dtype=dtype).expand(channels, 1, 3, 3).contiguous().to(device)


def _ring_sums(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """[B, F, h, w] -> [K, B, F, h, w]: per size, the sum of t over the 8 stencil neighbours
    (3x3 ring dilated by s = (k-1)/2), zero outside the image."""
    weight = _ring_kernel(t.shape[1], t.dtype, t.device)
    out = [F.conv2d(t, weight, padding=k // 2, dilation=k // 2, groups=t.shape[1]) for k in sizes]
    return torch.stack(out) if len(out) > 1 else out[0].unsqueeze(0)


def _ring_sums_adjoint(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The adjoint of ``_ring_sums`` ([K, B, F, h, w] -> [B, F, h, w]): the ring is point
    symmetric (d in it iff -d), so the adjoint of each size's sum is the same sum."""
    weight = _ring_kernel(t.shape[2], t.dtype, t.device)
    out = None
    for n, k in enumerate(sizes):
        term = F.conv2d(t[n], weight, padding=k // 2, dilation=k // 2, groups=t.shape[2])
        out = term if out is None else out + term
    return out


def _eq7(prob: torch.Tensor, pairs: _Pairs, sizes: tuple[int, ...], margin: float,
         coef: torch.Tensor | None = None):
    """Eq. (7) summed per size and centre class: sums [2, K, C + 1] (edge, non-edge; slot C is the
    void bin, to drop). With ``coef`` [2, K, C] also the gradient [B, C, h, w] of
    sum(coef * sums[..., :C]) with respect to ``prob``, else None."""
    B, C, h, w = prob.shape
    K, S = len(sizes), max(sizes) // 2
    # Clipped Bernoulli terms (official code: p, q, 1-p, 1-q clipped to [1e-4, 1]; the
    # complements come from the unclipped p).
    raw = torch.stack([prob, 1 - prob], 1)                             # [B, 2, C, h, w]
    u = raw.clamp(KL_CLIP, 1.0)                                        # (clip(p), clip(1-p))
    v = u.log()
    # torch.clamp passes the gradient strictly inside the bounds (kept as bool, raw is dropped).
    inside = ((raw > KL_CLIP) & (raw < 1)) if coef is not None else None
    del raw
    other = pairs.other[:, None]                                       # [B, 1, C, h, w]
    # (A) non-edge elements in the channels that are neither pixel's label. Neighbour side:
    # other * (h, u_p, u_np); centre side: other * (1, -v_p, -v_np).
    nb = torch.cat([(u * v).sum(1, keepdim=True), u], 1).mul_(other)    # [B, 3, C, h, w]
    ring = _ring_sums(nb.flatten(1, 2), sizes).view(K, B, 3, C, h, w)
    del nb
    centre = torch.cat([_one(v).expand(B, 1, C, h, w), -v], 1).mul_(other)   # [B, 3, C, h, w]
    nonedge = (ring * centre).sum((2, 3))                              # [K, B, h, w] per centre
    # (B) the channels of the pair's labels a and b: (pc, npc, lp, lnp) of (i, j) in channels
    # (a, b), read from a table padded by S pixels (outside the image) and by one zero channel
    # (index C, read for void labels; such pairs go to the dump bin anyway).
    table = F.pad(torch.cat([u, v], 1).permute(1, 0, 3, 4, 2), (0, 1, S, S, S, S))   # [4, B, Hp, Wp, C+1]
    table_shape = table.shape
    cell = pairs.cell.flatten()
    z = table.view(4, -1).index_select(1, cell).view(4, *pairs.cell.shape)   # [4, 2 e, 2 c, B, h, w, N]
    del table
    d = z[2:, 1] - z[2:, 0]                                            # v(j) - v(i)  [2, 2 c, ...]
    s = (z[:2] * d[:, None]).sum(0)                                    # <u(e), d>    [2 e, 2 c, ...]
    # kl[e, c]: the element whose centre is endpoint e: KL(P(j) || P(i)) = <u(j), d> for e = i,
    # KL(P(i) || P(j)) = -<u(i), d> for e = j. An edge element if a != b, else (channel a = b) a
    # non-edge one.
    kl = torch.stack([s[1], -s[0]])                                    # [2 e, 2 c, B, h, w, N]
    sums = prob.new_zeros(2 * K * (C + 1))
    sums.index_add_(0, pairs.pair_bin.flatten(),
                    torch.where(pairs.is_edge, (margin - kl).clamp(min=0), kl).flatten())
    sums.index_add_(0, pairs.centre_bin.flatten(), nonedge.flatten())
    sums = sums.view(2, K, C + 1)
    if coef is None:
        return sums, None

    # ---- the gradient of L = sum(coef * sums), in reverse order --------------------------------
    g = F.pad(coef, (0, 1)).flatten()                                  # [2 K (C+1)], void bins 0
    # (A): nonedge = sum ring * centre
    g_ne = g[pairs.centre_bin][:, :, None, None]                       # [K, B, 1, 1, h, w]
    d_v = (g_ne * ring[:, :, 1:]).sum(0).mul_(other)                   # -dL/dv through centre
    del ring
    d_nb = _ring_sums_adjoint((g_ne * centre).flatten(2, 3), sizes)
    del centre
    d_hu = d_nb.view(B, 3, C, h, w).mul_(other)                        # dL/d(h, u_p, u_np)
    del d_nb
    d_u = torch.addcmul(d_hu[:, 1:], d_hu[:, :1], v)                   # dL/du  (h = sum u v)
    d_v = torch.addcmul(d_v, d_hu[:, :1], u, value=-1)                 # -dL/dv
    del d_hu
    # (B): dL/dkl = -g [kl < m] for an edge element, g for a non-edge one; n_kl is minus that,
    # and so are the other n_ / d_ gradients of (B).
    gk = g[pairs.pair_bin]                                             # [2 e, 2 c, B, h, w, N]
    n_kl = torch.where(pairs.is_edge, gk * (kl < margin), -gk)
    del kl, gk
    n_s = torch.stack([-n_kl[1], n_kl[0]])                             # [2 e, 2 c, ...]
    n_d = (n_s * z[:2]).sum(1)                                         # [2, 2 c, ...] through d
    # -dL/dz, written over z (no longer needed): u(e) through s, v(j) and v(i) through d.
    d_z = z
    torch.mul(n_s, d[:, None], out=d_z[:2])
    torch.mul(n_d[:, None], _minus_plus(d), out=d_z[2:])                # (v(i), v(j)): (-, +)
    del z, d, n_s, n_d, n_kl
    d_table = prob.new_zeros(table_shape)
    d_table.view(4, -1).index_add_(1, cell, d_z.view(4, -1))           # pairs share pixels: add
    del d_z
    d_table = d_table[:, :, S:S + h, S:S + w, :C].permute(1, 0, 4, 2, 3)   # [B, 4, C, h, w]
    d_u = d_u - d_table[:, :2]                                         # dL/du
    d_v = d_v + d_table[:, 2:]                                         # -dL/dv
    del d_table
    # v = log u, u = clip(raw), raw = (p, 1 - p).
    d_raw = torch.addcdiv(d_u, d_v, u, value=-1) * inside
    return sums, d_raw[:, 0] - d_raw[:, 1]


@_shape_cache
def _one_cached(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=dtype, device=device)


def _one(t: torch.Tensor) -> torch.Tensor:
    """A 0-d one of t's dtype and device (cached: no operator call, no host-to-device copy)."""
    return _one_cached(t.dtype, t.device)


@_shape_cache
def _minus_plus_cached(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([-1.0, 1.0], dtype=dtype, device=device).view(2, 1, 1, 1, 1, 1)


def _minus_plus(t: torch.Tensor) -> torch.Tensor:
    """(-1, 1) over the pixel axis of the pair tensors, in t's dtype and device (cached)."""
    return _minus_plus_cached(t.dtype, t.device)


def _first_order_only() -> None:
    """The hand-written backwards give the first derivative only. A double backward (a gradient
    penalty, create_graph=True, which runs the backward with grad mode on) would silently treat
    that derivative as a constant, so it is refused."""
    if torch.is_grad_enabled() and not _is_compiling():
        raise RuntimeError("the affinity losses support first-order gradients only: "
                           "backward(create_graph=True) / double backward is not implemented")


class _AffinityFieldLossFn(torch.autograd.Function):
    """L = sum_{t,k,c} coef[t, k, c] * sums[t, k, c] with the gradient of ``_eq7`` computed in the
    forward pass; backward scales it. coef [2, K, C] may require grad (AAF's weights)."""

    @staticmethod
    def forward(ctx, prob, coef, pairs, sizes, margin):
        sums, grad = _eq7(prob, _Pairs(*pairs), sizes, margin, coef if ctx.needs_input_grad[0] else None)
        sums = sums[..., :-1]                                          # [2, K, C], void dropped
        ctx.save_for_backward(grad, sums if ctx.needs_input_grad[1] else None)
        return (coef * sums).sum()

    @staticmethod
    def backward(ctx, g):
        _first_order_only()
        grad, sums = ctx.saved_tensors
        return (grad * g if grad is not None else None, sums * g if sums is not None else None,
                None, None, None)


def _affinity_loss(logits: torch.Tensor, pairs: _Pairs, sizes: tuple[int, ...], margin: float,
                   coef: torch.Tensor) -> torch.Tensor:
    prob = logits.softmax(dim=1)                                       # [B, C, h, w]
    return _AffinityFieldLossFn.apply(prob, coef, tuple(pairs), sizes, margin)


class _AffinityFieldSums(torch.autograd.Function):
    """Eq. (7) summed per kernel size and per centre class (``_eq7``), with a hand-written backward
    that recomputes from the saved probabilities and labels.

    forward(prob [B,C,h,w], lab [B,h,w] (C = void), sizes, margin) returns
      edge_sum    [K, C]  sum of max(0, m - KL) over edge elements, split by the centre's class
      nonedge_sum [K, C]  sum of KL over non-edge elements, split by the centre's class
      edge_count  [K]     number of edge elements      (int64, not differentiable)
      nonedge_count [K]   number of non-edge elements  (int64, not differentiable)
    Splitting by the centre's class is what Eqs. (8)-(10) need: AAF weighs each element by
    w[y_i, k] (official code), so L_AAF = sum_k sum_c w[c, k] * sum[k, c] / count[k].
    """

    @staticmethod
    def forward(ctx, prob, lab, sizes, margin):
        pairs = _pairs(lab, sizes, prob.shape[1])
        sums, _ = _eq7(prob, pairs, sizes, margin)
        ctx.save_for_backward(prob, lab)
        ctx.sizes, ctx.margin = sizes, margin
        return sums[0, :, :-1], sums[1, :, :-1], pairs.counts[0], pairs.counts[1]

    @staticmethod
    def backward(ctx, g_edge, g_nonedge, _g_ec, _g_nc):
        _first_order_only()
        prob, lab = ctx.saved_tensors
        pairs = _pairs(lab, ctx.sizes, prob.shape[1])
        _, grad = _eq7(prob, pairs, ctx.sizes, ctx.margin, torch.stack([g_edge, g_nonedge]))
        return grad, None, None, None
