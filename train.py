"""Training: the paper's recipe (section 4, SPEC section 6) with every projection loss of Table 2.

One iteration, for a crop batch `x [B, 3, H, W]` with labels `y [B, H, W]`:

    logits = model(x)                                   # [B, C, H/8, W/8], never upsampled
    y8     = downsample_labels(y, logits.shape[-2:])    # nearest pick of pixel (8i, 8j)
    loss   = CE(logits, y8) + lambda * 10^(-t/T) * projection(logits, y8)

- Poly learning rate per iteration, base * (1 - t/T)^0.9; SGD momentum 0.9, weight decay 5e-4 on
  conv weights only; the head (PSP module and classifier) at 10x the base rate.
- The 10^(-t/T) factor comes from the authors' official code (not the paper): the projection term
  fades from 1x to 0.1x over training; the author says it is needed for convergence. On by
  default (`--no-decay` turns it off); applied to every projection loss so that the Table 2
  comparison differs only in the projection.
- `--loss aaf` (Eq. 9, SPEC 3): the network minimises the AAF loss and the kernel-size weights
  maximise it, in the same iteration from the same backward pass: the weights have their own SGD
  (momentum 0.9, the backbone's poly rate, no weight decay, `maximize=True`).
- `--loss gan` (Eqs. 5-6): the discriminator and the segmentation network update in alternating
  steps: D on the detached predictions, then the network against the updated D.
- Multi-GPU with torchrun (env ranks, DDP, SyncBatchNorm on GPU, DistributedSampler); rank 0
  alone logs and writes. Checkpoints are plain types written atomically; `--resume` continues
  bit-exactly on CPU (data order and augmentation are functions of (seed, epoch, index)).

    python train.py                  # demo: synthetic data, tiny PSPNet, CPU, then val mIoU
    torchrun --nproc_per_node=4 train.py --dataset voc --data-root data/VOCdevkit --loss aaf --amp
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import data
import evaluate
import infer
import losses
import model as model_lib

LOSSES = ("ce", "affinity", "aaf", "random", "gan", "embedding")
# Projection losses whose paper weight is not the data set's affinity lambda (SPEC 4, 6).
SMALL_LAMBDA_LOSSES = {"random": 0.01, "gan": 0.01}
DEFAULT_MARGIN = 3.0  # SPEC 6: m = 3.0 everywhere
# Checkpoint key of the trained weights inside a projection loss (+ "_optimizer" for their SGD).
ADVERSARY_KEYS = {"aaf": "aaf", "gan": "disc"}
# Settings that define the optimisation trajectory: a resumed run must use the same ones.
TRAJECTORY_ARGS = ("dataset", "train_split", "train_length", "crop_size", "arch", "backbone", "loss",
                   "loss_lambda", "margin", "kernel_sizes", "decay", "iters", "batch_size", "lr",
                   "head_lr_mult", "momentum", "weight_decay", "seed")


# ----------------------------------------------------------------------------- schedules

def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """Poly learning rate of iteration `step` (0-based) out of `total`: base * (1 - t/T)^power."""
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    return base_lr * max(0.0, 1.0 - step / total) ** power


def affinity_decay(step: int, total: int) -> float:
    """Official-code weight of the projection term at iteration `step`: 10^(-t/T), 1 -> 0.1."""
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    return 10.0 ** (-step / total)


# ----------------------------------------------------------------------------- arguments

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left at 'dataset default' take the paper's value for --dataset "
               "(data.py's DatasetInfo; SPEC section 6).")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=sorted(data.DATASET_NAMES),
                   help="data set (default: synthetic, generated on the fly, no download); folder: your own "
                        "data at --data-root (classes.txt, images/<split>/, labels/<split>/; README 'Your own "
                        f"data'), whose defaults are: {data.FOLDER_DEFAULTS_TEXT}")
    g.add_argument("--data-root", default=None, help="folder holding the data set (not needed for synthetic)")
    g.add_argument("--train-split", default=None,
                   help="training split (dataset default, e.g. VOC train_aug; VOC stage 2: train)")
    g.add_argument("--crop-size", type=int, default=None,
                   help="square training crop, a multiple of 8 (dataset default: VOC 336, Cityscapes 720)")
    g.add_argument("--train-length", type=int, default=None, metavar="N",
                   help="train on the first N samples only (quick runs and tests; default: all)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loading processes per rank (default: 4 on GPU, 0 on CPU)")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="pspnet", choices=model_lib.ARCHS, help="segmentation head (default: pspnet)")
    g.add_argument("--backbone", default=None, choices=model_lib.BACKBONES,
                   help="dilated backbone (default: tiny for synthetic, resnet101 otherwise)")
    g.add_argument("--pretrained", default=None,
                   help="backbone initialisation: imagenet (torchvision's weight file in the torch hub cache), "
                        "a state-dict path, or none (default: imagenet for ResNets, none for tiny; "
                        "unused with --init / --resume)")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss", default="aaf", choices=LOSSES,
                   help="projection added to cross-entropy: ce (none), affinity (Eq. 7), aaf (Eqs. 8-10), "
                        "random (Eq. 4), gan (Eqs. 5-6), embedding (contrastive on features) (default: aaf)")
    g.add_argument("--lambda", dest="loss_lambda", type=float, default=None,
                   help="projection weight (default: dataset's, VOC 1.0, Cityscapes 0.6; random/gan 0.01)")
    g.add_argument("--margin", type=float, default=None,
                   help="edge margin m (default: 3.0; embedding: the loss's own default)")
    g.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                   help="field sizes (default: aaf dataset's, VOC 3 5; affinity 3; random 5; embedding 3)")
    g.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True,
                   help="multiply the projection term by 10^(-t/T) as the official code does (default: on)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None,
                   help="training iterations (dataset default: VOC 30000, Cityscapes 90000)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split evenly across processes (dataset default: 8)")
    g.add_argument("--lr", type=float, default=None,
                   help="base learning rate (dataset default: 1e-3; VOC stage 2: 1e-4)")
    g.add_argument("--head-lr-mult", type=float, default=10.0,
                   help="learning-rate multiplier of the head, PSP module and classifier (default: 10)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum of the network, AAF weights and discriminator (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay on conv weights only (default: 5e-4)")

    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on GPU (ignored on CPU)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and augmentation (default: 0)")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<dataset>_<loss>, or the --resume folder)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue an interrupted run exactly from its last.pt (pass the run's other flags again)")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start from a checkpoint's weights (network, and AAF weights / discriminator when the "
                        "checkpoint has them); optimizer, step and schedule start afresh (VOC stage 2)")
    g.add_argument("--finetune", action="store_true",
                   help="the data set's second stage (VOC: on train, lr 1e-4, 30000 iterations); use with --init")
    g.add_argument("--save-every", type=int, default=None,
                   help="write last.pt every N iterations (default: iters/10, at most 1000)")
    g.add_argument("--log-every", type=int, default=20, help="log every N iterations (default: 20)")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="single-scale mIoU on the validation split after training (default: on)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the log records (loss terms, lr, images/s, AAF field sizes per class) and, "
                        "when it evaluates, validation images | ground truth | prediction as TensorBoard events "
                        "in <out>/tensorboard (needs: pip install tensorboard; default: off)")

    g = parser.add_argument_group("testing hooks")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N iterations without writing model.pt, as if the run were killed")
    g.add_argument("--dump-rank-state", action="store_true",
                   help="every rank writes its parameters to <out>/rank<R>.pt at the end (consistency check)")
    return parser


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, data.DatasetInfo]:
    """Fill the per-dataset defaults (SPEC 6) and check the invariants before anything runs."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays untouched
    try:
        info = data.dataset_info(args.dataset, args.data_root)  # folder: classes and splits from the root
    except data.DatasetError as err:
        raise SystemExit(f"train.py: {err}") from None
    if args.backbone is None:
        args.backbone = "tiny" if args.dataset == "synthetic" else "resnet101"
    if args.resume or args.init:
        args.pretrained = "none"  # every weight comes from the checkpoint
    elif args.pretrained is None:
        args.pretrained = "none" if args.backbone == "tiny" else "imagenet"
    if args.finetune:
        if info.finetune_split is None:
            raise SystemExit(f"train.py: --finetune: {args.dataset} has no second training stage")
        for name, value in (("train_split", info.finetune_split), ("lr", info.finetune_lr),
                            ("iters", info.finetune_iters)):
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name in ("crop_size", "iters", "batch_size", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(info, name))
    if args.train_split is None:
        args.train_split = info.train_split
    if args.loss_lambda is None:
        args.loss_lambda = SMALL_LAMBDA_LOSSES.get(args.loss, info.loss_lambda)
    if args.margin is None and args.loss in ("affinity", "aaf"):
        args.margin = DEFAULT_MARGIN
    if args.kernel_sizes is None:
        args.kernel_sizes = {"affinity": [3], "aaf": list(info.kernel_sizes), "random": [5],
                             "embedding": [3]}.get(args.loss, [])
    args.kernel_sizes = [int(k) for k in args.kernel_sizes]
    if args.save_every is None:
        args.save_every = max(1, min(1000, args.iters // 10))
    if args.out is None:
        stage = "_finetune" if args.finetune else ""
        args.out = str(Path(args.resume).parent) if args.resume else f"runs/{args.dataset}_{args.loss}{stage}"

    stride = model_lib.OUTPUT_STRIDE
    problems = []
    if args.crop_size <= 0 or args.crop_size % stride:
        problems.append(f"--crop-size {args.crop_size} must be a positive multiple of the output stride {stride}")
    if args.iters <= 0 or args.batch_size <= 0 or args.lr < 0:
        problems.append("--iters and --batch-size must be positive and --lr non-negative")
    if any(k < 3 or k % 2 == 0 for k in args.kernel_sizes):
        problems.append(f"--kernel-sizes {args.kernel_sizes}: each must be odd and >= 3 (k = 2s + 1)")
    if args.loss in ("random", "embedding") and len(args.kernel_sizes) != 1:
        problems.append(f"--loss {args.loss} takes one kernel size, got {args.kernel_sizes}")
    if args.loss in ("ce", "gan") and args.kernel_sizes:
        problems.append(f"--loss {args.loss} has no field size; drop --kernel-sizes")
    if args.resume and args.init:
        problems.append("--resume and --init exclude each other (resume continues a run, init starts a new one)")
    if args.finetune and not args.init and not args.resume:
        problems.append("--finetune continues from a first-stage model: give it with --init")
    if args.log_every <= 0 or args.save_every <= 0:
        problems.append("--log-every and --save-every must be positive")
    if args.eval and info.val_split not in info.splits:  # a folder set without images/val: say so now
        problems.append(f"{args.dataset} has no {info.val_split!r} split for the final evaluation "
                        f"(splits: {', '.join(info.splits)}); add it or pass --no-eval")
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))
    return args, info


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when started with plain python)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Ranks from the torchrun environment; nccl on GPU, gloo on CPU."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("train.py: --device cuda but no GPU is visible")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if dist.enabled and device.type == "cuda":
        torch_dist.init_process_group(backend="nccl", device_id=device)
    elif dist.enabled:
        torch_dist.init_process_group(backend="gloo")
    return dist, device


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def average_gradients(params: list[nn.Parameter], dist: Dist) -> None:
    """Average the gradients of parameters DDP does not manage (AAF weights, discriminator).

    We all_reduce explicitly instead of wrapping these modules in DDP: the discriminator is used
    through two methods rather than forward() (DDP only hooks forward), and the AAF weights are
    a few hundred numbers. Identical start (zeros / broadcast) + identical averaged gradients +
    identical optimizers keep them identical on every rank.
    """
    if not dist.enabled:
        return
    for p in params:
        if p.grad is not None:
            torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
            p.grad.div_(dist.world_size)


def broadcast_parameters(module: nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's copy (the discriminator's random initialisation)."""
    if dist.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------- data

def training_batches(dataset: data.SegmentationDataset, args: argparse.Namespace, dist: Dist, start_step: int,
                     pin_memory: bool) -> Iterator[dict]:
    """Endless stream of this rank's batches, starting at iteration `start_step`.

    Each epoch is a DistributedSampler permutation (set_epoch) and the data set's augmentation
    is a function of (seed, epoch, index) (data.py's set_epoch). Iteration t is batch t mod n of
    epoch t div n, so a resumed run skips the consumed batches of its epoch without loading them
    and sees exactly the crops an uninterrupted run would, whatever the number of workers.
    """
    local_batch = args.batch_size // dist.world_size
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // local_batch
    if per_epoch == 0:
        raise SystemExit(f"train.py: {len(dataset)} training samples cannot fill one global batch of "
                         f"{args.batch_size}")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # before the loader exists, so that its workers' copies see it
        indices = list(sampler)[skip * local_batch:]
        # Own generator: creating a loader must not consume the global RNG (it differs on resume).
        loader = DataLoader(dataset, batch_size=local_batch, sampler=indices,
                            num_workers=args.workers, pin_memory=pin_memory, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0


def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] (channels-last on GPU, as the model) and labels [B, H, W] on `device`."""
    images = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


# ----------------------------------------------------------------------------- model, losses, optimizers

@dataclass
class Parts:
    """Everything one training iteration touches."""
    model: nn.Module                      # DDP-wrapped when distributed
    model_without_ddp: nn.Module
    projection: nn.Module | None          # the loss module (AAF weights / discriminator inside)
    optimizer: torch.optim.Optimizer
    projection_optimizer: torch.optim.Optimizer | None  # AAF weights (ascent) or discriminator


def build_projection(args: argparse.Namespace, info: data.DatasetInfo) -> nn.Module | None:
    """The projection loss of `--loss` (None for plain cross-entropy)."""
    c, ks, ignore = info.num_classes, tuple(args.kernel_sizes), info.ignore_index
    if args.loss == "affinity":
        return losses.AffinityFieldLoss(c, kernel_sizes=ks, margin=args.margin, ignore_index=ignore)
    if args.loss == "aaf":
        return losses.AdaptiveAffinityFieldLoss(c, kernel_sizes=ks, margin=args.margin, ignore_index=ignore)
    if args.loss == "random":
        return losses.RandomProjectionLoss(c, kernel_size=ks[0], seed=args.seed, ignore_index=ignore)
    if args.loss == "gan":
        return losses.AdversarialProjection(c, ignore_index=ignore)
    if args.loss == "embedding":
        margin = {} if args.margin is None else {"margin": args.margin}
        return losses.EmbeddingContrastiveLoss(kernel_size=ks[0], ignore_index=ignore, num_classes=c, **margin)
    return None


def build_optimizers(model: nn.Module, projection: nn.Module | None,
                     args: argparse.Namespace) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Network SGD (head 10x, weight decay on conv weights) and the projection's own SGD.

    Every param group carries `lr_mult`; `set_lr` multiplies the poly rate by it each iteration.
    """
    groups = model_lib.param_groups(model, weight_decay=args.weight_decay, head_lr_mult=args.head_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    projection_optimizer = None
    if args.loss == "aaf":
        # Eq. (9): the kernel-size weights ascend the same loss, at the backbone's rate, no decay.
        projection_optimizer = torch.optim.SGD([{"params": list(projection.parameters()), "lr_mult": 1.0}],
                                               lr=args.lr, momentum=args.momentum, maximize=True)
    elif args.loss == "gan":
        # The discriminator is trained from scratch like the head, so it takes the head's rate.
        projection_optimizer = torch.optim.SGD(
            [{"params": list(projection.parameters()), "lr_mult": args.head_lr_mult}],
            lr=args.lr, momentum=args.momentum)
    return optimizer, projection_optimizer


def set_lr(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]


def build_parts(args: argparse.Namespace, info: data.DatasetInfo, device: torch.device, dist: Dist,
                init: dict | None = None) -> Parts:
    """Model (+ `init` weights), projection, optimizers, then SyncBN/DDP when distributed."""
    pretrained = None if args.pretrained == "none" else args.pretrained
    model = model_lib.build_model(args.arch, info.num_classes, backbone=args.backbone, pretrained=pretrained,
                                  verbose=dist.is_main)
    projection = build_projection(args, info)
    if init is not None:
        load_init_weights(model, projection, init, args)
    if dist.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # faster cuDNN convolutions in bf16
    if projection is not None:
        projection.to(device)
        broadcast_parameters(projection, dist)
    optimizer, projection_optimizer = build_optimizers(model, projection, args)
    ddp_model = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return Parts(ddp_model, model, projection, optimizer, projection_optimizer)


def load_init_weights(model: nn.Module, projection: nn.Module | None, ckpt: dict, args: argparse.Namespace) -> None:
    """`--init`: network weights, and the AAF weights / discriminator when the checkpoint has them
    (the official scripts reset the AAF weights between VOC stages; we carry them over)."""
    key = ADVERSARY_KEYS.get(args.loss)
    pieces = [(model, ckpt["model"], f"--arch {args.arch} --backbone {args.backbone}")]
    if key is not None and ckpt.get(key) is not None:
        pieces.append((projection, ckpt[key], f"--loss {args.loss} --kernel-sizes {args.kernel_sizes}"))
    for module, state, what in pieces:
        try:
            model_lib.check_state_dict(module, state, what)  # one line naming what differs
        except ValueError as err:
            raise SystemExit(f"train.py: --init {args.init}: {err}") from None
        module.load_state_dict(state)


# ----------------------------------------------------------------------------- one iteration

class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite."""


def check_finite(terms: dict[str, torch.Tensor], step: int, dist: Dist) -> dict[str, float]:
    """Global (rank-averaged) values of the loss terms; raises if any is not finite.

    Reducing before the check makes every rank stop at the same iteration.
    """
    values = torch.stack([t.detach().float() for t in terms.values()])
    if dist.enabled:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        values /= dist.world_size
    result = dict(zip(terms, values.tolist()))
    if not all(math.isfinite(v) for v in result.values()):
        raise NonFiniteLoss(f"non-finite loss at step {step}: " +
                            " ".join(f"{k}={v:.6g}" for k, v in result.items()))
    return result


def discriminator_step(parts: Parts, logits: torch.Tensor, small: torch.Tensor, amp: torch.autocast,
                       dist: Dist) -> torch.Tensor:
    """GAN, alternating step 1 (Eq. 6): D learns to tell the current detached predictions from GT."""
    with amp:
        loss = parts.projection.discriminator_loss(logits.detach(), small)
    parts.projection_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(list(parts.projection.parameters()), dist)
    # A NaN here stops training in check_finite; the corrupted in-memory D is never written.
    parts.projection_optimizer.step()
    return loss.detach()


def train_step(parts: Parts, images: torch.Tensor, labels: torch.Tensor, step: int,
               args: argparse.Namespace, dist: Dist = Dist()) -> dict[str, float]:
    """One iteration at `step` (0-based): set LRs, forward, check, backward, optimizer steps.

    images [B, 3, H, W] normalised; labels [B, H, W] full-resolution crop labels. Returns the
    rank-averaged loss terms: `ce`, the projection's raw (unweighted) value under its --loss
    name, `total` (what the network minimises) and, for the GAN, `disc`.
    """
    lr = poly_lr(args.lr, step, args.iters)
    set_lr(parts.optimizer, lr)
    set_lr(parts.projection_optimizer, lr)
    weight = args.loss_lambda * (affinity_decay(step, args.iters) if args.decay else 1.0)
    amp = torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                         enabled=args.amp and images.device.type == "cuda")
    proj = parts.projection
    with amp:
        if args.loss == "embedding":
            logits, features = parts.model(images, return_features=True)  # [B, C, h, w], [B, F, h, w]
        else:
            logits = parts.model(images)                                   # [B, C, h, w] at stride 8
        # Downsample once (nearest pick of pixel (8i, 8j), SPEC 1); every loss gets this [B, h, w] map.
        small = losses.downsample_labels(labels, logits.shape[-2:])
        terms = {"ce": losses.unary_loss(logits, small)}                   # Eq. (1)
    if args.loss == "gan":
        terms["disc"] = discriminator_step(parts, logits, small, amp, dist)
    with amp:
        if args.loss == "gan":
            # Alternating step 2 (Eq. 5): the network fools the updated D (no gradient into D).
            terms["gan"] = proj.generator_loss(logits, small)
        elif args.loss == "embedding":
            terms["embedding"] = proj(features, small)
        elif proj is not None:
            terms[args.loss] = proj(logits, small)
    total = terms["ce"] + weight * terms[args.loss] if proj is not None else terms["ce"]
    terms["total"] = total
    values = check_finite(terms, step, dist)

    parts.optimizer.zero_grad(set_to_none=True)
    if args.loss == "aaf":
        parts.projection_optimizer.zero_grad(set_to_none=True)
    # One backward pass: network gradients (minimised) and, for AAF, the weights' (maximised).
    total.backward()
    parts.optimizer.step()
    if args.loss == "aaf":
        average_gradients(list(proj.parameters()), dist)
        parts.projection_optimizer.step()  # maximize=True: ascent on the same loss (Eq. 9)
    return values


# ----------------------------------------------------------------------------- checkpoints

def rng_state(device: torch.device) -> dict:
    """Every generator's state as plain types (tensors, lists, ints) for weights_only loading."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def checkpoint(parts: Parts, args: argparse.Namespace, info: data.DatasetInfo, step: int,
               device: torch.device, world_size: int) -> dict:
    """The layout model.load_checkpoint reads, plain types only (weights_only=True loads it)."""
    proj, key = parts.projection, ADVERSARY_KEYS.get(args.loss)
    return {
        "model": parts.model_without_ddp.state_dict(),
        "meta": {**parts.model_without_ddp.meta, "num_classes": info.num_classes,
                 "class_names": list(info.class_names), "dataset": args.dataset, "loss": args.loss,
                 "palette": [list(colour) for colour in info.palette],  # a folder set's colours, for infer.py
                 "kernel_sizes": list(args.kernel_sizes)},
        "step": step,
        "args": vars(args),
        "world_size": world_size,
        "optimizer": parts.optimizer.state_dict(),
        "aaf": proj.state_dict() if key == "aaf" else None,
        "aaf_optimizer": parts.projection_optimizer.state_dict() if key == "aaf" else None,
        "disc": proj.state_dict() if key == "disc" else None,
        "disc_optimizer": parts.projection_optimizer.state_dict() if key == "disc" else None,
        "rng": rng_state(device),
    }


def check_resume_args(args: argparse.Namespace, ckpt: dict, world_size: int, is_main: bool = True) -> None:
    """A resumed run must follow the same trajectory: refuse changed settings up front."""
    saved = ckpt.get("args", {})
    changed = [f"{name}: {getattr(args, name)!r} now, {saved.get(name)!r} in the checkpoint"
               for name in TRAJECTORY_ARGS if saved.get(name) != getattr(args, name)]
    if changed:
        raise SystemExit(f"train.py: --resume {args.resume} was written with other settings; pass the "
                         "original run's flags (" + "; ".join(changed) + ")")
    if ckpt.get("world_size", world_size) != world_size and is_main:
        print(f"train.py: warning: resuming on {world_size} processes, the checkpoint ran on "
              f"{ckpt['world_size']}: the data order differs from an uninterrupted run", file=sys.stderr)


def restore(parts: Parts, ckpt: dict, args: argparse.Namespace, device: torch.device) -> int:
    """`--resume`: model, optimizers, AAF weights / discriminator and RNG; returns the next step."""
    parts.model_without_ddp.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    key = ADVERSARY_KEYS.get(args.loss)
    if key is not None:
        parts.projection.load_state_dict(ckpt[key])
        parts.projection_optimizer.load_state_dict(ckpt[f"{key}_optimizer"])
    # Every rank takes rank 0's generator states; training itself draws no random numbers
    # (augmentation is seeded per sample), so this only matters for user extensions.
    set_rng_state(ckpt["rng"], device)
    return int(ckpt["step"])


def load_for_training(path: str, info: data.DatasetInfo) -> dict:
    """A checkpoint's dict, with load_checkpoint's one-line errors (missing, corrupt, classes)."""
    try:
        _, ckpt = model_lib.load_checkpoint(path, num_classes=info.num_classes)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"train.py: {err}") from None
    return ckpt


# ----------------------------------------------------------------------------- logging

def kernel_sizes_per_class(parts: Parts, info: data.DatasetInfo) -> dict[str, list[float]]:
    """Paper Fig. 3: the AAF's current field size per class, sum_k w[c, k] * k."""
    edge, nonedge = parts.projection.kernel_size_per_class()
    return {"edge": [round(float(v), 3) for v in edge], "nonedge": [round(float(v), 3) for v in nonedge]}


def format_kernel_sizes(sizes: dict[str, list[float]], info: data.DatasetInfo) -> str:
    return "AAF field size per class (edge/non-edge): " + ", ".join(
        f"{name} {e:.2f}/{n:.2f}" for name, e, n in zip(info.class_names, sizes["edge"], sizes["nonedge"]))


def log_progress(record: dict, log_path: Path, info: data.DatasetInfo) -> None:
    """One progress line on stdout and the same record as a JSON line in log.jsonl."""
    eta = datetime.timedelta(seconds=round(record["eta_s"]))
    terms = " ".join(f"{k} {v:.4f}" for k, v in record["loss"].items())
    print(f"step {record['step']}/{record['iters']} | {terms} | lr {record['lr']:.3g} | "
          f"{record['images_per_s']:.1f} img/s | eta {eta}", flush=True)
    if "kernel_sizes" in record:
        print("  " + format_kernel_sizes(record["kernel_sizes"], info), flush=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- TensorBoard (optional)

TENSORBOARD_IMAGES = 3  # validation images shown after an evaluation


def open_tensorboard(out: Path, start: int):
    """A SummaryWriter on <out>/tensorboard, or one line saying what to install. A resumed run
    (start > 0) hides the events a killed run wrote after its checkpoint (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        raise SystemExit("train.py: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1 if start else None)


def tensorboard_record(writer, record: dict, info: data.DatasetInfo) -> None:
    """The numbers of one log.jsonl record as scalars at its step: loss/<term>, lr, images_per_s,
    eta_s, ... and the AAF field sizes per class (aaf_field_edge/<class>, aaf_field_nonedge/<class>)."""
    if writer is None:
        return
    step = record["step"]
    for key, value in record.items():
        if key in ("step", "iters"):
            continue
        if key == "kernel_sizes":  # {"edge": [C], "nonedge": [C]}: Fig. 3 over training
            for term, sizes in value.items():
                for name, size in zip(info.class_names, sizes):
                    writer.add_scalar(f"aaf_field_{term}/{name}", size, step)
        elif isinstance(value, dict):
            for term, number in value.items():
                writer.add_scalar(f"{key}/{term}", number, step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)
    writer.flush()  # a killed run keeps what it logged


def tensorboard_predictions(writer, net: nn.Module, val_set, info: data.DatasetInfo, step: int,
                            device: torch.device, count: int = TENSORBOARD_IMAGES) -> None:
    """The first `count` validation images as [H, 3W + 4, 3] strips: image | ground truth | prediction
    (single scale, the data set's evaluation window)."""
    gap = 2  # white pixels between the panels
    for index in range(min(count, len(val_set))):
        sample = val_set[index]
        probs = infer.predict(net, torch.as_tensor(sample["image"]).to(device), info.eval_crop, info.eval_stride)
        pred = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()            # [H, W] class ids
        rgb = data.denormalize(sample["image"], info)                         # [H, W, 3] uint8
        white = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
        strip = np.concatenate([rgb, white, data.colorize(np.asarray(sample["label"]), info.palette), white,
                                data.colorize(pred, info.palette)], axis=1)
        writer.add_image(f"{info.val_split}_image_gt_prediction/{sample['name']}", strip, step, dataformats="HWC")
    writer.flush()


# ----------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    """Train as `args` say; returns {"out", "step", "checkpoint", "miou"} (miou None without --eval)."""
    args, info = resolve_args(args)
    dist, device = setup_distributed(args.device)
    try:
        return train(args, info, dist, device)
    except (data.DatasetError, FileNotFoundError, ValueError) as err:  # data root, weight file, bad state dict
        message = f"train.py: {err}"
    except NonFiniteLoss as err:  # raised on every rank at the same step (check_finite reduces first)
        last = Path(args.out) / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        message = f"train.py: {err}; stopping ({kept})"
    finally:
        cleanup_distributed()
    raise SystemExit(message if dist.is_main else 1)  # one message, not one per process


def train(args: argparse.Namespace, info: data.DatasetInfo, dist: Dist, device: torch.device) -> dict:
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else 0
    if args.amp and device.type != "cuda" and dist.is_main:
        print("train.py: --amp is bf16 autocast on GPU; running in float32 on CPU", file=sys.stderr)
    if args.batch_size % dist.world_size:
        raise SystemExit(f"train.py: --batch-size {args.batch_size} (global) is not divisible by the "
                         f"{dist.world_size} processes")
    # PSPNet's 1x1 pyramid bin is BatchNorm over one value per image: it needs two images per
    # BN call, i.e. per process unless SyncBatchNorm (GPU) pools the whole global batch.
    bn_batch = args.batch_size if device.type == "cuda" else args.batch_size // dist.world_size
    if args.arch == "pspnet" and bn_batch < 2:
        raise SystemExit(f"train.py: PSPNet's BatchNorm needs at least 2 images per "
                         f"{'process' if dist.enabled else 'batch'} (--batch-size {args.batch_size} "
                         f"on {dist.world_size} {device.type} process(es))")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest kernels once
    out = Path(args.out)
    log_path = out / "log.jsonl"
    torch.manual_seed(args.seed)  # identical initialisation on every rank
    np.random.seed(args.seed)
    random.seed(args.seed)

    # Layout errors from data.py surface here, before the model is built.
    train_set = data.build_dataset(args.dataset, args.data_root, args.train_split, train=True,
                                   crop_size=args.crop_size, scale_range=info.scale_range, seed=args.seed,
                                   length=args.train_length)
    resume = load_for_training(args.resume, info) if args.resume else None
    if resume is not None:
        check_resume_args(args, resume, dist.world_size, dist.is_main)
    init = load_for_training(args.init, info) if args.init else None
    parts = build_parts(args, info, device, dist, init=init)
    start = restore(parts, resume, args, device) if resume is not None else 0
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            log_path.write_text("")  # a fresh run starts a fresh log; a resumed one appends
        print(f"train.py: {args.dataset} ({len(train_set)} {args.train_split} images), {args.arch}-"
              f"{args.backbone}, loss {args.loss} (lambda {args.loss_lambda}, decay {args.decay}), "
              f"{args.iters} iterations of {args.batch_size} crops {args.crop_size}px on "
              f"{dist.world_size} x {device}, from step {start} -> {out}", flush=True)
    writer = open_tensorboard(out, start) if args.tensorboard and dist.is_main else None  # beside log.jsonl

    parts.model.train()
    batches = training_batches(train_set, args, dist, start, pin_memory=device.type == "cuda")
    end = args.iters if args.stop_after is None else min(args.iters, args.stop_after)
    sums: dict[str, float] = {}
    tic, tic_step = time.perf_counter(), start
    for step in range(start, end):
        images, labels = batch_to_device(next(batches), device)
        values = train_step(parts, images, labels, step, args, dist)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        done = step + 1
        if dist.is_main and (done % args.log_every == 0 or done == end):
            elapsed = time.perf_counter() - tic
            record = {"step": done, "iters": args.iters,
                      "loss": {k: v / (done - tic_step) for k, v in sums.items()},
                      "lr": poly_lr(args.lr, step, args.iters),
                      "images_per_s": (done - tic_step) * args.batch_size / elapsed,
                      "eta_s": elapsed / (done - tic_step) * (args.iters - done)}
            if args.loss == "aaf":
                record["kernel_sizes"] = kernel_sizes_per_class(parts, info)
            log_progress(record, log_path, info)
            tensorboard_record(writer, record, info)
            sums, tic, tic_step = {}, time.perf_counter(), done
        if dist.is_main and done % args.save_every == 0 and done < args.iters:
            model_lib.save_checkpoint(checkpoint(parts, args, info, done, device, dist.world_size), out / "last.pt")

    batches.close()  # ends the current loader and its worker processes
    if args.dump_rank_state:
        dump_rank_state(parts, out, dist)
    if end < args.iters:  # --stop-after: leave the folder as a kill would
        if writer is not None:
            writer.close()
        return {"out": str(out), "step": end, "checkpoint": None, "miou": None}
    final = out / "model.pt"
    if dist.is_main:
        model_lib.save_checkpoint(checkpoint(parts, args, info, end, device, dist.world_size), final)
        if args.loss == "aaf":
            print(format_kernel_sizes(kernel_sizes_per_class(parts, info), info), flush=True)
    # Evaluation runs on rank 0 alone after the group is gone, so no collective can time out.
    cleanup_distributed()
    miou = evaluate_after_training(parts.model_without_ddp, args, info, device, log_path, writer) \
        if dist.is_main and args.eval else None
    if writer is not None:
        writer.close()
    if dist.is_main:
        root = f" --data-root {args.data_root}" if args.data_root else ""
        print(f"train.py: wrote {final} (step {end})\n"
              f"  evaluate it with: python evaluate.py --ckpt {final} --metric all{root}", flush=True)
        if args.loss == "aaf":
            print(f"  learned field sizes (Fig. 3): python evaluate.py --ckpt {final} --metric kernels", flush=True)
    return {"out": str(out), "step": end, "checkpoint": str(final), "miou": miou}


def dump_rank_state(parts: Parts, out: Path, dist: Dist) -> None:
    """Testing hook: this rank's trainable parameters, to check that all ranks agree."""
    if dist.enabled:
        torch_dist.barrier()  # rank 0 may still be creating `out`
    state = {f"model.{k}": v.detach().cpu() for k, v in parts.model_without_ddp.named_parameters()}
    if parts.projection is not None:
        state.update({f"projection.{k}": v.detach().cpu() for k, v in parts.projection.state_dict().items()})
    torch.save(state, out / f"rank{dist.rank}.pt")


def evaluate_after_training(net: nn.Module, args: argparse.Namespace, info: data.DatasetInfo,
                            device: torch.device, log_path: Path, writer=None) -> float:
    """Single-scale mIoU on the validation split (the full protocol is evaluate.py's job); with a
    TensorBoard writer also val/miou and a few predictions."""
    val_set = data.build_dataset(args.dataset, args.data_root, info.val_split, train=False)
    results = evaluate.evaluate_model(net, val_set, args.dataset, metrics=("miou",), crop_size=info.eval_crop,
                                      stride=info.eval_stride, device=device, progress=False)
    miou = float(results["miou"])
    print(f"train.py: {info.val_split} mIoU {100 * miou:.2f} (single scale, {len(val_set)} images)", flush=True)
    with open(log_path, "a") as f:
        f.write(json.dumps({"eval": info.val_split, "miou": miou}) + "\n")
    if writer is not None:
        writer.add_scalar(f"{info.val_split}/miou", miou, args.iters)
        tensorboard_predictions(writer, net, val_set, info, args.iters, device)
    return miou


if __name__ == "__main__":
    main(get_args_parser().parse_args())
