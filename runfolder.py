"""The run folder: reruns never destroy a run, a resume continues exactly, a stop says where to go on.

Support module for train.py (README, Reliability: "Resume", "Reruns never destroy a run" and the
one line a stopped run ends with). What lives in `<out>/`: `last.pt`, `model.pt` (checkpoint.py
writes them atomically), `log.jsonl` (one JSON record per log interval), `args.json`, the
TensorBoard events and the lock `.train.lock` that keeps a second train.py out while one runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

import checkpoint
import checks
import distributed
import finite

# Checkpoint key of the trained weights inside a projection loss (+ "_optimizer" for their SGD).
ADVERSARY_KEYS = {"aaf": "aaf", "gan": "disc"}
# Files written atomically into the run folder; a kill -9 mid-write leaves `.<name>.<random>.tmp`.
ATOMIC_FILES = ("last.pt", "model.pt", "log.jsonl", "args.json")
TENSORBOARD_DIR = "tensorboard"  # <out>/tensorboard: the events of --tensorboard
# Settings that define the optimisation trajectory: a resumed run must use the same ones.
TRAJECTORY_ARGS = ("dataset", "train_split", "train_length", "crop_size", "arch", "backbone", "loss",
                   "loss_lambda", "margin", "kernel_sizes", "decay", "iters", "batch_size", "lr",
                   "head_lr_mult", "momentum", "weight_decay", "seed", "amp", "accum_steps")
# Trajectory settings added after checkpoints were first written: the value every earlier run had.
# (amp is not here: a checkpoint without it is not compared.)
TRAJECTORY_DEFAULTS = {"accum_steps": 1}


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


def check_resume_args(args: argparse.Namespace, ckpt: dict, world_size: int, is_main: bool = True,
                      train_size: int | None = None) -> None:
    """A resumed run must follow the same trajectory: refuse changed settings, and a training set
    of another size (its order depends on the size), up front."""
    # A setting missing from the checkpoint predates it: it had the value of TRAJECTORY_DEFAULTS
    # (accum_steps: 1), or for the others (e.g. amp, added later) there is nothing to compare.
    saved = {**TRAJECTORY_DEFAULTS, **ckpt.get("args", {})}
    changed = [f"{checks.flag_name(name)}: {getattr(args, name)!r} now, {saved[name]!r} in the checkpoint"
               for name in TRAJECTORY_ARGS if name in saved and saved[name] != getattr(args, name)]
    if changed:
        raise SystemExit(f"train.py: --resume {args.resume} was written with other settings; pass the "
                         "original run's flags (" + "; ".join(changed) + ")")
    saved_size = ckpt.get("train_size")  # None: a checkpoint from before the check, nothing to compare
    if train_size is not None and saved_size is not None and saved_size != train_size:
        raise SystemExit(f"train.py: --resume {args.resume} trained on {saved_size} {args.train_split} "
                         f"images, the data set now has {train_size}: the data order would differ from the "
                         "interrupted run (restore the data set, or start a new run with --init)")
    if ckpt.get("world_size", world_size) != world_size and is_main:
        print(f"train.py: warning: resuming on {world_size} processes, the checkpoint ran on "
              f"{ckpt['world_size']}: the data order differs from an uninterrupted run", file=sys.stderr)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint file was written at; None if it cannot be read (memory-mapped: cheap)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # unreadable, truncated or foreign: the caller words it
        return None


def describe_run(out: Path) -> str | None:
    """What `out` holds that a fresh start would destroy, e.g. "last.pt at step 180, log.jsonl
    with 9 records"; None when it holds none of last.pt, model.pt or a non-empty log.jsonl."""
    found = []
    for name in ("last.pt", "model.pt"):
        path = out / name
        if path.exists():
            step = checkpoint_step(path)
            found.append(f"{name} (unreadable)" if step is None else f"{name} at step {step}")
    log = out / "log.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        records = len(log.read_text().splitlines())
        found.append(f"log.jsonl with {records} record{'s' if records != 1 else ''}")
    return ", ".join(found) or None


def continues_in_place(args: argparse.Namespace, out: Path) -> bool:
    """--resume of the run whose folder is `out` (the default --out of --resume)."""
    return args.resume is not None and Path(args.resume).resolve().parent == out.resolve()


class RunLock:
    """One train.py per run folder: an exclusive flock on <out>/.train.lock, taken before the
    folder is looked at and held until the process ends. The kernel drops a flock when its process
    dies, even by kill -9, so a crash leaves no stale lock; a second start into the folder meanwhile
    is refused (`refusal`) instead of interleaving its log and checkpoints with the first's.
    Without fcntl (not POSIX) there is no lock."""

    NAME = ".train.lock"
    TRIES = 10

    @staticmethod
    def unlocked(why: str) -> None:
        print(f"train.py: warning: {why}; running without the one-run-per-folder lock", file=sys.stderr)

    def __init__(self, out: Path):
        self.out, self.fd, self.refusal = out, None, None
        self.created = not out.exists()   # remove the folder again if this start leaves it empty
        try:
            import fcntl
        except ImportError:
            return
        path = out / self.NAME
        for _ in range(self.TRIES):
            try:
                out.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # another start's release() removed the empty folder meanwhile
                continue
            except OSError as error:  # no permission, a read-only file system
                self.refusal = (f"train.py: cannot create {path} ({error.strerror or error}); --out must be a "
                                "folder this user can write")
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # EWOULDBLOCK: held by a running train.py
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                self.refusal = (f"train.py: another train.py (pid {holder}) is writing into {out} right now; "
                                "wait for it to end or choose another --out")
                return
            except OSError as error:  # e.g. ENOLCK: a network file system without locks
                os.close(fd)
                self.unlocked(f"{path} cannot be locked here ({error.strerror or error})")
                return
            # release() unlinks the file before it unlocks: a lock taken on a file that has been
            # unlinked meanwhile is no lock (a third start would create and lock a new file). Retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # the file kept changing under us, or this file system's fstat and stat disagree
            self.unlocked(f"{path} kept being replaced while it was locked")
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        (self.out / self.NAME).unlink(missing_ok=True)
        os.close(self.fd)                 # drops the flock
        self.fd = None
        if self.created:
            try:
                self.out.rmdir()          # only if nothing was written into it
            except OSError:
                pass


def check_run_folder(args: argparse.Namespace, out: Path) -> str | None:
    """Refusal message when starting would overwrite another run's files (None: go ahead)."""
    if continues_in_place(args, out) or args.overwrite:
        return None
    held = describe_run(out)
    if held is None:
        return None
    if (out / "model.pt").exists():  # finished: nothing to continue
        return (f"train.py: {out} already holds a finished run ({held}); choose another --out "
                "(--overwrite starts afresh and deletes it)")
    way = (f"continue it with --resume {out / 'last.pt'}, or choose another --out" if (out / "last.pt").exists()
           else "it has no checkpoint to continue from; choose another --out")
    return f"train.py: {out} already holds a run ({held}); {way} (--overwrite starts afresh and deletes it)"


def prepare_run_folder(args: argparse.Namespace, out: Path, start: int, world_size: int) -> None:
    """Rank 0, before the first iteration: leave the folder as this start's files describe it.

    - temporary files of atomic writes that a kill -9 interrupted are removed;
    - a new run (check_run_folder let it in: the folder held no run, or --overwrite): an old
      run's checkpoints and TensorBoard events go and the log starts empty;
    - resume in the run's folder: log.jsonl keeps its records up to the resumed step only (the
      ones after it are redone), rewritten atomically, so after any number of kills each step is
      logged once;
    - args.json: the resolved settings of this start (rewritten on every start, atomically).
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in ATOMIC_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    log_path = out / "log.jsonl"
    kept = []
    if not continues_in_place(args, out):
        for name in ("last.pt", "model.pt"):
            (out / name).unlink(missing_ok=True)
        # The old run's TensorBoard events and evaluate.py results too: a new writer would add its
        # curves to theirs, and old scores would sit beside the new model.
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
        for old in out.glob("eval_*.json"):
            old.unlink()
    elif log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill: it and what follows are redone
                break
            if record.get("step", 0) > start or "eval" in record:
                break
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    checkpoint.atomic_write(log_path, lambda f: f.write(text.encode()))
    settings = {"args": vars(args), "start_step": start, "world_size": world_size, "torch": torch.__version__}
    body = json.dumps(settings, indent=1) + "\n"
    checkpoint.atomic_write(out / "args.json", lambda f: f.write(body.encode()))


def kept_checkpoint(out: Path, resumable: bool = True) -> str:
    """Where the run can be continued from, for the line a stopped run ends with."""
    last = out / "last.pt"
    if not last.exists():
        return "no checkpoint was written yet"
    step = checkpoint_step(last)
    if step is None:
        return f"{last} is unreadable"
    hint = f"; continue with --resume {last}" if resumable else ""
    return f"the last good checkpoint is {last} (step {step}{hint})"


def append_line(path: Path, line: str) -> None:
    """One line more in log.jsonl; a full disk is a WriteError (one line), not a traceback."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as error:
        raise checkpoint.WriteError(f"cannot write {path}: {error.strerror or error}") from error


def open_tensorboard(out: Path, start: int):
    """A SummaryWriter on <out>/tensorboard, or one line saying what to install. A resumed run
    (start > 0) hides the events a killed run wrote after its checkpoint (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        raise SystemExit("train.py: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start + 1 if start else None)


def tensorboard_record(writer, record: dict, info) -> None:
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


def failure_line(err: BaseException, dist: distributed.Dist, out: Path, input_errors: tuple[type, ...] = (),
                 rank_errors: tuple[type, ...] = ()) -> tuple[str, bool] | None:
    """(the one line a failed run ends with, whether every rank prints its own) for the project's
    own input errors (`input_errors`: met alike by every rank, rank 0 speaks; `rank_errors`: met
    by one rank, which names itself), a non-finite stop, a failed write (disk full), Ctrl-C,
    SIGTERM and a lost torchrun peer; None for anything else (a bug keeps its traceback)."""
    rank = f"rank {dist.rank}: " if dist.enabled else ""
    # Stopped after this start wrote model.pt (in the final evaluation, say): nothing to resume.
    kept = getattr(err, "finished_model", None) or kept_checkpoint(out)
    if isinstance(err, rank_errors):  # e.g. a corrupt image, met by the one rank that loaded it
        return f"train.py: {rank}{err}", True
    if isinstance(err, input_errors):  # data root or file, weights, checkpoint
        return f"train.py: {err}", False
    if isinstance(err, finite.NonFiniteError):  # raised on every rank at the same check (FiniteGuard reduces first)
        return f"train.py: {err}", False
    if isinstance(err, checkpoint.WriteError):  # a full disk while writing a checkpoint or the log
        return f"train.py: {rank}{err}; {kept}", True
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C: how most users stop a run; nothing is lost
        return f"train.py: {rank}stopped by Ctrl-C; {kept}", True
    if isinstance(err, distributed.Terminated):
        return (f"train.py: {rank}stopped by SIGTERM"
                + (" (torchrun stops the job when one of its processes fails)" if dist.enabled else "")
                + f"; {kept}"), True
    if isinstance(err, RuntimeError) and distributed.is_lost_peer(err, dist):
        return (f"train.py: rank {dist.rank}: lost contact with another process of the job (it crashed "
                f"or was killed; see its own message); {kept}"), True
    return None


def training_state(parts, args: argparse.Namespace, info, step: int,
                   device: torch.device, world_size: int, train_size: int | None = None) -> dict:
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
        "train_size": train_size,  # a resume checks it: the data order depends on the set's size
        "optimizer": parts.optimizer.state_dict(),
        "aaf": proj.state_dict() if key == "aaf" else None,
        "aaf_optimizer": parts.projection_optimizer.state_dict() if key == "aaf" else None,
        "disc": proj.state_dict() if key == "disc" else None,
        "disc_optimizer": parts.projection_optimizer.state_dict() if key == "disc" else None,
        "rng": rng_state(device),
    }


def restore(parts, ckpt: dict, args: argparse.Namespace, device: torch.device) -> int:
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


def log_progress(record: dict, log_path: Path, info) -> None:
    """One progress line on stdout and the same record as a JSON line in log.jsonl."""
    eta = datetime.timedelta(seconds=round(min(record["eta_s"], 1e9)))  # 1e9 s: ~31 years, timedelta's range
    terms = " ".join(f"{k} {v:.4f}" for k, v in record["loss"].items())
    print(f"step {record['step']}/{record['iters']} | {terms} | lr {record['lr']:.3g} | "
          f"{record['images_per_s']:.1f} img/s | eta {eta}", flush=True)
    if "kernel_sizes" in record:
        print("  " + format_kernel_sizes(record["kernel_sizes"], info), flush=True)
    append_line(log_path, json.dumps(record))


def kernel_sizes_per_class(parts) -> dict[str, list[float]]:
    """Paper Fig. 3: the AAF's current field size per class, sum_k w[c, k] * k."""
    edge, nonedge = parts.projection.kernel_size_per_class()
    return {"edge": [round(float(v), 3) for v in edge], "nonedge": [round(float(v), 3) for v in nonedge]}


def format_kernel_sizes(sizes: dict[str, list[float]], info) -> str:
    return "AAF field size per class (edge/non-edge): " + ", ".join(
        f"{name} {e:.2f}/{n:.2f}" for name, e, n in zip(info.class_names, sizes["edge"], sizes["nonedge"]))


def dump_rank_state(parts, out: Path, dist: distributed.Dist) -> None:
    """Testing hook: this rank's trainable parameters, to check that all ranks agree."""
    if dist.enabled:
        torch_dist.barrier()  # rank 0 may still be creating `out`
    state = {f"model.{k}": v.detach().cpu() for k, v in parts.model_without_ddp.named_parameters()}
    if parts.projection is not None:
        state.update({f"projection.{k}": v.detach().cpu() for k, v in parts.projection.state_dict().items()})
    torch.save(state, out / f"rank{dist.rank}.pt")


@contextlib.contextmanager
def one_line_stop(dist: distributed.Dist, out: Path, input_errors: tuple[type, ...] = (),
                  rank_errors: tuple[type, ...] = ()) -> Iterator[RunLock | None]:
    """`with one_line_stop(dist, out) as lock: train(...)`: the run holds the folder's lock (rank 0,
    which writes the folder) and SIGTERM arrives as distributed.Terminated; a stop for a reason
    `failure_line` knows ends in one line (SystemExit), from rank 0 alone when every rank meets it
    alike; anything else (a bug) keeps its traceback. The process group and the lock are
    released on every way out."""
    lock = RunLock(out) if dist.is_main else None
    previous_handler = signal.signal(signal.SIGTERM, distributed.raise_terminated)
    message = None
    try:
        yield lock
    except BaseException as err:
        # From here on a SIGTERM (torchrun stopping the job after another rank died) must not cut
        # the report short: composing it reads last.pt, which takes a moment.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        failure = failure_line(err, dist, out, input_errors, rank_errors)
        if failure is None:  # a bug: the traceback stays
            raise
        message, every_rank = failure
        message = message if dist.is_main or every_rank else 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit below must not be interrupted
        try:
            distributed.cleanup_distributed()
        except RuntimeError:  # the process group may be broken already
            pass
        if lock is not None:
            lock.release()
        signal.signal(signal.SIGTERM, previous_handler)
    if message is not None:
        raise SystemExit(message)
