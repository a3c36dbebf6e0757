"""torchrun: this process's rank, the process group, and what a lost peer looks like.

Support module for train.py and evaluate.py (README, Reliability: "a killed torchrun process" is
one line on every surviving rank). Ranks come from the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); nccl on GPUs, gloo on CPUs; plain `python` is rank 0
of 1. For evaluation: each rank's share of a data set (`shard`), counts summed over the ranks
(`sum_counts`), and a failure on one rank stopping every rank (`FailTogether`) instead of
leaving the others waiting in the next collective.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

import checks


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


def setup_distributed(device_arg: str, prog: str) -> tuple[Dist, torch.device]:
    """Ranks from the torchrun environment; nccl on GPU, gloo on CPU. A --device that cannot be
    used here is a one-line SystemExit starting with `prog`."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    dist = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(device_arg)
    if device.type == "cuda":
        problem = checks.device_problem(device_arg)
        if problem:
            raise SystemExit(f"{prog}: {problem}")
        # One GPU per process under torchrun; a single process keeps the GPU it was given (cuda:1).
        device = torch.device("cuda", dist.local_rank if dist.enabled or device.index is None else device.index)
        torch.cuda.set_device(device)
    if dist.enabled and device.type == "cuda":
        torch_dist.init_process_group(backend="nccl", device_id=device)
    elif dist.enabled:
        torch_dist.init_process_group(backend="gloo")
    return dist, device


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_lost_peer(err: BaseException, dist: Dist) -> bool:
    """Did a collective fail because another process of the job died (killed, out of memory, ...)?

    NCCL reports it as torch.distributed.DistError; gloo as a plain RuntimeError whose message
    starts with its source location ("[.../gloo/transport/tcp/pair.cc:...] Connection reset by
    peer"), so that is what we look for: any other RuntimeError is a bug and keeps its traceback.
    """
    if not dist.enabled:
        return False
    dist_error = getattr(torch_dist, "DistError", None)
    return (dist_error is not None and isinstance(err, dist_error)) or "/gloo/" in str(err).split("]")[0]


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stopping the job after another rank failed, or a scheduler).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it;
    atomic writes in progress remove their temporary file on the way out.
    """


def raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the exit
    raise Terminated()


def rank0_decides(message: str | None, dist: Dist, device: torch.device) -> str | None:
    """Rank 0's verdict for every rank (e.g. on a run folder only rank 0 may see)."""
    if not dist.enabled:
        return message
    box = [message]
    torch_dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


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


# --------------------------------------------------------------------------------------------
# Evaluation: shares, sums, failures
# --------------------------------------------------------------------------------------------
def processes_on_this_machine() -> int:
    """How many processes of the job share this machine (torchrun's LOCAL_WORLD_SIZE; 1 without)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def shard(count: int, dist: Dist) -> range:
    """The indices of `count` items that this rank handles: rank, rank + N, rank + 2N, ...

    Strided rather than contiguous: neighbouring items are often alike in cost (one city of
    Cityscapes, one size of image), so every rank gets a similar mix and the ranks finish together.
    """
    return range(dist.rank, count, dist.world_size)


def _gather(obj: Any, dist: Dist) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank (pickled; nccl sends it via the GPU
    that setup_distributed made current)."""
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def sum_counts(counts: dict[str, Any], dist: Dist) -> dict[str, Any]:
    """Every numpy array and number of `counts` (nested dicts too) summed over the ranks, on
    every rank; other values must be equal on every rank. Sums run in rank order, so integer
    counts are exact and float sums are the same on every rank (not bit for bit those of one
    process, which adds the images in another order)."""
    if not dist.enabled:
        return counts
    return _sum_values(_gather(counts, dist), "counts")


def _sum_values(values: list[Any], where: str) -> Any:
    first = values[0]
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError(f"the ranks hold different entries in {where}: {[sorted(v) for v in values]}")
        return {key: _sum_values([v[key] for v in values], f"{where}[{key!r}]") for key in first}
    if isinstance(first, np.ndarray):
        if any(not isinstance(v, np.ndarray) or v.shape != first.shape for v in values):
            raise ValueError(f"the ranks hold arrays of different shapes in {where}")
        total = first.copy()
        for value in values[1:]:
            total += value
        return total
    if isinstance(first, (int, float, np.number)) and not isinstance(first, bool):
        return sum(values[1:], first)
    if any(v != first for v in values[1:]):
        raise ValueError(f"the ranks hold different values in {where}: {values}")
    return first


def wait_for_each_other(dist: Dist) -> None:
    """A barrier that a broken process group (a rank gone) does not turn into another error."""
    if dist.enabled:
        try:
            torch_dist.barrier()
        except RuntimeError:
            pass


class JobFailed(Exception):
    """Raised on every rank after a `FailTogether` block failed on one or more ranks.

    failures: (rank, message, is_bug) of each failed rank; own: this rank's exception, if it
    failed (a bug's traceback belongs to the rank that met it)."""

    def __init__(self, failures: list[tuple[int, str, bool]], world_size: int, own: BaseException | None):
        super().__init__("; ".join(f"rank {rank}: {message}" for rank, message, _ in failures))
        self.failures, self.world_size, self.own = failures, world_size, own

    def report(self, prog: str) -> str:
        """The lines rank 0 prints: a failure that every rank met alike once, as one process says
        it; otherwise one line per failed rank."""
        texts = [message.removeprefix(f"{prog}: ") for _, message, _ in self.failures]
        if len(self.failures) == self.world_size and len(set(texts)) == 1 and not self.failures[0][2]:
            return f"{prog}: {texts[0]}"
        return "\n".join(f"{prog}: rank {rank}: {text}" + (" (a bug: its traceback is in that rank's output)" if bug
                                                             else "")
                         for (rank, _, bug), text in zip(self.failures, texts))


class FailTogether:
    """`with FailTogether(dist, one_line):` -- every rank leaves the block together.

    On leaving, the ranks tell each other whether the block raised. When it raised on any rank,
    every rank raises JobFailed: a rank whose input was bad (a missing file, a write that failed)
    no longer exits alone and leaves the others waiting in the next collective until the process
    group's timeout. Exceptions of `one_line` (and SystemExit) are input errors whose message is
    the line to print; any other Exception is a bug (reported with its type; the rank that met it
    keeps the traceback). KeyboardInterrupt and SIGTERM (Terminated), which reach every process
    of the job, pass through without an exchange. One process: the block's exception as it is.
    """

    def __init__(self, dist: Dist, one_line: tuple[type[BaseException], ...] = ()):
        self.dist, self.one_line = dist, one_line

    def __enter__(self) -> "FailTogether":
        return self

    def __exit__(self, exc_type, exc: BaseException | None, tb) -> bool:
        if not self.dist.enabled or not (exc is None or isinstance(exc, (Exception, SystemExit))):
            return False
        failure = None
        if isinstance(exc, SystemExit):
            failure = ("" if exc.code is None else str(exc.code), False)
        elif exc is not None:
            bug = not isinstance(exc, self.one_line)
            failure = (f"{type(exc).__name__}: {exc}" if bug else str(exc), bug)
        failures = [(rank, *f) for rank, f in enumerate(_gather(failure, self.dist)) if f is not None]
        if failures:
            raise JobFailed(failures, self.dist.world_size, exc)
        return False
