"""Speed and memory measurements (never asserted in tests; figures go in the README).

    python bench.py losses   # AAF vs cross-entropy vs a naive unfold layout (issue: losses)
    python bench.py losses --before /tmp/losses_before.py   # ... and beside another losses.py
    python bench.py train    # time per training step, CE vs Affinity vs AAF
    python bench.py eval     # the boundary metric over 1449 VOC-sized pairs
"""
from __future__ import annotations

import argparse


# --------------------------------------------------------------------------------------------
# bench.py losses
# --------------------------------------------------------------------------------------------
LOSS_CASES = {"VOC 336 crop": (8, 21, 42, 42), "Cityscapes 720 crop": (2, 19, 90, 90)}
LOSS_METHODS = ("cross-entropy", "naive unfold affinity (3)", "AffinityFieldLoss (3)",
                "naive unfold AAF (3,5,7)", "AdaptiveAffinityFieldLoss (3,5,7)")


def naive_unfold_affinity(logits, labels, kernel_sizes, margin=3.0, weights=None):
    """The yardstick: the layout public ports use (F.unfold of probabilities and one-hot labels
    into [B, C, 8, h, w], masks as tensors, plain autograd). Correct here, but memory-hungry.
    ``weights`` = (w_edge, w_nonedge) [C, K] turns it into AAF."""
    import torch
    import torch.nn.functional as F
    B, C, h, w = logits.shape
    prob = logits.float().softmax(1)
    lab = labels.clone()
    valid = lab < C
    onehot = F.one_hot(lab.clamp(max=C - 1), C).permute(0, 3, 1, 2).float() * valid[:, None]
    keep = [i for i in range(9) if i != 4]                     # drop the centre of the 3x3 stencil
    total = prob.new_zeros(())
    for k, size in enumerate(kernel_sizes):
        s = (size - 1) // 2
        unf = lambda t: F.unfold(t, 3, dilation=s, padding=s).view(B, t.shape[1], 9, h, w)[:, :, keep]
        q = unf(prob)                                          # [B, C, 8, h, w] neighbours
        oh_n = unf(onehot)
        v_n = unf(valid[:, None].float())[:, 0] > 0            # [B, 8, h, w]; padding is invalid
        pair_ok = (valid[:, None] & v_n)[:, None]              # [B, 1, 8, h, w]
        p = prob[:, :, None]
        qc, pc = q.clamp(1e-4, 1), p.clamp(1e-4, 1)
        nqc, npc = (1 - q).clamp(1e-4, 1), (1 - p).clamp(1e-4, 1)
        kl = qc * (qc / pc).log() + nqc * (nqc / npc).log()
        edge = (onehot[:, :, None] != oh_n) & pair_ok
        nonedge = ~edge & pair_ok
        e_loss = (margin - kl).clamp(min=0)
        if weights is not None:
            cls = lab.clamp(max=C - 1)
            e_loss = e_loss * weights[0][cls, k][:, None, None]
            kl = kl * weights[1][cls, k][:, None, None]
        total = total + (e_loss * edge).sum() / edge.sum().clamp(min=1) \
            + (kl * nonedge).sum() / nonedge.sum().clamp(min=1)
    return total


def _load_losses(path: str):
    """losses.py of this checkout (path "") or another copy of it (``--before``), under its own name."""
    import importlib.util
    import losses
    if not path:
        return losses
    spec = importlib.util.spec_from_file_location("losses_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OpCounter:
    """Backend operator calls, views excluded (what a GPU launches kernels for, roughly)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not (func.is_view or func.__name__.startswith("_unsafe_view")):
                    counter.calls += 1
                return func(*args, **(kwargs or {}))

        self.calls, self.mode = 0, Mode()


def _loss_case(method: str, shape, device: str, repeats: int, mode: str, losses_file: str = ""):
    """One loss on one input shape: forward+backward ms of each repetition (mode "time"), or
    [peak MiB, operator calls] of one call (mode "memory")."""
    import time
    import torch
    losses = _load_losses(losses_file)
    B, C, h, w = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, h, w, generator=gen).to(device).requires_grad_()
    # Blocky labels (6x6 regions, so edges and non-edges both occur) with two ignored rows.
    labels = torch.randint(0, C, (B, h // 6 + 1, w // 6 + 1), generator=gen)
    labels = labels.repeat_interleave(6, 1).repeat_interleave(6, 2)[:, :h, :w].contiguous()
    labels[:, :2] = 255
    labels = labels.to(device)
    lab_c = labels.masked_fill(labels >= C, C)
    aaf = losses.AdaptiveAffinityFieldLoss(C, (3, 5, 7)).to(device)
    affinity = losses.AffinityFieldLoss(C, (3,)).to(device)
    fns = {
        "cross-entropy": lambda: losses.unary_loss(logits, labels),
        "naive unfold affinity (3)": lambda: naive_unfold_affinity(logits, lab_c, (3,)),
        "AffinityFieldLoss (3)": lambda: affinity(logits, labels),
        "naive unfold AAF (3,5,7)": lambda: naive_unfold_affinity(logits, lab_c, (3, 5, 7), weights=aaf.weights()),
        "AdaptiveAffinityFieldLoss (3,5,7)": lambda: aaf(logits, labels),
    }
    fn = fns[method]

    def step():
        loss = fn()
        loss.backward()
        logits.grad = None
        aaf.zero_grad(set_to_none=True)

    step()                                                     # warm-up (and the caches of losses.py)
    step()
    if mode == "memory":
        mib = _peak_memory(step, device)
        counter = _OpCounter()
        with counter.mode:
            step()
        return [mib, counter.calls]
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_memory(step, device: str) -> float:
    """Peak extra memory (MiB) of one call. CUDA: the allocator's peak. CPU: the process's peak
    resident set (VmHWM) after resetting it through /proc/self/clear_refs, minus the RSS before;
    run with MALLOC_MMAP_THRESHOLD_ set (bench_losses does) so that every block over 64 KiB is
    mmap'ed alone and unmapped on free, and the resident set follows the live tensors."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))   # kB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS:")
    step()
    return (status("VmHWM:") - base) / 1024


def bench_losses(args: argparse.Namespace) -> None:
    """Each measurement runs in a fresh process (memory and operator count in one, each timing
    round in another) so that one case's freed memory cannot hide another's peak and the memory
    set-up does not slow the timing. With --before, the losses of another copy of losses.py are
    measured in the same run; the timing rounds go through every method in turn (interleaved), so
    that a change of machine load hits all alike, and the spread over the rounds is shown."""
    import json
    import os
    import platform
    import statistics
    import subprocess
    import sys
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:                                              # child process: one measurement
        name, method, mode, path = args.case.split("|")
        print(json.dumps(_loss_case(method, LOSS_CASES[name], args.device, args.repeats, mode, path)))
        return
    if args.before and not os.path.isfile(args.before):
        raise SystemExit(f"bench.py: --before {args.before}: no such file (expected a copy of losses.py)")

    def child(name: str, method: str, mode: str, path: str):
        # A fixed mmap threshold makes glibc map every block over 64 KiB on its own (slow, so
        # only for the memory run); see _peak_memory.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if mode == "memory" else None
        out = subprocess.run([sys.executable, __file__, "losses", "--device", args.device, "--threads",
                              str(args.threads), "--repeats", str(args.repeats), "--case", f"{name}|{method}|{mode}|{path}"],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"bench.py losses: {method} ({name}) failed: {out.stderr.strip().splitlines()[-1]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # (label, method, losses file); the previous copy's rows beside the new ones.
    rows = []
    for method in LOSS_METHODS:
        rows.append((method, method, ""))
        if args.before and not method.startswith("naive"):
            rows.append((f"{method} [before]", method, args.before))
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"# bench.py losses  device={args.device} ({device})  torch {torch.__version__}  "
          f"threads={torch.get_num_threads()}  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}")
    if args.before:
        print(f"# [before] = {args.before}")
    for name, shape in LOSS_CASES.items():
        mem = {label: child(name, method, "memory", path) for label, method, path in rows}
        rounds = {label: [] for label, _, _ in rows}            # per round: median ms of --repeats steps
        for _ in range(args.rounds):
            for label, method, path in rows:
                rounds[label].append(statistics.median(child(name, method, "time", path)))
        print(f"\n{name}: B, C, h, w = {shape}   (forward + backward; ms = median over {args.rounds} "
              f"rounds of the median of {args.repeats} steps, [min - max] of the rounds)")
        print(f"| {'loss':43s} | {'ms':>8s} | {'spread':>17s} | {'x CE':>6s} | {'peak MiB':>8s} | {'op calls':>8s} |")
        print(f"|{'-' * 45}|{'-' * 10}|{'-' * 19}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
        ce_ms = statistics.median(rounds["cross-entropy"])
        for label, _, _ in rows:
            ms = statistics.median(rounds[label])
            spread = f"[{min(rounds[label]):.2f} - {max(rounds[label]):.2f}]"
            mib, calls = mem[label]
            print(f"| {label:43s} | {ms:8.2f} | {spread:>17s} | {ms / ce_ms:6.1f} | {mib:8.1f} | {calls:8d} |")


def bench_train(args: argparse.Namespace) -> None:
    """Median time of one whole training iteration (train.train_step: forward, losses, backward,
    SGD steps) with CE, Affinity and AAF on the same batch, the three interleaved iteration by
    iteration so that a change in machine load hits all alike. CPU: the demo preset (tiny PSPNet,
    synthetic 128 px crops, batch 8, float32). GPU: PSPNet-ResNet-101, 336 px crops, batch 8,
    bf16, channels-last, plus model FLOP utilisation (FLOPs of one iteration by FlopCounterMode)."""
    import statistics
    import time
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import data
    import train

    peak_flops = 989e12  # NVIDIA's H100 SXM dense bf16 peak (the H200 has the same tensor cores)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        preset = ["--dataset", "voc", "--backbone", "resnet101", "--pretrained", "none", "--crop-size", "336",
                  "--batch-size", "8", "--amp"]
    else:
        preset = ["--dataset", "synthetic", "--backbone", "tiny"]
    warmup = 10 if cuda else 2
    losses = ("ce", "affinity", "aaf")

    runs = {}  # loss -> (parts, args)
    for loss in losses:
        step_args, info = train.resolve_args(train.get_args_parser().parse_args(preset + ["--loss", loss]))
        torch.manual_seed(0)
        runs[loss] = (train.build_parts(step_args, info, device, train.Dist()), step_args)
    # Realistic label maps: one batch of synthetic street scenes (on VOC's 21 classes, 8 occur).
    dataset = data.build_dataset("synthetic", None, "train", train=True, crop_size=step_args.crop_size)
    dataset.set_epoch(0)
    samples = [dataset[i] for i in range(step_args.batch_size)]
    batch = train.batch_to_device({"image": torch.stack([s["image"] for s in samples]),
                                   "label": torch.stack([s["label"] for s in samples])}, device)

    for parts, step_args in runs.values():
        parts.model.train()
        for step in range(warmup):
            train.train_step(parts, *batch, step, step_args)
    times = {loss: [] for loss in losses}
    for step in range(warmup, warmup + args.repeats):
        for loss, (parts, step_args) in runs.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train.train_step(parts, *batch, step, step_args)  # reads the losses back: synchronised
            if cuda:
                torch.cuda.synchronize()
            times[loss].append(time.perf_counter() - t0)
    flops = {}
    for loss, (parts, step_args) in runs.items():
        with FlopCounterMode(display=False) as counter:
            train.train_step(parts, *batch, warmup + args.repeats, step_args)
        flops[loss] = counter.get_total_flops()

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    setting = ("PSPNet-ResNet-101, 336 px crops, batch 8, bf16 autocast, channels-last" if cuda
               else "PSPNet-tiny, synthetic 128 px crops, batch 8, float32")
    print(f"bench train on {name}: {setting}; median of {args.repeats} iterations after {warmup} warm-up")
    print(f"{'loss':<10}{'ms/iter':>10}{'images/s':>10}{'x CE':>8}{'TFLOP/iter':>12}" + ("   MFU" if cuda else ""))
    median = {loss: statistics.median(t) for loss, t in times.items()}
    for loss in losses:
        seconds = median[loss]
        line = (f"{loss:<10}{1e3 * seconds:>10.1f}{step_args.batch_size / seconds:>10.1f}"
                f"{seconds / median['ce']:>8.3f}{flops[loss] / 1e12:>12.4f}")
        if cuda:
            line += f"{100 * flops[loss] / seconds / peak_flops:>6.1f}%"
        print(line)
    print(f"AAF overhead over CE: {100 * (median['aaf'] / median['ce'] - 1):+.1f}% per iteration "
          "(issue target <= 3% on GPU)")
    if cuda:
        print(f"MFU = FlopCounterMode FLOPs of one iteration (forward + backward) / time / "
              f"{peak_flops / 1e12:.0f} TFLOP/s (H100 bf16 dense peak; target >= 35%)")


def bench_eval(args: argparse.Namespace) -> None:
    """Boundary metric (evaluate.boundary_stats) over 1449 VOC-sized synthetic pairs, all cores.

    Pairs: 500x375, 21 classes; ground truth = background plus 1-3 object classes as smooth
    random blobs, with VOC's 255 band (5 px) along every class change; prediction = the clean
    map warped by a smooth random displacement (std about 2-3 px, tails beyond the 4.7 px
    tolerance: boundaries move, thin parts break), plus a wrongly classified region in a third
    of the images. Each worker process generates and scores its share; generation is timed
    apart from the metric (CPU time per process, so a busy machine does not inflate it). A
    class-image is one class present in the prediction or the ground truth of one image.
    """
    import multiprocessing
    import os
    import time

    import numpy as np

    import evaluate

    num_images, height, width, num_classes = 1449, 375, 500, 21
    workers = evaluate.usable_cpus()

    def smooth_field(rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
        # [height, width] smooth noise: coarse Gaussian noise, bilinearly interpolated rows then
        # columns with gathers (no BLAS call: its threads would fight the worker processes).
        def lerp(values: np.ndarray, n: int, axis: int) -> np.ndarray:
            k = values.shape[axis]
            pos = np.linspace(0, k - 1, n, dtype=np.float32)
            low = np.minimum(pos.astype(int), k - 2)
            frac = pos - low
            shape = (n, 1) if axis == 0 else (1, n)
            return (np.take(values, low, axis) * (1 - frac).reshape(shape)
                    + np.take(values, low + 1, axis) * frac.reshape(shape))
        return lerp(lerp(rng.standard_normal(cells, dtype=np.float32), height, 0), width, 1)

    rows, cols = np.mgrid[:height, :width].astype(np.float32)

    def make_pair(index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(index)
        clean = np.zeros((height, width), np.uint8)  # background 0
        for cls in rng.choice(np.arange(1, num_classes), size=rng.integers(1, 4), replace=False):
            blob = smooth_field(rng, (int(rng.integers(3, 7)), int(rng.integers(4, 9))))
            clean[blob > rng.uniform(0.6, 1.4)] = cls
        # Prediction: the clean map sampled at smoothly displaced positions.
        ys = np.clip(np.rint(rows + 3 * smooth_field(rng, (8, 10))), 0, height - 1).astype(np.intp)
        xs = np.clip(np.rint(cols + 3 * smooth_field(rng, (8, 10))), 0, width - 1).astype(np.intp)
        pred = clean[ys, xs]
        if rng.random() < 1 / 3:  # a confused region: part of an object takes another class
            pred = pred.copy()
            pred[smooth_field(rng, (4, 5)) > 1.5] = rng.integers(0, num_classes)
        # Ground truth: VOC marks a band of about 5 px along object outlines as void (255):
        # the class changes, grown twice by their 4-neighbours (city-block distance <= 2).
        band = np.zeros((height, width), bool)
        band[:, 1:] |= clean[:, 1:] != clean[:, :-1]
        band[1:, :] |= clean[1:, :] != clean[:-1, :]
        for _ in range(2):
            grown = band.copy()
            grown[1:] |= band[:-1]
            grown[:-1] |= band[1:]
            grown[:, 1:] |= band[:, :-1]
            grown[:, :-1] |= band[:, 1:]
            band = grown
        gt = clean.copy()
        gt[band] = 255
        return pred, gt

    def work(indices: range, queue) -> None:  # runs in a forked child
        counts = np.zeros((num_classes, 4), np.int64)
        gen_time = metric_time = 0.0
        class_images = 0
        for index in indices:  # CPU time of this process: fair on a shared machine
            t0 = time.process_time()
            pred, gt = make_pair(index)
            t1 = time.process_time()
            stats = evaluate.boundary_stats(pred, gt, num_classes)
            metric_time += time.process_time() - t1
            gen_time += t1 - t0
            counts += stats
            class_images += int(np.count_nonzero(stats[:, 1] + stats[:, 3] > 0))
        queue.put((counts, gen_time, metric_time, class_images))

    # fork: the children get the local functions above without pickling them (Linux/macOS).
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    load = os.getloadavg()[0]  # other jobs on the machine make the wall time longer
    start = time.perf_counter()
    procs = [ctx.Process(target=work, args=(range(k, num_images, workers), queue)) for k in range(workers)]
    for proc in procs:
        proc.start()
    parts = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - start
    counts = sum(part[0] for part in parts)
    gen_time = sum(part[1] for part in parts)
    metric_time = sum(part[2] for part in parts)
    class_images = sum(part[3] for part in parts)
    recall, precision, f = evaluate.boundary_prf(counts)
    print(f"boundary metric, {num_images} synthetic {width}x{height} pairs, {num_classes} classes, "
          f"max_dist {evaluate.DEFAULT_MAX_DIST} (r = {evaluate.match_radius((height, width)):.2f} px), "
          f"{workers} worker processes")
    print(f"wall time {wall:.1f} s (generation included; limit 60 s; load average {load:.1f} at start on "
          f"{workers} cores)")
    print(f"CPU time: metric {metric_time:.1f} s, generation {gen_time:.1f} s; on an idle machine "
          f"about {(metric_time + gen_time) / workers:.1f} s wall, metric alone {metric_time / workers:.1f} s")
    print(f"{class_images} class-images: {1e3 * metric_time / class_images:.2f} ms CPU per class-image, "
          f"{1e3 * metric_time / num_images:.1f} ms CPU per image")
    print(f"sanity: mean recall {evaluate.nanmean(recall):.3f}, precision {evaluate.nanmean(precision):.3f}, "
          f"F {evaluate.nanmean(f):.3f}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["losses", "train", "eval"], help="which benchmark to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="losses: timing rounds, each a fresh process per loss, interleaved (default 3)")
    parser.add_argument("--before", default="",
                        help="losses: also measure the losses of this other copy of losses.py, e.g. "
                             "`git show REV:losses.py > /tmp/losses_before.py` (default: none)")
    parser.add_argument("--threads", type=int, default=0,
                        help="losses: torch CPU threads (default 0 = torch's default; 1 is steadier on a "
                             "shared machine)")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)   # internal: one losses case
    return parser


def main(args: argparse.Namespace) -> None:
    {"losses": bench_losses, "train": bench_train, "eval": bench_eval}[args.what](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
