"""Non-finite values stop the run: a device-side watch with no host read-back per iteration.

Support module for train.py (README, Reliability: "Non-finite values stop the run"). FiniteGuard
folds every iteration's loss terms, gradients, parameters, BatchNorm statistics and optimizer
state into a few flags on the device; train.py reads them at each log interval and before every
checkpoint write, so a GPU queue never drains and a checkpoint is only written when everything
in it is finite. `parts` is train.py's Parts (model_without_ddp, projection, optimizer,
projection_optimizer); nothing else of it is used.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

import checkpoint
import distributed


class NonFiniteError(RuntimeError):
    """Something a checkpoint would hold (or the loss) became NaN or infinite; the message says what."""


class FiniteGuard:
    """A device-side watch over the loss and everything a checkpoint holds, with no host read-back.

    Every iteration (`record`, from train_step) reduces on the device, without synchronising:
    each loss term, and per kind (gradients; parameters of the network and of the AAF weights or
    discriminator; BatchNorm statistics; optimizer state: SGD momentum of all optimizers) every
    tensor (checkpoint.finite_flags: on GPU one multi-tensor max-|x| reduction over all of them; exact,
    no overflow, NaN propagates), to one "not finite" flag per term and kind. The first step at which
    a flag rises is kept with its flags and loss values; steps are counted as log.jsonl and
    checkpoints count them (step s = the state after s iterations: iteration t makes step t + 1).
    `check` reads that back: one read, and under torchrun two all_reduces so that every rank stops
    at the same point. train.py calls it at every log interval (which includes the last
    iteration) and before every checkpoint write; a checkpoint is written only after a clean
    check, so the in-memory state that went bad is never saved.

    It also sums the loss terms on the device for the logged averages (`take_averages`).
    Non-finite values from a finite loss count: a huge learning rate that overflows the weights,
    or BatchNorm running variances that overflow while the loss (on batch statistics) stays finite.
    """

    KINDS = ("gradients", "parameters", "BatchNorm statistics", "optimizer state")
    NONE = 2**62  # "no bad step yet"; larger than any step so that a MIN over ranks finds the first

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None     # loss term names, in the order of train_step's dict
        self.first_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.first_flags: torch.Tensor | None = None    # bool [terms + kinds] at first_step
        self.first_values: torch.Tensor | None = None   # float64 [terms] at first_step
        self.sums: torch.Tensor | None = None           # float64 [terms] since the last average
        self.count = 0

    def record(self, step: int, terms: dict[str, torch.Tensor], parts: Any) -> None:
        """Fold iteration `step` in: call after the optimizer steps (gradients are still there)."""
        values = torch.stack([t.detach().float() for t in terms.values()]).double()  # [terms]
        if self.names is None:
            self.names = list(terms)
            self.first_flags = torch.zeros(len(terms) + len(self.KINDS), dtype=torch.bool, device=self.device)
            self.first_values = torch.zeros(len(terms), dtype=torch.float64, device=self.device)
            self.sums = torch.zeros(len(terms), dtype=torch.float64, device=self.device)
        groups = watched_tensors(parts)
        tensors = [t for kind in self.KINDS for t in groups[kind]]
        sizes = [len(groups[kind]) for kind in self.KINDS]
        finite = checkpoint.finite_flags(tensors)                                     # [tensors]
        kind_ok = torch.stack([chunk.all() for chunk in torch.split(finite, sizes)])  # [kinds]
        flags = torch.cat([~torch.isfinite(values), ~kind_ok])                       # [terms + kinds]
        new = flags.any() & (self.first_step == self.NONE)
        self.first_step = torch.where(new, step + 1, self.first_step)  # as logs and checkpoints count
        self.first_flags = torch.where(new, flags, self.first_flags)
        self.first_values = torch.where(new, values, self.first_values)
        self.sums += values
        self.count += 1

    def take_averages(self, dist: distributed.Dist) -> dict[str, float]:
        """Mean of each loss term over the iterations since the last call, over all ranks (one read)."""
        if not self.count:
            return {}
        sums = self.sums.clone()
        if dist.enabled:
            torch_dist.all_reduce(sums, op=torch_dist.ReduceOp.SUM)
        means = (sums / (self.count * dist.world_size)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, means))

    def check(self, parts: Any, dist: distributed.Dist) -> str | None:
        """None while everything was finite on every rank; else what went non-finite first, and where."""
        if self.names is None:
            return None
        first = self.first_step.clone()
        if dist.enabled:  # the earliest bad step of any rank, then the flags and values of the ranks at it
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        mine = self.first_step == first
        report = torch.cat([torch.where(mine, self.first_flags.double(), 0.0),
                            torch.where(mine, self.first_values, 0.0), mine.double()[None]])
        if dist.enabled:
            torch_dist.all_reduce(report, op=torch_dist.ReduceOp.SUM)
        step = int(first)
        if step == self.NONE:
            return None
        report = report.tolist()
        n = len(self.names)
        flags, values, ranks = report[:n + len(self.KINDS)], report[n + len(self.KINDS):-1], report[-1]
        values = [v / ranks for v in values]
        bad_terms = [name for name, flag in zip(self.names, flags) if flag]
        bad_kinds = [kind for kind, flag in zip(self.KINDS, flags[n:]) if flag]
        loss = " ".join(f"{name}={value:.6g}" for name, value in zip(self.names, values))
        what = (["loss"] if bad_terms else []) + bad_kinds
        message = f"non-finite {what[0]} at step {step}"
        if bad_terms:
            message += f": {loss}"
        else:
            message += f" from a finite loss ({loss})"
        if len(what) > 1:
            message += f"; also non-finite: {', '.join(what[1:])}"
        now = non_finite_names(parts)
        if now:
            message += f"; now non-finite: {', '.join(now[:3])}" + (f" and {len(now) - 3} more" if len(now) > 3 else "")
        return message


def watched_tensors(parts: Any) -> dict[str, list[torch.Tensor]]:
    """The floating-point tensors FiniteGuard watches, per kind (lists rebuilt each step: gradients
    are new tensors after zero_grad(set_to_none=True), momentum buffers appear at the first step)."""
    params = list(parts.model_without_ddp.parameters())
    if parts.projection is not None:
        params += list(parts.projection.parameters())
    optimizers = [o for o in (parts.optimizer, parts.projection_optimizer) if o is not None]
    return {
        "gradients": [p.grad.detach() for p in params if p.grad is not None],
        "parameters": [p.detach() for p in params],
        "BatchNorm statistics": [b for b in parts.model_without_ddp.buffers() if b.is_floating_point()],
        "optimizer state": [v for o in optimizers for state in o.state.values() for v in state.values()
                            if isinstance(v, torch.Tensor) and v.is_floating_point()],
    }


def non_finite_names(parts: Any) -> list[str]:
    """Names of the saved tensors (parameters, BatchNorm statistics, momentum) that are not finite
    now; read on the host, once, when training stops."""
    named = [(f"model.{k}", v) for k, v in parts.model_without_ddp.state_dict().items()]
    if parts.projection is not None:
        named += [(f"projection.{k}", v) for k, v in parts.projection.state_dict().items()]
    names = {id(p): n for n, p in parts.model_without_ddp.named_parameters()}
    if parts.projection is not None:
        names.update({id(p): f"projection.{n}" for n, p in parts.projection.named_parameters()})
    for index, o in enumerate(o for o in (parts.optimizer, parts.projection_optimizer) if o is not None):
        named += [(f"{'optimizer' if index == 0 else 'projection optimizer'} momentum of "
                   f"{names[id(p)]}", v)
                  for p, state in o.state.items() for v in state.values() if isinstance(v, torch.Tensor)]
    return [name for name, v in named if v.is_floating_point() and not bool(torch.isfinite(v).all())]
