"""Speed and memory measurements (never asserted in tests; figures go in the README).

    python bench.py losses   # AAF vs cross-entropy vs a naive unfold layout (issue: losses)
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


def _loss_case(method: str, shape, device: str, repeats: int, mode: str) -> float:
    """One loss on one input shape: median forward+backward ms (mode "time") or peak MiB ("memory")."""
    import statistics
    import time
    import torch
    import losses
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
    fns = {
        "cross-entropy": lambda: losses.unary_loss(logits, labels),
        "naive unfold affinity (3)": lambda: naive_unfold_affinity(logits, lab_c, (3,)),
        "AffinityFieldLoss (3)": lambda: losses.AffinityFieldLoss(C, (3,))(logits, labels),
        "naive unfold AAF (3,5,7)": lambda: naive_unfold_affinity(logits, lab_c, (3, 5, 7), weights=aaf.weights()),
        "AdaptiveAffinityFieldLoss (3,5,7)": lambda: aaf(logits, labels),
    }
    fn = fns[method]

    def step():
        loss = fn()
        loss.backward()
        logits.grad = None
        aaf.zero_grad(set_to_none=True)

    step()                                                     # warm-up
    if mode == "memory":
        return _peak_memory(step, device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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
    """Each case runs in fresh processes (one timed, one for memory) so that one case's freed
    memory cannot hide another's peak and the memory set-up does not slow the timing."""
    import json
    import os
    import platform
    import subprocess
    import sys
    import torch
    if args.case:                                              # child process: one measurement
        name, method, mode = args.case.split("|")
        print(json.dumps(_loss_case(method, LOSS_CASES[name], args.device, args.repeats, mode)))
        return

    def child(name: str, method: str, mode: str) -> float:
        # A fixed mmap threshold makes glibc map every block over 64 KiB on its own (slow, so
        # only for the memory run); see _peak_memory.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if mode == "memory" else None
        out = subprocess.run([sys.executable, __file__, "losses", "--device", args.device,
                              "--repeats", str(args.repeats), "--case", f"{name}|{method}|{mode}"],
                             capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"# bench.py losses  device={args.device}  torch {torch.__version__}  "
          f"threads={torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    for name, shape in LOSS_CASES.items():
        print(f"\n{name}: B, C, h, w = {shape}   (forward + backward, median of {args.repeats})")
        print(f"| {'loss':34s} | {'ms':>8s} | {'x CE':>6s} | {'peak MiB':>8s} |")
        print(f"|{'-' * 36}|{'-' * 10}|{'-' * 8}|{'-' * 10}|")
        ce_ms = None
        for method in LOSS_METHODS:
            ms, mib = child(name, method, "time"), child(name, method, "memory")
            ce_ms = ce_ms or ms
            print(f"| {method:34s} | {ms:8.2f} | {ms / ce_ms:6.1f} | {mib:8.1f} |")


def bench_train(args: argparse.Namespace) -> None:
    raise SystemExit("bench train: not written yet")


def bench_eval(args: argparse.Namespace) -> None:
    raise SystemExit("bench eval: not written yet")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["losses", "train", "eval"], help="which benchmark to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)   # internal: one losses case
    return parser


def main(args: argparse.Namespace) -> None:
    {"losses": bench_losses, "train": bench_train, "eval": bench_eval}[args.what](args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
