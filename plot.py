"""Figures: training curves, per-class bars, the learned field sizes (paper Fig. 3), confusion
matrices and qualitative grids (paper Figs. 4-5), written as PNG files (matplotlib's Agg
backend: no display needed).

    python plot.py curves runs/synthetic_ce/log.jsonl runs/synthetic_aaf/log.jsonl --out curves.png
    python plot.py classes ce/eval.json affinity/eval.json aaf/eval.json --thin pole sign --out classes.png
    python plot.py classes results/synthetic.json --thin pole sign person bicycle fence --out classes.png
    python plot.py fields runs/synthetic_aaf/model.pt --out fields.png          # or results/synthetic.json
    python plot.py confusion aaf/eval.json --out confusion.png
    python plot.py grid --ckpt ce/model.pt aaf/model.pt --labels CE AAF --indices 0 5 9 --out grid.png

Inputs: `log.jsonl` of train.py; result JSONs of `evaluate.py --json` (one run) or the
`results/<name>.json` of experiments.py (method -> one result per seed: plotted as the mean over
seeds with the sample standard deviation as error bars); checkpoints of train.py.
`python experiments.py figures <name>` makes the README's figures with these commands.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import checks
import data

DPI = 120  # with the figure sizes below: about 1200 px wide, legible when a README shrinks it
SERIES_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
THIN_SHADE = "#eeeeee"  # background of the columns of thin classes
FIELD_COLOURS = ("#1b7f79", "#9ccfc9")  # edge, non-edge term (not method colours)
Series = tuple[str, list[dict[str, Any]]]  # (label, results of one method: one per seed or a single run)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or one line saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: works without a display (CI, servers)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def out_problem(out: str | Path) -> str | None:
    """Why --out cannot be written as a PNG file, or None (main checks it before any work)."""
    if Path(out).suffix.lower() != ".png":
        return f"--out {out} should end in .png"
    return checks.output_path_problem(out, "--out", folder=False)


def save(fig, out: str | Path) -> Path:
    out = Path(out)
    problem = out_problem(out)
    if problem:
        raise SystemExit(f"plot.py: {problem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"plot.py: wrote {out}", file=sys.stderr)
    return out


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"plot.py: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"plot.py: {path} is not a readable JSON file: {error}") from None


def default_label(path: Path) -> str:
    """`runs/aaf_seed0/eval.json` -> 'aaf_seed0'; `ce.json` -> 'ce'."""
    generic = path.stem.startswith(("eval", "log", "model", "last")) and path.parent.name
    return path.parent.name if generic else path.stem


def labels_for(paths: Sequence[str], labels: Sequence[str] | None) -> list[str] | None:
    if labels is not None and len(labels) != len(paths):
        raise SystemExit(f"plot.py: {len(labels)} --labels for {len(paths)} inputs")
    return list(labels) if labels is not None else None


# --------------------------------------------------------------------------------------------
# Result JSONs: one evaluate.py result, or experiments.py's method -> [result per seed]
# --------------------------------------------------------------------------------------------
def load_series(paths: Sequence[str], labels: Sequence[str] | None = None,
                select: Sequence[str] | None = None) -> list[Series]:
    """(label, results) per plotted series. An evaluate.py JSON is one series (labelled by its
    file or folder name); an experiments.py JSON gives one series per method (`select` picks and
    orders them). `labels` renames the series in order."""
    series: list[Series] = []
    for path in paths:
        content = read_json(path)
        if isinstance(content, dict) and "class_names" in content:
            series.append((default_label(Path(path)), [content]))
        elif isinstance(content, dict) and content and all(
                isinstance(v, list) and v and all(isinstance(r, dict) and "class_names" in r for r in v)
                for v in content.values()):
            keys = list(select) if select else list(content)
            unknown = [k for k in keys if k not in content]
            if unknown:
                raise SystemExit(f"plot.py: {path} has no {', '.join(unknown)}; it holds {', '.join(content)}")
            series += [(key, content[key]) for key in keys]
        else:
            raise SystemExit(f"plot.py: {path} is neither an evaluate.py result (with 'class_names') nor an "
                             f"experiments.py results file (method -> list of results)")
    if labels is not None:
        if len(labels) != len(series):
            raise SystemExit(f"plot.py: {len(labels)} --labels for {len(series)} series "
                             f"({', '.join(label for label, _ in series)})")
        series = [(label, results) for label, (_, results) in zip(labels, series)]
    names = {tuple(r["class_names"]) for _, results in series for r in results}
    if len(names) > 1:
        raise SystemExit("plot.py: the inputs are results of different data sets (class names differ)")
    return series


def per_class(results: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over seeds `[C]` of a per-class metric ('iou', 'instance_iou',
    'recall', 'precision', 'f' of the boundary); NaN (no bar) for a class that never occurs."""
    rows = []
    for r in results:
        values = r["boundary"][key] if key in ("recall", "precision", "f") else r[key]
        rows.append([math.nan if v is None else float(v) for v in values])
    values = np.array(rows, dtype=np.float64)  # [seeds, C]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (class never occurs): no bar
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(results) > 1 else np.zeros(values.shape[1])
    return mean, np.nan_to_num(std)


def has_metric(results: list[dict[str, Any]], key: str) -> bool:
    return all(("boundary" in r) if key in ("recall", "precision", "f") else (key in r) for r in results)


def thin_indices(class_names: Sequence[str], thin: Sequence[str] | None) -> list[int]:
    unknown = [name for name in thin or () if name not in class_names]
    if unknown:
        raise SystemExit(f"plot.py: --thin {', '.join(unknown)}: no such class; classes: {', '.join(class_names)}")
    return [list(class_names).index(name) for name in thin or ()]


def describe(results: list[dict[str, Any]]) -> str:
    """'synthetic val, 200 images' for a figure title."""
    first = results[0]
    where = " ".join(str(first[k]) for k in ("dataset", "split") if first.get(k))
    return f"{where}, {first.get('num_images', '?')} images"


# --------------------------------------------------------------------------------------------
# 1. Training curves from log.jsonl
# --------------------------------------------------------------------------------------------
def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The progress records of a train.py log (one per logged step, the last one if a resumed run
    logged a step twice), in step order."""
    records: dict[int, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise SystemExit(f"plot.py: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, a binary file (a checkpoint, say)
        raise SystemExit(f"plot.py: {path} is not a readable text file ({error}); expected train.py's "
                         f"log.jsonl") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"plot.py: {path}:{number} is not a JSON line (expected train.py's log.jsonl)") from None
        if isinstance(record, dict) and "step" in record and "loss" in record:
            records[int(record["step"])] = record
    if not records:
        raise SystemExit(f"plot.py: {path} holds no training records (train.py's log.jsonl has one per --log-every)")
    return [records[step] for step in sorted(records)]


def plot_curves(paths: Sequence[str], labels: Sequence[str] | None, out: str | Path, title: str | None = None) -> Path:
    """Panels: cross-entropy, the projection term (raw, before lambda and the decay), the total,
    the learning rate, images/s and, for AAF runs, the mean learned field size; runs overlaid."""
    plt = pyplot()
    names = labels_for(paths, labels) or [default_label(Path(p)) for p in paths]
    runs = [(name, read_log(path)) for name, path in zip(names, paths)]
    with_aaf = any("kernel_sizes" in r for _, records in runs for r in records)
    panels = ["ce", "projection", "total", "lr", "images_per_s"] + (["fields"] if with_aaf else [])
    titles = {"ce": "cross-entropy", "projection": "projection term (raw, before λ·decay)",
              "total": "total loss (minimised)", "lr": "learning rate (backbone)",
              "images_per_s": "throughput", "fields": "AAF field size, mean over classes"}
    ylabels = {"ce": "loss", "projection": "loss", "total": "loss", "lr": "learning rate",
               "images_per_s": "images / s", "fields": "k (pixels)"}
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11.5, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(titles[panel])
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabels[panel])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axis = dict(zip(panels, axes.flat))
    for i, (name, records) in enumerate(runs):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        steps = np.array([r["step"] for r in records])
        terms = list(dict.fromkeys(k for r in records for k in r["loss"]))
        for term in terms:
            values = np.array([r["loss"].get(term, math.nan) for r in records], dtype=float)
            panel = term if term in ("ce", "total") else "projection"
            several = len([t for t in terms if t not in ("ce", "total")]) > 1  # GAN: gan and disc
            label = f"{name}: {term}" if panel == "projection" and several else name
            axis[panel].plot(steps, values, color=colour, label=label, lw=1.5,
                             ls="--" if term == "disc" else "-")
        for key in ("lr", "images_per_s"):
            values = np.array([r.get(key, math.nan) for r in records], dtype=float)
            axis[key].plot(steps, values, color=colour, label=name, lw=1.5)
        if with_aaf and any("kernel_sizes" in r for r in records):
            kept = [r for r in records if "kernel_sizes" in r]
            fsteps = [r["step"] for r in kept]
            axis["fields"].plot(fsteps, [np.mean(r["kernel_sizes"]["edge"]) for r in kept], color=colour,
                                label=f"{name}: edge", lw=1.5)
            axis["fields"].plot(fsteps, [np.mean(r["kernel_sizes"]["nonedge"]) for r in kept], color=colour,
                                label=f"{name}: non-edge", lw=1.5, ls="--")
    for panel, ax in axis.items():
        if ax.lines:
            ax.legend(loc="best", frameon=False)
        else:
            ax.text(0.5, 0.5, "no such term in these runs\n(plain cross-entropy)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    fig.suptitle(title or "Training curves (train.py log.jsonl)", fontsize=12)
    fig.tight_layout()
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# 2. Per-class bars: IoU and boundary recall, several methods side by side
# --------------------------------------------------------------------------------------------
METRIC_TITLES = {"iou": "IoU", "instance_iou": "instance-wise IoU", "recall": "boundary recall",
                 "precision": "boundary precision", "f": "boundary F"}


def plot_classes(series: list[Series], out: str | Path, metrics: Sequence[str] = ("iou", "recall"),
                 thin: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One panel per metric: grouped bars (one colour per series, error bars = std over seeds),
    thin classes shaded and starred; the legend gives each series' mean."""
    plt = pyplot()
    class_names = list(series[0][1][0]["class_names"])
    metrics = [m for m in metrics if all(has_metric(results, m) for _, results in series)]
    if not metrics:
        raise SystemExit("plot.py: the inputs have none of the requested metrics (evaluate.py --metric all has all)")
    marked = thin_indices(class_names, thin)
    num_classes, num_series = len(class_names), len(series)
    width = 0.8 / num_series
    x = np.arange(num_classes)
    fig_width = max(8.0, 0.45 * num_classes * max(1.0, num_series / 3) + 2)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(fig_width, 3.1 * len(metrics) + 0.6), squeeze=False,
                             layout="constrained")
    handles = []
    counts = {len(results) for _, results in series}  # seeds per series
    for ax, metric in zip(axes[:, 0], metrics):
        for c in marked:
            ax.axvspan(c - 0.5, c + 0.5, color=THIN_SHADE, zorder=0)
        means, top = [], 0.0
        for i, (label, results) in enumerate(series):
            mean, std = per_class(results, metric)
            means.append(f"{label} {100 * float(np.nanmean(mean)):.1f}" if np.isfinite(mean).any() else f"{label} -")
            top = max(top, float(np.nanmax(100 * (mean + std))) if np.isfinite(mean).any() else 0.0)
            bars = ax.bar(x - 0.4 + width * (i + 0.5), 100 * np.nan_to_num(mean), width,
                          yerr=100 * std if len(results) > 1 else None, capsize=2, error_kw={"lw": 0.8},
                          color=SERIES_COLOURS[i % len(SERIES_COLOURS)], zorder=2)
            if ax is axes[0, 0]:
                seeds = f" ({len(results)} seeds)" if len(results) > 1 and len(counts) > 1 else ""
                handles.append((bars, f"{label}{seeds}"))
        ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
        ax.set_ylim(0, min(100.0, 1.12 * top + 2))
        ax.set_xlim(-0.6, num_classes - 0.4)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{name}*" if c in marked else name for c, name in enumerate(class_names)],
                           rotation=35 if num_classes > 8 else 0, ha="right" if num_classes > 8 else "center")
        for c in marked:
            ax.get_xticklabels()[c].set_fontweight("bold")
        ax.grid(axis="y", alpha=0.3, zorder=1)
        ax.set_title(f"per-class {METRIC_TITLES[metric]}; mean: " + ", ".join(means))
    notes = [f"bars: mean ± std over {max(counts)} seeds"] if max(counts) > 1 else []
    notes += ["* shaded: thin classes"] if marked else []
    fig.suptitle(title or "; ".join([f"Per-class scores, {describe(series[0][1])}"] + notes), fontsize=12)
    fig.legend([h for h, _ in handles], [t for _, t in handles], loc="outside lower center",
               ncol=min(num_series, 4), frameon=False)
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# 3. Learned field size per class (paper Fig. 3)
# --------------------------------------------------------------------------------------------
def load_field_sizes(paths: Sequence[str]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(class names, field sizes k, edge [runs, C], non-edge [runs, C]) from AAF checkpoints or
    from experiments.py results JSONs (their AAF runs carry "kernel_sizes")."""
    import evaluate  # kernel_sizes_of_checkpoint: the Fig. 3 quantity, computed once
    import model as model_lib

    names, sizes, edges, nonedges = None, None, [], []
    for path in paths:
        found = []
        if Path(path).suffix == ".json":
            content = read_json(path)
            results = [r for v in (content.values() if isinstance(content, dict) else [])
                       if isinstance(v, list) for r in v if isinstance(r, dict) and "kernel_sizes" in r]
            if not results:
                raise SystemExit(f"plot.py: {path} has no AAF results with 'kernel_sizes' (experiments.py writes them)")
            found = [(r["class_names"], r["kernel_sizes"]["sizes"], r["kernel_sizes"]["edge"],
                      r["kernel_sizes"]["nonedge"]) for r in results]
        else:
            try:
                _, ckpt = model_lib.load_checkpoint(path)
                edge, nonedge = evaluate.kernel_sizes_of_checkpoint(ckpt)
            except (FileNotFoundError, ValueError) as error:
                raise SystemExit(f"plot.py: {path}: {error}") from None
            meta = ckpt["meta"]
            found = [(meta.get("class_names") or [str(c) for c in range(len(edge))], meta["kernel_sizes"],
                      edge, nonedge)]
        for class_names, ks, edge, nonedge in found:
            if names is not None and (list(class_names) != names or list(ks) != sizes):
                raise SystemExit(f"plot.py: {path} has other classes or field sizes than {paths[0]}")
            names, sizes = list(class_names), list(ks)
            edges.append(np.asarray(edge, float))
            nonedges.append(np.asarray(nonedge, float))
    return names, sizes, np.stack(edges), np.stack(nonedges)


def plot_fields(paths: Sequence[str], out: str | Path, title: str | None = None) -> Path:
    """Bars of sum_k softmax(w)[c, k] * k per class, edge and non-edge term; several runs (seeds)
    give the mean and the std as error bars."""
    plt = pyplot()
    names, sizes, edge, nonedge = load_field_sizes(paths)
    runs = edge.shape[0]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(names) + 2.5), 3.8))
    for i, (term, values) in enumerate((("edge (contour) term", edge), ("non-edge term", nonedge))):
        std = values.std(axis=0, ddof=1) if runs > 1 else None
        ax.bar(x - 0.2 + 0.4 * i, values.mean(axis=0), 0.4, yerr=std, capsize=2, error_kw={"lw": 0.8},
               color=FIELD_COLOURS[i], label=term, zorder=2)
    for k in sizes:
        ax.axhline(k, color="grey", lw=0.8, ls=":", zorder=1)
    ax.set_ylim(min(sizes) - 0.5, max(sizes) + 0.5)
    ax.set_yticks(sizes)
    ax.set_ylabel("learned field size k (pixels)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.legend(loc="upper right", frameon=True, framealpha=0.9, ncol=2)
    seeds = f"mean ± std over {runs} runs" if runs > 1 else "one run"
    ax.set_title(title or f"Learned AAF field size per class, Σ_k w[c,k]·k over k ∈ {sizes} ({seeds}; paper Fig. 3)")
    fig.tight_layout()
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# 4. Confusion matrix, row-normalised
# --------------------------------------------------------------------------------------------
def row_normalised(results: list[dict[str, Any]]) -> tuple[np.ndarray, bool]:
    """Confusion summed over the results, each ground-truth row divided by its pixel count
    `[C, C(+1)]`; the extra "no class" column (predictions outside the classes) is kept only
    when it holds pixels. Rows without pixels are NaN."""
    if not all("confusion" in r for r in results):
        raise SystemExit("plot.py: a result has no 'confusion' (evaluate.py --metric miou or all writes it)")
    total = sum(np.asarray(r["confusion"], dtype=np.float64) for r in results)
    num_classes = total.shape[0]
    extra = total.shape[1] > num_classes and total[:, num_classes:].sum() > 0
    total = total if extra else total[:, :num_classes]
    rows = total.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, total / rows, np.nan), extra


def plot_confusion(series: list[Series], out: str | Path, title: str | None = None) -> Path:
    """One heat map per series: rows ground truth, columns prediction, in % of the row."""
    plt = pyplot()
    class_names = list(series[0][1][0]["class_names"])
    num_classes = len(class_names)
    side = max(4.0, 0.33 * num_classes + 1.6)  # two 11-class panels: about 1400 px wide
    fig, axes = plt.subplots(1, len(series), figsize=(side * len(series) + 1.2, side + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for panel, (ax, (label, results)) in enumerate(zip(axes[0], series)):
        matrix, extra = row_normalised(results)
        image = ax.imshow(100 * matrix, cmap="Blues", vmin=0, vmax=100)
        columns = class_names + (["(none)"] if extra else [])
        ax.set_xticks(np.arange(len(columns)))
        ax.set_xticklabels(columns, rotation=60, ha="right")
        ax.set_yticks(np.arange(num_classes))
        ax.set_yticklabels(class_names if panel == 0 else [])  # the rows are the same classes in every panel
        ax.set_xlabel("prediction")
        if panel == 0:
            ax.set_ylabel("ground truth")
        seeds = f", summed over {len(results)} seeds" if len(results) > 1 else ""
        ax.set_title(f"{label}{seeds}")
        if num_classes <= 12:  # cell labels stay legible up to about 12 classes
            for (i, j), value in np.ndenumerate(100 * matrix):
                if np.isfinite(value) and value >= 0.5:
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if value > 55 else "black")
        ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02, shrink=0.85,
                 label="% of the ground-truth pixels of the row")
    fig.suptitle(title or f"Confusion matrix, row-normalised ({describe(series[0][1])})", fontsize=12)
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# 5. Qualitative grid (paper Figs. 4-5): image | ground truth | each checkpoint's prediction
# --------------------------------------------------------------------------------------------
def predict_samples(ckpt_path: str, dataset, dataset_name: str, indices: Sequence[int], device: str,
                    scales: Sequence[float] | None, flip: bool | None, data_root: str | None = None) -> list[np.ndarray]:
    """Label maps `[H, W]` of the chosen samples, predicted as infer.py / evaluate.py do."""
    import infer
    import torch

    model, _, _, info = infer.load_for_inference(ckpt_path, dataset_name, device, data_root, prog="plot.py")
    scales = tuple(scales or info.eval_scales)
    flip = info.eval_flip if flip is None else flip
    preds = []
    for index in indices:
        image = torch.as_tensor(dataset[index]["image"])
        probs = infer.predict(model, image, info.eval_crop, info.eval_stride, scales=scales, flip=flip)
        preds.append(probs.argmax(dim=0).to(torch.uint8).cpu().numpy())
    return preds


def plot_grid(ckpts: Sequence[str], labels: Sequence[str] | None, dataset_name: str | None, data_root: str | None,
              split: str | None, indices: Sequence[int], out: str | Path, device: str = "cpu",
              scales: Sequence[float] | None = None, flip: bool | None = None, length: int | None = None,
              title: str | None = None) -> Path:
    """Rows: samples; columns: (a) image, (b) ground truth, then one prediction per checkpoint;
    a colour key of the classes below."""
    plt = pyplot()
    import model as model_lib
    from matplotlib.patches import Patch

    names = labels_for(ckpts, labels) or [default_label(Path(c)) for c in ckpts]
    problem = checks.device_problem(device)
    if problem:  # before any checkpoint is read, which would blame the file for a missing GPU
        raise SystemExit(f"plot.py: {problem}")
    if dataset_name is None:
        try:
            _, ckpt = model_lib.load_checkpoint(ckpts[0])
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"plot.py: {error}") from None
        dataset_name = ckpt["meta"].get("dataset")
        if dataset_name is None:
            raise SystemExit(f"plot.py: --dataset is needed ({ckpts[0]} does not name its data set)")
    info = data.dataset_info(dataset_name, data_root)  # folder: classes.txt at the root
    split = split or info.val_split
    try:  # synthetic scenes are drawn when indexed: the split's full length costs nothing
        dataset = data.build_dataset(dataset_name, data_root, split, train=False, length=length)
    except data.DatasetError as error:
        raise SystemExit(f"plot.py: {error}") from None
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise SystemExit(f"plot.py: --indices {bad} outside the {len(dataset)} images of {dataset_name} {split}")
    preds = []
    for ckpt_path in ckpts:
        print(f"plot.py: predicting {len(indices)} {dataset_name} {split} image(s) with {ckpt_path}", file=sys.stderr)
        preds.append(predict_samples(ckpt_path, dataset, dataset_name, indices, device, scales, flip, data_root))
    columns = ["image", "ground truth"] + names
    letters = "abcdefghijklmnopqrstuvwxyz"
    height, width = np.asarray(dataset[indices[0]]["label"]).shape
    cell = 2.2  # inches per panel: five columns make about 1300 px
    fig, axes = plt.subplots(len(indices), len(columns), squeeze=False, layout="constrained",
                             figsize=(cell * len(columns), cell * height / width * len(indices) + 0.9))
    for row, index in enumerate(indices):
        sample = dataset[index]
        rgb = data.denormalize(sample["image"], info)
        panels = [rgb, data.colorize(np.asarray(sample["label"]), info.palette)]
        panels += [data.colorize(p[row], info.palette) for p in preds]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if row == 0:
                ax.set_title(f"({letters[col]}) {columns[col]}")
        axes[row, 0].set_ylabel(sample["name"].replace(f"{dataset_name}_", ""), fontsize=8)
    key = [Patch(color=np.array(c) / 255, label=n) for n, c in zip(info.class_names, info.palette)]
    key.append(Patch(color=np.array(data.VOID_COLOUR) / 255, label="void / ignored"))
    key_rows = math.ceil(len(key) / 10)  # balanced rows of at most 10 entries
    fig.legend(handles=key, loc="outside lower center", ncol=math.ceil(len(key) / key_rows), frameon=False,
               fontsize=9)
    fig.suptitle(title or f"Predictions on {dataset_name} {split} (paper Figs. 4-5)", fontsize=12)
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--out", required=True, help="PNG file to write (folders are created)")
        sub.add_argument("--title", help="figure title (default: says what is shown)")
        return sub

    sub = command("curves", "training curves of one or several runs from train.py's log.jsonl, overlaid")
    sub.add_argument("logs", nargs="+", help="log.jsonl files")
    sub.add_argument("--labels", nargs="+", help="one name per log (default: the run folder's name)")

    sub = command("classes", "per-class IoU and boundary recall bars of one or several results")
    sub.add_argument("results", nargs="+", help="evaluate.py --json files, or experiments.py results/<name>.json")
    sub.add_argument("--labels", nargs="+", help="one name per series (default: file/folder names, or the methods)")
    sub.add_argument("--select", nargs="+", metavar="METHOD",
                     help="methods of an experiments.py JSON to show, in this order (default: all)")
    sub.add_argument("--thin", nargs="+", metavar="CLASS", help="classes to mark as thin structures (default: none)")
    sub.add_argument("--metrics", nargs="+", default=["iou", "recall"], choices=list(METRIC_TITLES),
                     help="one panel each (default: iou recall; recall/precision/f are the boundary metric)")

    sub = command("fields", "learned AAF field size per class (paper Fig. 3)")
    sub.add_argument("inputs", nargs="+",
                     help="AAF checkpoints, or experiments.py results JSONs; several: mean and std over them")

    sub = command("confusion", "row-normalised confusion matrix, one panel per series")
    sub.add_argument("results", nargs="+", help="evaluate.py --json files, or experiments.py results/<name>.json")
    sub.add_argument("--labels", nargs="+", help="one name per series")
    sub.add_argument("--select", nargs="+", metavar="METHOD", help="methods of an experiments.py JSON to show")

    sub = command("grid", "image | ground truth | predictions of several checkpoints (paper Figs. 4-5)")
    sub.add_argument("--ckpt", nargs="+", required=True, help="checkpoints, one column each")
    sub.add_argument("--labels", nargs="+", help="column names (default: the checkpoints' folder names)")
    sub.add_argument("--dataset", help="data set (default: the first checkpoint's)")
    sub.add_argument("--data-root", help="data set folder (not needed for synthetic)")
    sub.add_argument("--split", help="split (default: the data set's validation split)")
    sub.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2], help="samples of the split, one row each "
                                                                              "(default: 0 1 2)")
    sub.add_argument("--scales", type=float, nargs="+", help="test scales (default: the data set's)")
    sub.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                     help="also predict the mirrored image (default: the data set's)")
    sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Empty paths and an --out that cannot be written, before any input is read."""
    inputs = {"curves": ("logs", "a log file"), "classes": ("results", "a results file"),
              "fields": ("inputs", "an input"), "confusion": ("results", "a results file")}
    flags = {"--out": args.out}
    if args.command in inputs:
        dest, what = inputs[args.command]
        flags[what] = getattr(args, dest)
    else:
        flags.update({"--ckpt": args.ckpt, "--dataset": args.dataset, "--data-root": args.data_root,
                      "--split": args.split})
    problems = checks.empty_path_problems(flags)
    if args.out:
        problem = out_problem(args.out)
        if problem:
            problems.append(problem)
    if problems:
        raise SystemExit("plot.py: " + "; ".join(problems))


def main(args: argparse.Namespace) -> Path:
    check_args(args)
    if args.command == "curves":
        return plot_curves(args.logs, args.labels, args.out, args.title)
    if args.command == "classes":
        return plot_classes(load_series(args.results, args.labels, args.select), args.out, args.metrics,
                            args.thin, args.title)
    if args.command == "fields":
        return plot_fields(args.inputs, args.out, args.title)
    if args.command == "confusion":
        return plot_confusion(load_series(args.results, args.labels, args.select), args.out, args.title)
    return plot_grid(args.ckpt, args.labels, args.dataset, args.data_root, args.split, args.indices, args.out,
                     args.device, args.scales, args.flip, title=args.title)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except data.DatasetError as error:  # an unreadable image or label map: one line naming it
        raise SystemExit(f"plot.py: {error}") from None
