"""Bad flags are errors, never defaults: the one-line checks every script runs before any work.

Support module (README, Reliability: "Bad flags are errors, never defaults" and "evaluate.py,
infer.py and plot.py check their outputs before any work"). Each function returns the problem as
one line (or None / an empty list); the script that calls it prefixes its own name and stops.
Imports nothing of the project.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch


def device_problem(device: str) -> str | None:
    """Why `--device` cannot be used here, or None. Checked before the checkpoint is read, whose
    loader would otherwise report a missing GPU as an unreadable checkpoint."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"--device {device}: expected cpu or cuda (or cuda:N)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device} but no GPU is visible"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"--device {device} but only {torch.cuda.device_count()} GPU(s) are visible"
    elif parsed.type != "cpu":
        return f"--device {device}: expected cpu or cuda (or cuda:N)"
    return None


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, which containers restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def empty_path_problems(flags: dict[str, str | Sequence[str] | None]) -> list[str]:
    """'--json is empty' for each flag (name -> value, or list of values) given as "": Path("")
    is the current folder, so an empty value (an unset shell variable, say) would read or write
    there, or fall back to the default, instead of failing (shared by every script)."""
    problems = []
    for flag, value in flags.items():
        values = [value] if isinstance(value, str) else list(value or ())
        if "" in values:
            problems.append(f"{flag} is empty")
    return problems


def output_path_problem(path: str | os.PathLike, flag: str, folder: bool) -> str | None:
    """Why `path` cannot become an output folder (`folder=True`) or file, or None; checked before
    any work, so that a long run does not end in a traceback at its first write. A folder must not
    be an existing file, a file not an existing folder, and the nearest existing path above it
    must be a folder (`notes.txt/out` cannot be created). Shared by every script."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; expected a folder (it is created if missing)"
    if not folder and path.is_dir():
        return f"{flag} {path} is a folder; expected a file name"
    for parent in path.parents:
        if parent.exists():  # the nearest existing one decides
            if not parent.is_dir():
                return f"{flag} {path}: {parent} is a file, so nothing can be created below it"
            break
    return None


def flag_name(dest: str) -> str:
    """The command-line spelling of an argparse destination (loss_lambda -> --lambda)."""
    return "--lambda" if dest == "loss_lambda" else "--" + dest.replace("_", "-")


def number_problems(args: argparse.Namespace, at_least_one: Sequence[str] = (),
                    float_ranges: dict[str, tuple[float, float | None]] | None = None) -> list[str]:
    """Out-of-range values the user gave, checked BEFORE defaults are filled in, so that no given
    value is ever silently replaced by a default (e.g. --train-length 0): counts in `at_least_one`
    must be >= 1; floats in `float_ranges` (dest -> [low, high), high None: no bound) must be finite
    (argparse's float() takes "nan" and "inf", which none of the settings means) and in range.
    Unset flags (None, or absent from `args`) are skipped."""
    problems = []
    for dest in at_least_one:
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            problems.append(f"{flag_name(dest)} {value} must be >= 1")
    for dest, (low, high) in (float_ranges or {}).items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not math.isfinite(value):
            problems.append(f"{flag_name(dest)} {value} must be a finite number")
        elif value < low or (high is not None and value >= high):
            problems.append(f"{flag_name(dest)} {value} must be in [{low:g}, {'inf' if high is None else f'{high:g}'})")
    return problems


def given_value_problems(args: argparse.Namespace) -> list[str]:
    """Every value the user gave that is out of range, checked BEFORE defaults are filled in, so
    that no given value is ever silently replaced by a default (e.g. --train-length 0)."""
    problems = number_problems(
        args, at_least_one=("train_length", "iters", "batch_size", "accum_steps", "save_every", "log_every",
                            "stop_after"),
        float_ranges={"lr": (0.0, None), "loss_lambda": (0.0, None), "margin": (0.0, None),
                      "head_lr_mult": (0.0, None), "weight_decay": (0.0, None), "momentum": (0.0, 1.0)})
    if getattr(args, "workers", None) is not None and args.workers < 0:
        problems.append(f"--workers {args.workers} must be >= 0 (0 loads the data in the training process)")
    problems += empty_path_problems({flag_name(dest): getattr(args, dest, None)
                                              for dest in ("data_root", "out", "resume", "init", "pretrained")})
    if getattr(args, "kill_at", None) is not None:
        rank, _, step = args.kill_at.partition(":")
        if not (rank.isdigit() and step.isdigit()):
            problems.append(f"--kill-at {args.kill_at}: expected RANK:STEP, e.g. 1:3")
    if args.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device {args.device}: expected auto, cpu or cuda")
    if not 0 <= args.seed < 2**32:  # what numpy and torch's generators accept
        problems.append(f"--seed {args.seed} must be in 0..2**32-1")
    if getattr(args, "compile", None) is not None:
        import torch._dynamo  # the list of backends; only when --compile is asked for
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in backends:
            problems.append(f"--compile {args.compile}: unknown torch.compile backend (known: {', '.join(backends)})")
    return problems


def batch_split_problem(args: argparse.Namespace, dist: Any, device: torch.device) -> str | None:
    """Why train.py's global batch cannot run here (None: it can): it must split evenly over the
    processes and the micro-batches, and PSPNet's pyramid BatchNorm needs two images per BN call."""
    if args.batch_size % dist.world_size:
        return f"--batch-size {args.batch_size} (global) is not divisible by the {dist.world_size} processes"
    local_batch = args.batch_size // dist.world_size
    if local_batch % args.accum_steps:
        share = f" ({local_batch} per process on {dist.world_size})" if dist.enabled else ""
        return (f"--batch-size {args.batch_size}{share} does not split into --accum-steps {args.accum_steps} "
                "equal micro-batches")
    # PSPNet's 1x1 pyramid bin is BatchNorm over one value per image: it needs two images per
    # BN call, i.e. per process and micro-batch unless SyncBatchNorm (GPU) pools the micro-batches
    # of every process.
    bn_batch = (args.batch_size if device.type == "cuda" else local_batch) // args.accum_steps
    if args.arch == "pspnet" and bn_batch < 2:
        per = "micro-batch" if args.accum_steps > 1 else "batch"
        if dist.enabled:
            per += " over all processes (SyncBatchNorm)" if device.type == "cuda" else " per process"
        return (f"PSPNet's BatchNorm needs at least 2 images per {per} (--batch-size {args.batch_size}"
                f"{f' in {args.accum_steps} micro-batches' if args.accum_steps > 1 else ''} "
                f"on {dist.world_size} {device.type} process(es))")
    return None
