"""torchrun: this process's rank, the process group, and what a lost peer looks like.

Support module for train.py and evaluate.py (README, Reliability: "a killed torchrun process" is
one line on every surviving rank). Ranks come from the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK); nccl on GPUs, gloo on CPUs; plain `python` is rank 0 of 1.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

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


def setup_distributed(device_arg: str, prog: str = "train.py") -> tuple[Dist, torch.device]:
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
