"""Bad flags are errors, never defaults: the one-line checks every script runs before any work.

Support module (README, Reliability: "Bad flags are errors, never defaults" and "evaluate.py,
infer.py and plot.py check their outputs before any work"). Each function returns the problem as
one line (or None / an empty list); the script that calls it prefixes its own name and stops.
Imports nothing of the project.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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
    there, or fall back to the default, instead of failing (shared by infer.py and plot.py)."""
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
    must be a folder (`notes.txt/out` cannot be created). Shared by infer.py and plot.py."""
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
