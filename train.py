"""Training: the paper's recipe (section 4, docs/protocol.md §6) with every projection loss of Table 2.

One iteration, for a crop batch `x [B, 3, H, W]` with labels `y [B, H, W]`:

    logits = model(x)                                   # [B, C, H/8, W/8], never upsampled
    y8     = downsample_labels(y, logits.shape[-2:])    # nearest pick of pixel (8i, 8j)
    loss   = CE(logits, y8) + lambda * 10^(-t/T) * projection(logits, y8)   # Eq. (3), Eqs. (1)-(2)

- Poly learning rate per iteration, base * (1 - t/T)^0.9; SGD momentum 0.9, weight decay 5e-4 on
  conv weights only; the head (PSP module and classifier) at 10x the base rate.
- The 10^(-t/T) factor comes from the authors' official code (not the paper): the projection term
  fades from 1x to 0.1x over training; the author says it is needed for convergence. On by
  default (`--no-decay` turns it off); applied to every projection loss so that the Table 2
  comparison differs only in the projection.
- `--loss aaf` (Eq. 9, docs/protocol.md §3): the network minimises the AAF loss and the kernel-size weights
  maximise it, in the same iteration from the same backward pass: the weights have their own SGD
  (momentum 0.9, the backbone's poly rate, no weight decay, `maximize=True`).
- `--loss gan` (Eqs. 5-6): the discriminator and the segmentation network update in alternating
  steps: D on the detached predictions, then the network against the updated D.
- `--accum-steps N`: the batch of one optimizer step runs as N micro-batches whose gradients add
  up; every loss mean divides by the whole batch's count, so without BatchNorm the step is the
  same as in one piece (BatchNorm normalises each micro-batch by its own statistics).
- Multi-GPU with torchrun (env ranks, DDP, SyncBatchNorm on GPU, DistributedSampler); rank 0
  alone logs and writes. Checkpoints are plain types written atomically; `--resume` continues
  bit-exactly on CPU (data order and augmentation are functions of (seed, epoch, index)).
- No host read-back in the loop: finite.FiniteGuard watches on the device and is read at log
  intervals and before every checkpoint write; runfolder.py keeps the run folder safe.

    python train.py                  # demo: synthetic data, tiny PSPNet, CPU, then val mIoU
    torchrun --nproc_per_node=4 train.py --dataset voc --data-root data/VOCdevkit --loss aaf --amp
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import checkpoint
import checks
import data
import distributed
import evaluate
import finite
import infer
import losses
import model as model_lib
import runfolder

LOSSES = ("ce", "affinity", "aaf", "random", "gan", "embedding")
# Projection losses whose paper weight is not the data set's affinity lambda (docs/protocol.md §4, §6).
SMALL_LAMBDA_LOSSES = {"random": 0.01, "gan": 0.01}
DEFAULT_MARGIN = 3.0  # docs/protocol.md §6: m = 3.0 everywhere
# Why --loss gan cannot accumulate (resolve_args refuses it; train_step too, if called directly).
GAN_ACCUM_REFUSAL = ("--loss gan cannot use --accum-steps > 1: its alternating step updates the discriminator on the "
                     "whole batch's predictions before the network is scored by the updated discriminator, so every "
                     "micro-batch's graph would have to be kept, which is the memory accumulation saves")
TENSORBOARD_IMAGES = 3  # validation images shown after an evaluation (--tensorboard)


# ---------------------------------------------------------------------------------------------
# 1. Schedules (paper section 4; the 10^(-t/T) factor of the official code)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# 2. The network, the projection loss and their optimizers
# ---------------------------------------------------------------------------------------------

@dataclass
class Parts:
    """Everything one training iteration touches."""
    model: nn.Module                      # DDP-wrapped when distributed
    model_without_ddp: nn.Module
    projection: nn.Module | None          # the loss module (AAF weights / discriminator inside)
    optimizer: torch.optim.Optimizer
    projection_optimizer: torch.optim.Optimizer | None  # AAF weights (ascent) or discriminator
    # What train_step calls: the model, LossTerms and D's loss, or their torch.compile'd versions.
    forward: Callable
    loss_terms: Callable
    disc_loss: Callable | None            # the GAN's discriminator loss (Eq. 6)


class LossTerms(nn.Module):
    """The unweighted loss terms of one batch: {"ce": Eq. (1), <--loss name>: the projection}.

    Kept apart from the step-dependent weighting (lambda * 10^(-t/T), a Python float that
    would make torch.compile recompile every iteration) so that --compile traces it once.
    Each term is a mean over its batch; with `counts` (from `counts`, over all micro-batches of
    an optimizer step) it divides by the whole batch's count instead, so that the terms of the
    micro-batches add up to the whole batch's (--accum-steps).
    """

    def __init__(self, projection: nn.Module | None, loss: str, num_classes: int):
        super().__init__()
        self.projection, self.loss, self.num_classes = projection, loss, num_classes

    def counts(self, smalls: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The denominator of every term's mean, summed over the micro-batches' labels `smalls`
        (each [b, h, w] at the logits' size): {"ce": valid pixels, <--loss name>: the projection's
        counts (0-d, or [2, K] edge / non-edge elements per field size)}; all int64 on the device."""
        if self.loss == "gan":  # D's alternating step cannot be split (resolve_args refuses it up front)
            raise ValueError(GAN_ACCUM_REFUSAL)
        size = tuple(smalls[0].shape[-2:])
        totals = {"ce": sum(losses.valid_count(small, self.num_classes) for small in smalls)}
        if self.projection is not None:
            totals[self.loss] = sum(self.projection.counts(small, size) for small in smalls)
        return totals

    def forward(self, logits: torch.Tensor, small: torch.Tensor, features: torch.Tensor | None = None,
                counts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # logits [B, C, h, w] at stride 8, small [B, h, w] labels at the same size, features [B, F, h, w];
        # counts: None (each mean over this batch) or `counts()` of every micro-batch of the step.
        proj = self.projection
        # Without counts no keyword is passed at all: the same calls as before --accum-steps existed.
        ce_total = {} if counts is None else {"count": counts["ce"]}
        proj_total = {} if counts is None else {"counts": counts.get(self.loss)}
        terms = {"ce": losses.unary_loss(logits, small, **ce_total)}          # Eq. (1)
        if self.loss == "gan":
            terms["gan"] = proj.generator_loss(logits, small)                 # Eq. (5), no gradient into D
        elif self.loss == "embedding":
            terms["embedding"] = proj(features, small, **proj_total)
        elif proj is not None:
            terms[self.loss] = proj(logits, small, **proj_total)
        return terms


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


def build_parts(args: argparse.Namespace, info: data.DatasetInfo, device: torch.device, dist: distributed.Dist,
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
        distributed.broadcast_parameters(projection, dist)
    optimizer, projection_optimizer = build_optimizers(model, projection, args)
    ddp_model = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    parts = Parts(ddp_model, model, projection, optimizer, projection_optimizer, forward=ddp_model,
                  loss_terms=LossTerms(projection, args.loss, info.num_classes),
                  disc_loss=projection.discriminator_loss if args.loss == "gan" else None)
    if getattr(args, "compile", None):
        # The model (through DDP, whose buckets torch.compile splits at), the loss terms and the
        # discriminator loss, each traced once for the fixed crop size. No fullgraph: a graph break
        # in a loss falls back to eager for that piece instead of failing.
        compile = lambda fn: torch.compile(fn, backend=args.compile, dynamic=False)
        parts.forward = compile(parts.model)
        parts.loss_terms = compile(parts.loss_terms)
        if parts.disc_loss is not None:
            parts.disc_loss = compile(parts.disc_loss)
    return parts


def load_init_weights(model: nn.Module, projection: nn.Module | None, ckpt: dict, args: argparse.Namespace) -> None:
    """`--init`: network weights, and the AAF weights / discriminator when the checkpoint has them
    (the official scripts reset the AAF weights between VOC stages; we carry them over)."""
    key = runfolder.ADVERSARY_KEYS.get(args.loss)
    pieces = [(model, ckpt["model"], f"--arch {args.arch} --backbone {args.backbone}")]
    if key is not None and ckpt.get(key) is not None:
        pieces.append((projection, ckpt[key], f"--loss {args.loss} --kernel-sizes {args.kernel_sizes}"))
    for module, state, what in pieces:
        try:
            model_lib.check_state_dict(module, state, what)  # one line naming what differs
        except ValueError as err:
            raise SystemExit(f"train.py: --init {args.init}: {err}") from None
        module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# 3. One iteration: CE + lambda * 10^(-t/T) * projection; AAF's min-max (Eq. 9); the GAN's alternation (Eqs. 5-6)
# ---------------------------------------------------------------------------------------------

def train_step(parts: Parts, images: torch.Tensor, labels: torch.Tensor, step: int,
               args: argparse.Namespace, dist: distributed.Dist = distributed.Dist(),
               guard: finite.FiniteGuard | None = None) -> dict[str, torch.Tensor]:
    """One iteration at `step` (0-based): set LRs, forward, loss terms, backward, optimizer steps.

    images [B, 3, H, W] normalised; labels [B, H, W] full-resolution crop labels. Returns this
    rank's loss terms as detached 0-d tensors on the device (never read back here, so a GPU
    queue keeps running): `ce`, the projection's raw (unweighted) value under its --loss name,
    `total` (what the network minimises) and, for the GAN, `disc`. `guard` (finite.FiniteGuard)
    records what became non-finite; train() reads it at log intervals and before saving.

    `--accum-steps N` > 1: the batch runs as N micro-batches of B / N (forward and backward each,
    so that only one micro-batch's activations are alive; gradients add up in .grad), then the
    optimizers step once. Every loss mean divides by the whole batch's count (LossTerms.counts),
    so the micro-batch terms and gradients add up to the whole batch's; the returned terms are
    those sums.
    """
    lr = poly_lr(args.lr, step, args.iters)
    set_lr(parts.optimizer, lr)
    set_lr(parts.projection_optimizer, lr)
    weight = args.loss_lambda * (affinity_decay(step, args.iters) if args.decay else 1.0)
    amp = torch.autocast(device_type=images.device.type, dtype=torch.bfloat16,
                         enabled=args.amp and images.device.type == "cuda")
    accum = getattr(args, "accum_steps", 1)  # namespaces built before --accum-steps
    if accum > 1 and args.loss == "gan":
        raise ValueError(GAN_ACCUM_REFUSAL)
    parts.optimizer.zero_grad(set_to_none=True)
    if args.loss == "aaf":
        parts.projection_optimizer.zero_grad(set_to_none=True)
    if accum == 1:
        micro, smalls, counts = [(images, labels)], [None], None  # each mean over this batch, as always
    else:
        micro = list(zip(images.chunk(accum), labels.chunk(accum)))      # N x ([B/N, 3, H, W], [B/N, H, W])
        # Labels at the logits' size, known before any forward: ceil(H/8) x ceil(W/8) (model.py).
        stride = model_lib.OUTPUT_STRIDE
        size = (-(-labels.shape[-2] // stride), -(-labels.shape[-1] // stride))
        smalls = [losses.downsample_labels(lab, size) for _, lab in micro]  # N x [B/N, h, w]
        counts = parts.loss_terms.counts(smalls)                          # of the whole batch
    ddp = isinstance(parts.model, nn.parallel.DistributedDataParallel)
    summed: dict[str, torch.Tensor] = {}
    for index, ((images_m, labels_m), small) in enumerate(zip(micro, smalls)):
        # Under DDP the gradients are all-reduced once, in the last micro-batch's backward.
        last = index == len(micro) - 1
        with contextlib.nullcontext() if last or not ddp else parts.model.no_sync():
            terms = micro_batch_terms(parts, images_m, labels_m, small, counts, weight, amp, args, dist)
            # One backward pass per micro-batch: network gradients (minimised) and, for AAF, the
            # weights' (maximised), added to those of the micro-batches before.
            terms["total"].backward()
        for key, value in terms.items():
            summed[key] = value.detach() if key not in summed else summed[key] + value.detach()

    # Optimizer steps, once per batch.
    parts.optimizer.step()
    if args.loss == "aaf":
        distributed.average_gradients(list(parts.projection.parameters()), dist)
        parts.projection_optimizer.step()  # maximize=True: ascent on the same loss (Eq. 9)
    if guard is not None:
        guard.record(step, summed, parts)
    return summed


def micro_batch_terms(parts: Parts, images: torch.Tensor, labels: torch.Tensor, small: torch.Tensor | None,
                      counts: dict[str, torch.Tensor] | None, weight: float, amp: torch.autocast,
                      args: argparse.Namespace, dist: distributed.Dist) -> dict[str, torch.Tensor]:
    """Forward and loss terms of one (micro-)batch, "total" = ce + weight * projection with its graph.

    small: the labels at the logits' size (None: picked here from the logits' size); counts: the
    whole batch's denominators (LossTerms.counts) or None for means over this batch.
    """
    # Forward and loss terms.
    with amp:
        if args.loss == "embedding":
            logits, features = parts.forward(images, return_features=True)  # [B, C, h, w], [B, F, h, w]
        else:
            logits, features = parts.forward(images), None                  # [B, C, h, w] at stride 8
        if small is None:
            # Downsample once (nearest pick of pixel (8i, 8j), docs/protocol.md §1); every loss gets this [B, h, w] map.
            small = losses.downsample_labels(labels, logits.shape[-2:])
        elif small.shape[-2:] != logits.shape[-2:]:  # the counts were taken at the wrong size
            raise ValueError(f"logits of size {list(logits.shape[-2:])} for a {list(labels.shape[-2:])} crop: "
                             f"--accum-steps expects ceil(H/{model_lib.OUTPUT_STRIDE}) x "
                             f"ceil(W/{model_lib.OUTPUT_STRIDE})")
    # GAN, alternating step 1 first: D updates on the detached predictions, then the network
    # is scored by the updated D (Eq. 6).
    disc = discriminator_step(parts, logits, small, amp, dist) if args.loss == "gan" else None
    with amp:
        terms = parts.loss_terms(logits, small, features, counts=counts)
    # Eq. (3): L_unary + lambda * L_pairwise, lambda here times the official code's 10^(-t/T).
    total = terms["ce"] + weight * terms[args.loss] if args.loss != "ce" else terms["ce"]
    if disc is not None:
        terms = {"ce": terms["ce"], "disc": disc, "gan": terms["gan"]}
    terms["total"] = total
    return terms


def discriminator_step(parts: Parts, logits: torch.Tensor, small: torch.Tensor, amp: torch.autocast,
                       dist: distributed.Dist) -> torch.Tensor:
    """GAN, alternating step 1 (Eq. 6): D learns to tell the current detached predictions from GT."""
    with amp:
        loss = parts.disc_loss(logits.detach(), small)
    parts.projection_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(list(parts.projection.parameters()), dist)
    # A NaN here is caught by finite.FiniteGuard (loss term "disc", gradients, parameters); a corrupted
    # D is never written.
    parts.projection_optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# 4. The run: start, loop, finish
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop of one start needs besides the Parts (built by `start_run`)."""
    parts: Parts
    train_set: data.SegmentationDataset
    batches: Iterator[dict]               # endless training batches from `start` on
    out: Path
    start: int                            # first iteration of this start (> 0 after --resume)
    end: int                              # iteration after the last one of this start
    guard: finite.FiniteGuard
    writer: object | None                 # TensorBoard SummaryWriter (--tensorboard), rank 0 only


def train(args: argparse.Namespace, info: data.DatasetInfo, dist: distributed.Dist, device: torch.device,
          lock: runfolder.RunLock | None = None) -> dict:
    """The training run: iterations start..end of `train_step`, a log record every --log-every,
    last.pt every --save-every, then model.pt and the validation mIoU (`finish_run`)."""
    run = start_run(args, info, dist, device, lock)
    kill_rank, kill_step = (int(v) for v in args.kill_at.split(":")) if args.kill_at else (-1, -1)
    tic, tic_step = time.perf_counter(), run.start
    for step in range(run.start, run.end):
        if dist.rank == kill_rank and step == kill_step:  # --kill-at: fault injection for the tests
            os.kill(os.getpid(), signal.SIGKILL)
        images, labels = data.batch_to_device(next(run.batches), device)
        train_step(run.parts, images, labels, step, args, dist, run.guard)
        done = step + 1
        if done % args.log_every == 0 or done == run.end:
            stop_if_not_finite(run, dist)  # reads the device flags: the one synchronisation per log interval
            averages = run.guard.take_averages(dist)
            if dist.is_main:
                elapsed = time.perf_counter() - tic
                record = {"step": done, "iters": args.iters, "loss": averages,
                          "lr": poly_lr(args.lr, step, args.iters),
                          "images_per_s": (done - tic_step) * args.batch_size / elapsed,
                          "eta_s": elapsed / (done - tic_step) * (args.iters - done)}
                if args.loss == "aaf":
                    record["kernel_sizes"] = runfolder.kernel_sizes_per_class(run.parts)  # paper Fig. 3 over training
                runfolder.log_progress(record, run.out / "log.jsonl", info)
                runfolder.tensorboard_record(run.writer, record, info)
            tic, tic_step = time.perf_counter(), done
        if done % args.save_every == 0 and done < args.iters:
            stop_if_not_finite(run, dist)  # a checkpoint only ever holds finite values
            if dist.is_main:
                state = runfolder.training_state(run.parts, args, info, done, device, dist.world_size, len(run.train_set))
                checkpoint.save_checkpoint(state, run.out / "last.pt")
    run.batches.close()  # ends the loader and its worker processes; the last iteration was checked (logged)
    try:
        return finish_run(run, args, info, dist, device)
    finally:
        if run.writer is not None:  # TensorBoard events of this start, flushed and closed
            run.writer.close()


def stop_if_not_finite(run: Run, dist: distributed.Dist) -> None:
    """FiniteGuard's check point: every rank calls it at the same iterations and stops together."""
    problem = run.guard.check(run.parts, dist)
    if problem is not None:
        kept = runfolder.kept_checkpoint(run.out, resumable=False)
        raise finite.NonFiniteError(f"{problem}; stopping, nothing non-finite was saved ({kept})")


def start_run(args: argparse.Namespace, info: data.DatasetInfo, dist: distributed.Dist, device: torch.device,
              lock: runfolder.RunLock | None) -> Run:
    """Everything before the first iteration: the batch split, the run folder's verdict, seeds,
    the training set, --resume / --init, the network and optimizers, the log and the loader."""
    if args.amp and device.type != "cuda" and dist.is_main:
        print("train.py: --amp is bf16 autocast on GPU; running in float32 on CPU", file=sys.stderr)
    problem = checks.batch_split_problem(args, dist, device)
    if problem:
        raise SystemExit(f"train.py: {problem}")
    out = Path(args.out)
    # Never destroy a run: rank 0, holding the folder's lock, looks at the folder; every rank
    # follows its verdict.
    verdict = None
    if dist.is_main:
        verdict = (lock.refusal if lock is not None else None) or runfolder.check_run_folder(args, out)
    refusal = distributed.rank0_decides(verdict, dist, device)
    if refusal:
        raise SystemExit(refusal if dist.is_main else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest kernels once
    torch.manual_seed(args.seed)  # identical initialisation on every rank
    np.random.seed(args.seed)
    random.seed(args.seed)
    # Layout errors from data.py surface here, before the model is built.
    train_set = data.build_dataset(args.dataset, args.data_root, args.train_split, train=True,
                                   crop_size=args.crop_size, scale_range=info.scale_range, seed=args.seed,
                                   length=args.train_length)
    resume = model_lib.load_checkpoint(args.resume, num_classes=info.num_classes)[1] if args.resume else None
    if resume is not None:
        runfolder.check_resume_args(args, resume, dist.world_size, dist.is_main, train_size=len(train_set))
    init = model_lib.load_checkpoint(args.init, num_classes=info.num_classes)[1] if args.init else None
    try:
        parts = build_parts(args, info, device, dist, init=init)
    except model_lib.ImageNetWeightsMissing as err:  # worded for this script's flag
        raise SystemExit(f"train.py: {err.remedy('--pretrained <file>, or --pretrained none')}") from None
    start = runfolder.restore(parts, resume, args, device) if resume is not None else 0
    batches = data.training_batches(train_set, args, dist, start, pin_memory=device.type == "cuda")
    if dist.is_main:
        runfolder.prepare_run_folder(args, out, start, dist.world_size)
        print(f"train.py: {args.dataset} ({len(train_set)} {args.train_split} images), {args.arch}-"
              f"{args.backbone}, loss {args.loss} (lambda {args.loss_lambda}, decay {args.decay}), "
              f"{args.iters} iterations of {args.batch_size} crops {args.crop_size}px"
              f"{f' in {args.accum_steps} micro-batches' if args.accum_steps > 1 else ''} on "
              f"{dist.world_size} x {device}, {args.workers} loader workers"
              f"{', compiled' if args.compile else ''}, from step {start} -> {out}", flush=True)
    writer = runfolder.open_tensorboard(out, start) if args.tensorboard and dist.is_main else None  # beside log.jsonl
    parts.model.train()
    end = args.iters if args.stop_after is None else min(args.iters, args.stop_after)
    return Run(parts, train_set, batches, out, start, end, finite.FiniteGuard(device), writer)


def finish_run(run: Run, args: argparse.Namespace, info: data.DatasetInfo, dist: distributed.Dist,
               device: torch.device) -> dict:
    """model.pt (rank 0), then the single-scale validation mIoU; returns {"out", "step",
    "checkpoint", "miou"}. --stop-after leaves the folder as a kill would (no model.pt)."""
    out, end, parts = run.out, run.end, run.parts
    if args.dump_rank_state:
        runfolder.dump_rank_state(parts, out, dist)
    if end < args.iters:
        return {"out": str(out), "step": end, "checkpoint": None, "miou": None}
    final = out / "model.pt"
    if dist.is_main:  # the last log line above already showed the AAF field sizes
        state = runfolder.training_state(parts, args, info, end, device, dist.world_size, len(run.train_set))
        checkpoint.save_checkpoint(state, final)
        print(f"train.py: wrote {final} (step {end})", flush=True)  # before the evaluation, which may fail
    root = f" --data-root {args.data_root}" if args.data_root else ""
    score_cmd = f"python evaluate.py --ckpt {final} --metric all{root}"
    try:
        # Evaluation runs on rank 0 alone after the group is gone, so no collective can time out.
        distributed.cleanup_distributed()
        miou = evaluate_after_training(parts.model_without_ddp, args, info, device, out / "log.jsonl", run.writer) \
            if dist.is_main and args.eval else None
    except BaseException as err:  # e.g. Ctrl-C in the evaluation: the run itself is complete
        if dist.is_main:  # the rank that wrote model.pt (the others do not wait for the write)
            err.finished_model = (f"the training had finished: {final} (step {end}) is complete; "
                                  f"score it with {score_cmd}")
        raise
    if dist.is_main:
        print(f"  evaluate it with: {score_cmd}", flush=True)
        if args.loss == "aaf":
            print(f"  learned field sizes (Fig. 3): python evaluate.py --ckpt {final} --metric kernels", flush=True)
    return {"out": str(out), "step": end, "checkpoint": str(final), "miou": miou}


def evaluate_after_training(net: nn.Module, args: argparse.Namespace, info: data.DatasetInfo,
                            device: torch.device, log_path: Path, writer=None) -> float:
    """Single-scale mIoU on the validation split (the full protocol is evaluate.py's job); with a
    TensorBoard writer also val/miou and a few predictions."""
    val_set = data.build_dataset(args.dataset, args.data_root, info.val_split, train=False)
    results = evaluate.evaluate_model(net, val_set, args.dataset, metrics=("miou",), crop_size=info.eval_crop,
                                      stride=info.eval_stride, device=device, progress=False)
    miou = float(results["miou"])
    print(f"train.py: {info.val_split} mIoU {100 * miou:.2f} (single scale, {len(val_set)} images)", flush=True)
    runfolder.append_line(log_path, json.dumps({"eval": info.val_split, "miou": miou}))
    if writer is not None:
        writer.add_scalar(f"{info.val_split}/miou", miou, args.iters)
        tensorboard_predictions(writer, net, val_set, info, args.iters, device)
    return miou


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


# ---------------------------------------------------------------------------------------------
# 5. Command line
# ---------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left at 'dataset default' take the paper's value for --dataset "
               "(data.py's DatasetInfo; docs/protocol.md §6).")
    for add_flags in (add_data_flags, add_model_flags, add_loss_flags, add_optimisation_flags, add_run_flags,
                      add_testing_flags):
        add_flags(parser)
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=sorted(data.DATASET_NAMES),
                   help="data set (default: synthetic, generated on the fly, no download; name it whenever "
                        "you give --data-root); folder: your own data at --data-root (classes.txt, "
                        "images/<split>/, labels/<split>/; README 'Your own data'), whose defaults are: "
                        f"{data.FOLDER_DEFAULTS_TEXT}")
    g.add_argument("--data-root", default=None,
                   help="folder holding the data set (required for every data set but synthetic, "
                        "which takes none)")
    g.add_argument("--train-split", default=None,
                   help="training split (dataset default, e.g. VOC train_aug; VOC stage 2: train)")
    g.add_argument("--crop-size", type=int, default=None,
                   help=f"square training crop, a multiple of 8 (dataset default: {data.per_dataset_text('crop_size')})")
    g.add_argument("--train-length", type=int, default=None, metavar="N",
                   help="train on the first N samples only (quick runs and tests; default: all)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loading processes per rank, >= 0; they live for the whole run and "
                        "prefetch 2 batches each (default on GPU: the CPUs this process may use, i.e. its "
                        f"affinity mask divided by the processes per node, minus 1, at most {data.MAX_DEFAULT_WORKERS}; "
                        "on CPU: 0, since workers would take cores from the model's threads)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="pspnet", choices=model_lib.ARCHS, help="segmentation head (default: pspnet)")
    g.add_argument("--backbone", default=None, choices=model_lib.BACKBONES,
                   help="dilated backbone (default: tiny for synthetic, resnet101 otherwise)")
    g.add_argument("--pretrained", default=None,
                   help="backbone initialisation: imagenet (torchvision's weight file in the torch hub cache), "
                        "a state-dict path, or none (default: imagenet for ResNets, none for tiny; "
                        "unused with --init / --resume)")


def add_loss_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loss")
    g.add_argument("--loss", default="aaf", choices=LOSSES,
                   help="projection added to cross-entropy: ce (none), affinity (Eq. 7), aaf (Eqs. 8-10), "
                        "random (Eq. 4), gan (Eqs. 5-6), embedding (contrastive on features) (default: aaf)")
    g.add_argument("--lambda", dest="loss_lambda", type=float, default=None,
                   help=f"projection weight (default: random/gan 0.01, else the data set's: "
                        f"{data.per_dataset_text('loss_lambda')})")
    g.add_argument("--margin", type=float, default=None,
                   help="edge margin m (default: 3.0; embedding: the loss's own default)")
    g.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                   help=f"field sizes (default: affinity 3; random 5; embedding 3; aaf the data set's: "
                        f"{data.per_dataset_text('kernel_sizes')})")
    g.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True,
                   help="multiply the projection term by 10^(-t/T) as the official code does (default: on)")


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None,
                   help=f"training iterations (dataset default: {data.per_dataset_text('iters')}; VOC stage 2: 30000)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch per optimizer step, split evenly across processes (dataset default: "
                        f"{data.per_dataset_text('batch_size')})")
    g.add_argument("--accum-steps", type=int, default=1, metavar="N",
                   help="gradient accumulation for GPUs too small for --batch-size: each process's batch runs "
                        "as N micro-batches, then one optimizer step; every loss mean divides by the whole "
                        "batch's count, so without BatchNorm the steps equal N = 1 (BN statistics are per "
                        "micro-batch, and PSPNet's pyramid BN needs >= 2 images per micro-batch); not with "
                        "--loss gan; README 'Small GPUs' (default: 1)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate (dataset default: {data.per_dataset_text('lr')}; VOC stage 2: 1e-4)")
    g.add_argument("--head-lr-mult", type=float, default=10.0,
                   help="learning-rate multiplier of the head, PSP module and classifier (default: 10)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum of the network, AAF weights and discriminator (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay on conv weights only (default: 5e-4)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on GPU (ignored on CPU)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model and the losses (BACKEND default: inductor; no fullgraph, "
                        "so a graph break runs that piece eagerly). Costs compilation in the first "
                        "iterations of every start, also after --resume (measured: about 3 CPU-minutes for "
                        "the tiny PSPNet with AAF on CPU; expect minutes for ResNet-101 on a GPU), then "
                        "faster steps. Compiled kernels round differently from eager ones, so bit-exact "
                        "--resume is only promised without it (default: off)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and augmentation (default: 0)")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<dataset>_<loss>, or the --resume folder)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue an interrupted run exactly from its last.pt (pass the run's other flags again)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds a run (its last.pt, model.pt, log.jsonl, "
                        "tensorboard/ and eval_*.json are deleted); without it such a folder is refused")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start from a checkpoint's weights (network, and AAF weights / discriminator when the "
                        "checkpoint has them); optimizer, step and schedule start afresh (VOC stage 2)")
    g.add_argument("--finetune", action="store_true",
                   help="the data set's second stage (VOC: on train, lr 1e-4, 30000 iterations); use with --init")
    g.add_argument("--save-every", type=int, default=None,
                   help="write last.pt every N iterations, after checking that all of it is finite "
                        "(default: iters/10, at most 1000)")
    g.add_argument("--log-every", type=int, default=20,
                   help="log every N iterations; also when the device-side finiteness checks and loss "
                        "sums are read back (default: 20)")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="single-scale mIoU on the validation split after training (default: on)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the log records (loss terms, lr, images/s, AAF field sizes per class) and, "
                        "when it evaluates, validation images | ground truth | prediction as TensorBoard events "
                        "in <out>/tensorboard (needs: pip install tensorboard; default: off)")


def add_testing_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("testing hooks")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N iterations without writing model.pt, as if the run were killed")
    g.add_argument("--dump-rank-state", action="store_true",
                   help="every rank writes its parameters to <out>/rank<R>.pt at the end (consistency check)")
    g.add_argument("--kill-at", default=None, metavar="RANK:STEP",
                   help="process RANK sends itself SIGKILL before iteration STEP (fault injection)")


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, data.DatasetInfo]:
    """Fill the per-dataset defaults (docs/protocol.md §6) and check the invariants before anything runs."""
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays untouched
    for dest, default in (("compile", None), ("overwrite", False), ("kill_at", None), ("accum_steps", 1)):
        if not hasattr(args, dest):  # namespaces built before these flags existed
            setattr(args, dest, default)
    problems = checks.given_value_problems(args)
    if args.dataset is None:
        if args.data_root is not None:
            problems.append(f"--data-root {args.data_root} given without --dataset: name the data set "
                            f"({', '.join(d for d in sorted(data.DATASET_NAMES) if d != 'synthetic')})")
        args.dataset = "synthetic"
    elif args.dataset == "synthetic" and args.data_root is not None:
        problems.append("--dataset synthetic is generated on the fly and takes no --data-root")
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))
    try:
        info = data.dataset_info(args.dataset, args.data_root)  # folder: classes and splits from the root
    except data.DatasetError as err:
        raise SystemExit(f"train.py: {err}") from None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = data.default_workers(args.device)
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

    problems += resolved_problems(args, info)
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))
    return args, info


def resolved_problems(args: argparse.Namespace, info: data.DatasetInfo) -> list[str]:
    """The invariants of the resolved settings (crop vs output stride, field sizes that fit the
    logits, flags that exclude each other), each as one line."""
    problems = []
    stride = model_lib.OUTPUT_STRIDE
    if args.crop_size <= 0 or args.crop_size % stride:
        problems.append(f"--crop-size {args.crop_size} must be a positive multiple of the output stride {stride}")
    if args.lr * args.head_lr_mult > torch.finfo(torch.float32).max:  # SGD applies it in float32
        problems.append(f"--lr {args.lr:g} x --head-lr-mult {args.head_lr_mult:g} overflows float32")
    if args.pretrained == "imagenet" and args.backbone not in model_lib.IMAGENET_WEIGHTS:
        problems.append(f"--backbone {args.backbone} has no ImageNet weights: use --pretrained none "
                        "or a state-dict file")
    if any(k < 3 or k % 2 == 0 for k in args.kernel_sizes):
        problems.append(f"--kernel-sizes {args.kernel_sizes}: each must be odd and >= 3 (k = 2s + 1)")
    elif len(set(args.kernel_sizes)) != len(args.kernel_sizes):
        problems.append(f"--kernel-sizes {args.kernel_sizes}: a size is listed twice")
    elif args.crop_size > 0:
        # A field of size k pairs logits s = (k - 1) / 2 apart: none exist when s reaches the side.
        side = math.ceil(args.crop_size / stride)
        far = [k for k in args.kernel_sizes if (k - 1) // 2 >= side]
        if far:
            problems.append(f"--kernel-sizes {far[0]} pairs logits {(far[0] - 1) // 2} apart, beyond the {side}x{side} "
                            f"logits of a {args.crop_size}-px crop: its term would always be 0")
    out_problem = checks.output_path_problem(args.out, "--out", folder=True) if args.out else None
    if out_problem:  # an existing file, or a path below one
        problems.append(out_problem)
    if args.loss in ("random", "embedding") and len(args.kernel_sizes) != 1:
        problems.append(f"--loss {args.loss} takes one kernel size, got {args.kernel_sizes}")
    if args.loss in ("ce", "gan") and args.kernel_sizes:
        problems.append(f"--loss {args.loss} has no field size; drop --kernel-sizes")
    if args.loss == "gan" and args.accum_steps > 1:
        problems.append(GAN_ACCUM_REFUSAL)
    if args.resume and args.init:
        problems.append("--resume and --init exclude each other (resume continues a run, init starts a new one)")
    if args.finetune and not args.init and not args.resume:
        problems.append("--finetune continues from a first-stage model: give it with --init")
    if args.eval and info.val_split not in info.splits:  # a folder set without images/val: say so now
        problems.append(f"{args.dataset} has no {info.val_split!r} split for the final evaluation "
                        f"(splits: {', '.join(info.splits)}); add it or pass --no-eval")
    return problems


def main(args: argparse.Namespace) -> dict:
    """Train as `args` say; returns {"out", "step", "checkpoint", "miou"} (miou None without --eval).

    Bad input ends in one line (SystemExit), from rank 0 alone when every rank meets it alike;
    a lost peer or a SIGTERM gives one line per surviving rank. Anything else is a bug and
    keeps its traceback.
    """
    args, info = resolve_args(args)
    dist, device = distributed.setup_distributed(args.device, "train.py")
    with runfolder.one_line_stop(dist, Path(args.out), input_errors=(data.DatasetError, checkpoint.WeightsError),
                                 rank_errors=(data.UnreadableSample,)) as lock:
        return train(args, info, dist, device, lock)

if __name__ == "__main__":
    main(get_args_parser().parse_args())
