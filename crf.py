"""Dense CRF post-processing: the baseline of the paper's Table 6 (Cityscapes, "CRF [5]").

    python evaluate.py --ckpt model.pt --metric all --crf          # the data set's DeepLab setting
    python infer.py --ckpt model.pt --input photos/ --out preds/ --crf --crf-bi-xy 80

The fully connected CRF of Krähenbühl & Koltun (NIPS 2011) on the final class probabilities
P [C, H, W] at image resolution, as DeepLab applies it (Chen et al., "Semantic image
segmentation with deep convolutional nets and fully connected CRFs", ICLR 2015; "DeepLab: ...
atrous convolution, and fully connected CRFs", TPAMI 2018, arXiv:1606.00915):

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) [ w1 exp(-|p_i - p_j|^2 / 2 sa^2 - |I_i - I_j|^2 / 2 sb^2)
                                                      + w2 exp(-|p_i - p_j|^2 / 2 sg^2) ]

with the unary psi_u(x_i = l) = -log P_i(l), the Potts compatibility mu = [x_i != x_j], pixel
positions p (in pixels) and RGB colours I (0..255). The first kernel is the bilateral
(appearance) kernel: weight w1 (`bi_w`), position std sa (`bi_xy`), colour std sb (`bi_rgb`); the
second is the Gaussian (smoothness) kernel: weight w2 (`pos_w`), std sg (`pos_xy`). Mean-field
inference runs a fixed number of iterations (`iters`) and returns the approximate marginals
Q [C, H, W]; the label is their argmax. A unary from logits gives the same result as one from
log-probabilities (the two differ by a constant per pixel, which mean field ignores).

The CRF itself is the maintained PyPI package pydensecrf2 (`import pydensecrf.densecrf`), a
wrapper of Krähenbühl's C++ code with its permutohedral-lattice filtering; it is imported only
when the CRF is used. The paper reports the CRF 0.5 points below its PSPNet base on Cityscapes
and "40 seconds" per image; `python bench.py crf` measures the cost here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PACKAGE = "pydensecrf2"
# Unary floor: -log(1e-8) = 18.4. A probability of exactly 0 (possible in float32 after the
# softmax) would give an infinite unary; above the floor nothing changes.
PROB_FLOOR = 1e-8


@dataclass(frozen=True)
class CRFParams:
    """The six numbers of a DeepLab-style dense CRF (see the module docstring for the energy)."""

    iters: int  # mean-field iterations
    pos_w: float  # w2, weight of the Gaussian (position) kernel
    pos_xy: float  # sigma_gamma, its position std in pixels
    bi_w: float  # w1, weight of the bilateral (position + colour) kernel
    bi_xy: float  # sigma_alpha, its position std in pixels
    bi_rgb: float  # sigma_beta, its colour std in 0..255 RGB units


# DeepLab v2 (Chen et al., TPAMI 2018, arXiv:1606.00915), ResNet-101 on PASCAL VOC 2012: the
# values the authors released with their ResNet-101 model, 10 mean-field iterations.
# (DeepLab v1's VGG-16 "CRF-LargeFOV" used w1 = 4, sigma_alpha = 121, sigma_beta = 5, w2 = 3,
# sigma_gamma = 3: pass those with the flags to compare.)
DEEPLAB_V2_RESNET101 = CRFParams(iters=10, pos_w=3.0, pos_xy=1.0, bi_w=4.0, bi_xy=67.0, bi_rgb=3.0)

# Per data set, by data.DatasetInfo name. DeepLab v2 also reports a CRF on Cityscapes, but we
# found no Cityscapes-specific values in its paper or released files; until such values are
# known, Cityscapes and GTA5 (the same street scenes at about the same 2k resolution) use the
# ResNet-101 values above. Every other data set (CamVid, synthetic) gets DEFAULT_PARAMS too.
# All six numbers can be overridden with the --crf-* flags.
CRF_DEFAULTS: dict[str, CRFParams] = {
    "voc": DEEPLAB_V2_RESNET101,
    "cityscapes": DEEPLAB_V2_RESNET101,
    "gta5": DEEPLAB_V2_RESNET101,
}
DEFAULT_PARAMS = DEEPLAB_V2_RESNET101
FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))
FLAG_HELP = {
    "iters": "mean-field iterations",
    "pos_w": "weight w2 of the Gaussian (position) kernel; 0 drops the kernel",
    "pos_xy": "position std sigma_gamma of the Gaussian kernel, pixels",
    "bi_w": "weight w1 of the bilateral (position + colour) kernel; 0 drops the kernel",
    "bi_xy": "position std sigma_alpha of the bilateral kernel, pixels",
    "bi_rgb": "colour std sigma_beta of the bilateral kernel, 0..255 RGB units",
}


def default_params(dataset: str) -> CRFParams:
    """The CRF setting used for `dataset` (a data.DATASETS name) when no --crf-* flag is given."""
    return CRF_DEFAULTS.get(dataset, DEFAULT_PARAMS)


def load_densecrf() -> Any:
    """The `pydensecrf.densecrf` module, or a one-line exit naming the package to install."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        raise SystemExit(f"the dense CRF (--crf) needs the package {PACKAGE}: pip install {PACKAGE}") from None
    return densecrf


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def dense_crf(probs: Any, rgb: Any, params: CRFParams) -> np.ndarray:
    """Mean-field marginals Q `[C, H, W]` float32 of the dense CRF on probabilities `probs`
    `[C, H, W]` (numpy or torch, any device, any strides) and the image `rgb` `[H, W, 3]` uint8.

    A kernel whose weight is 0 is left out, so with both weights 0 the result is the
    normalised input (the argmax is unchanged). Every image size works, 1x1 included.
    """
    densecrf = load_densecrf()
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    rgb = np.asarray(rgb)
    if probs.ndim != 3 or probs.shape[0] < 1 or 0 in probs.shape:
        raise ValueError(f"dense CRF: expected probabilities [C, H, W], got shape {probs.shape}")
    num_classes, height, width = probs.shape
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise ValueError(f"dense CRF: expected the image as uint8 [{height}, {width}, 3] to match the "
                         f"probabilities, got {rgb.dtype} {rgb.shape}")
    if not np.isfinite(probs).all() or probs.min() < 0:
        raise ValueError("dense CRF: the probabilities must be finite and non-negative")
    # psi_u = -log P, [C, H * W] row-major (pixel index y * W + x), C-contiguous float32 as the
    # C++ code reads it.
    unary = np.ascontiguousarray(-np.log(np.maximum(probs, PROB_FLOOR)).reshape(num_classes, -1))
    model = densecrf.DenseCRF2D(width, height, num_classes)  # width first
    model.setUnaryEnergy(unary)
    if params.pos_w > 0:
        model.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    if params.bi_w > 0:
        model.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb, rgbim=np.ascontiguousarray(rgb),
                                   compat=params.bi_w)
    q = np.array(model.inference(params.iters), dtype=np.float32)  # [C, H * W]
    return q.reshape(num_classes, height, width)


def refine(probs: torch.Tensor, rgb: np.ndarray, params: CRFParams) -> torch.Tensor:
    """`dense_crf` for the callers of infer.predict: probabilities `[C, H, W]` in, CRF marginals
    `[C, H, W]` float32 out, on the device the probabilities came from."""
    return torch.from_numpy(dense_crf(probs, rgb, params)).to(probs.device)


# --------------------------------------------------------------------------------------------
# Command-line flags (evaluate.py, infer.py)
# --------------------------------------------------------------------------------------------
def _default_text(field: str) -> str:
    """'67 on every data set' or 'voc 67, cityscapes 80, others 67' for a CRFParams field."""
    values = {name: getattr(p, field) for name, p in CRF_DEFAULTS.items()}
    other = getattr(DEFAULT_PARAMS, field)
    if all(v == other for v in values.values()):
        return f"{other:g} on every data set"
    return ", ".join(f"{name} {v:g}" for name, v in values.items()) + f", others {other:g}"


def add_crf_args(parser: argparse.ArgumentParser) -> None:
    """--crf and the six --crf-* overrides, in their own --help group."""
    group = parser.add_argument_group(
        "dense CRF (the paper's Table 6 baseline)",
        "Fully connected CRF (Krähenbühl & Koltun 2011) on the predicted probabilities before the\n"
        "argmax, with the setting DeepLab v2 released for its ResNet-101 on PASCAL VOC (Chen et al.,\n"
        "TPAMI 2018): 10 iterations, Gaussian kernel w2 3, std 1 px; bilateral kernel w1 4, std 67 px,\n"
        "colour std 3. DeepLab published no Cityscapes values that we found, so every data set uses\n"
        f"these (crf.py, CRF_DEFAULTS). Needs the package {PACKAGE} (pip install {PACKAGE}).")
    group.add_argument("--crf", action="store_true",
                       help="refine each image's probabilities with the dense CRF (default: off)")
    for field in FIELDS:
        kind = int if field == "iters" else float
        group.add_argument(f"--crf-{field.replace('_', '-')}", dest=f"crf_{field}", type=kind, default=None,
                           help=f"{FLAG_HELP[field]} (default: {_default_text(field)})")


def arg_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the CRF flags (empty list: nothing); for the scripts' one-line checks."""
    problems = []
    given = [f for f in FIELDS if getattr(args, f"crf_{f}", None) is not None]
    if given and not getattr(args, "crf", False):
        flags = ", ".join(f"--crf-{f.replace('_', '-')}" for f in given)
        problems.append(f"{flags} only apply with --crf")
    for field in given:
        value = getattr(args, f"crf_{field}")
        flag = f"--crf-{field.replace('_', '-')}"
        if field == "iters" and value < 1:
            problems.append(f"{flag} {value} must be >= 1")
        elif field.endswith("_w") and not (math.isfinite(value) and value >= 0):
            problems.append(f"{flag} {value} must be a finite weight >= 0")
        elif field != "iters" and not field.endswith("_w") and not (math.isfinite(value) and value > 0):
            problems.append(f"{flag} {value} must be a finite standard deviation > 0")
    return problems


def params_from_args(args: argparse.Namespace, dataset: str) -> CRFParams | None:
    """The CRF setting the flags ask for (None without --crf): the data set's defaults with the
    given --crf-* values in their place. Checks that pydensecrf2 imports before any work starts.
    Call `arg_problems` first."""
    if not getattr(args, "crf", False):
        return None
    load_densecrf()
    overrides = {f: getattr(args, f"crf_{f}") for f in FIELDS if getattr(args, f"crf_{f}", None) is not None}
    return dataclasses.replace(default_params(dataset), **overrides)
