"""Checkpoints and result files: written atomically, plain types, never a non-finite value,
checked (CRC-32, finiteness) when read back.

Support module (README, Reliability: "Checkpoints"). Every file the scripts replace (a
checkpoint, `log.jsonl`, `args.json`, evaluate.py's results JSON) goes through `atomic_write`, so a reader always sees the
complete old file or the complete new one. `read_checkpoint` is the file half of loading;
model.load_checkpoint rebuilds the network from what it returns. Imports nothing of the project.
"""
from __future__ import annotations

import errno
import json
import math
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class WeightsError(ValueError):
    """A weight file or checkpoint is unreadable, or does not fit the model (one-line message).

    The scripts turn these into one-line exits; any other ValueError is a programming error and
    keeps its traceback. A subclass of ValueError, so callers that caught ValueError still do.
    """


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weight file or checkpoint does not exist (also a FileNotFoundError)."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` so that `path` is always either the old or the new file.

    The bytes go to a temporary file `.<name>.<random>.tmp` in the same folder (same file system,
    so os.replace is an atomic rename), are flushed and fsynced, then renamed over `path`. On any
    failure, including KeyboardInterrupt, the temporary file is removed and `path` is untouched;
    only a kill -9 can leave one behind (runfolder.prepare_run_folder removes those of a run folder when
    train.py starts there again). The file gets
    the usual mode, 0666 minus the umask, as open() would give it (tempfile.mkstemp gives 0600).
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            tmp_name = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:  # O_EXCL: a name nobody else holds; mode 0o666 is reduced by the umask
                fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
    except OSError as error:  # no permission, a read-only file system, a file where a folder should be
        raise write_error(path, error) from error
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        if isinstance(error, OSError) or is_stream_write_failure(error):
            raise write_error(path, error) from error
        raise  # anything else (a bug in `write`, Ctrl-C) as it is
    # Persist the rename itself (the directory entry); not possible on every platform.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); the previous file is intact."""


def is_stream_write_failure(error: BaseException) -> bool:
    """torch.save reports a failed write (a full disk, a quota) as a RuntimeError of its zip
    writer ("PytorchStreamWriter failed writing file ...", "unexpected pos ..."), not an OSError."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("PytorchStreamWriter", "unexpected pos", "inline_container", "file write failed"))


def write_error(path: Path, error: BaseException) -> WriteError:
    """One WriteError naming the file and the reason; 'the disk may be full' only where that is
    what the error says (or torch.save's writer failed, which reports no reason)."""
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) \
        or not isinstance(error, OSError)
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    hint = "the disk may be full; " if full else ""
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    return WriteError(f"cannot write {path}: {reason} ({hint}{kept})")


class NonFiniteCheckpointError(ValueError):
    """save_checkpoint was handed a NaN or infinite value (nothing was written)."""


def _float_tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) of every floating-point tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _float_tensors(value, f"{where}[{index}]")


def finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """bool [N] on the tensors' device (one device, real floating point): tensor i holds no NaN/inf.

    Computed on the device without reading anything back, exact (no overflow of a norm) and
    with NaN propagating: on GPU one max-|x| multi-tensor reduction for all of them
    (torch._foreach_norm of order inf, a few kernels for hundreds of tensors); on CPU, where
    that falls back to a slow norm per tensor, min and max of each tensor (torch.aminmax, about
    10x faster there).
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    if tensors[0].device.type == "cpu":
        extremes = [x.float() for t in tensors for x in (torch.aminmax(t) if t.numel() else (t.new_zeros(()),) * 2)]
        return torch.isfinite(torch.stack(extremes)).view(-1, 2).all(1)
    norms = torch._foreach_norm(tensors, float("inf"))  # [max |x|] per tensor
    return torch.isfinite(torch.stack([n.float() for n in norms]))


def non_finite_entries(obj: Any) -> list[str]:
    """Key paths (e.g. 'model.backbone.bn1.running_var') of the tensors in `obj` holding NaN or inf.

    `finite_flags` per device and one read-back each, so checking a whole checkpoint costs
    about one pass over its bytes.
    """
    entries = list(_float_tensors(obj))
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(entries):
        by_device.setdefault(tensor.device, []).append(index)
    bad = []
    for indices in by_device.values():
        tensors = [entries[i][1].detach() for i in indices]
        finite = finite_flags([t.abs() if t.is_complex() else t for t in tensors]).tolist()
        bad += [i for i, ok in zip(indices, finite) if not ok]
    return [entries[i][0] for i in sorted(bad)]


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write `obj` with torch.save atomically (see `atomic_write`), never a non-finite value.

    A NaN or infinite tensor anywhere in `obj` (weights, BatchNorm statistics, optimizer
    momentum, ...) raises NonFiniteCheckpointError naming it, and `path` keeps its previous
    content: a checkpoint on disk is always one that can be trained on or evaluated.
    """
    bad = non_finite_entries(obj)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteCheckpointError(f"not writing {path}: non-finite values in {', '.join(bad[:3])}{more}")
    atomic_write(path, lambda f: torch.save(obj, f))


def _damaged_member(path: str | os.PathLike) -> str | None:
    """The first entry of a torch.save zip archive whose CRC-32 does not match its bytes (None:
    all match, or the file is no zip archive, which torch.load then reports). torch.load itself
    does not check the CRCs, so a flipped bit in a weight would load silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def json_ready(obj: Any) -> Any:
    """NaN -> None (JSON has no NaN), numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(results: dict[str, Any], path: str | os.PathLike) -> None:
    """The results as JSON, written atomically: a full disk or a kill leaves the earlier file of
    that name as it was, never a truncated one."""
    text = json.dumps(json_ready(results), indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict of a checkpoint of this project, checked: it exists and is a file, every member of
    its archive passes its CRC-32, `torch.load(weights_only=True)` reads it, it has `model` and
    `meta`, and it holds no NaN or infinity. Anything else is a WeightsError with one line."""
    if os.path.isdir(path):
        raise WeightsNotFoundError(f"{path} is a folder, not a checkpoint: give a file such as "
                                   f"{Path(path) / 'model.pt'} or {Path(path) / 'last.pt'}")
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"checkpoint not found: {path}")
    damaged = _damaged_member(path)
    if damaged is not None:
        raise WeightsError(f"{path} is damaged: {damaged} fails its checksum (a bit flip, or a copy cut "
                           "short); use another copy or an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        first_line = f"{type(error).__name__}: {error}".splitlines()[0]
        raise WeightsError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise WeightsError(f"{path} is not a checkpoint of this project "
                         "(expected a dict with 'model' and 'meta')")
    bad = non_finite_entries(ckpt)  # written by another tool, or damaged without a checksum error
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise WeightsError(f"{path} holds non-finite values in {', '.join(bad[:3])}{more}: a model with "
                           "them predicts nothing meaningful")
    return ckpt
