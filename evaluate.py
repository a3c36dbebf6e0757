"""Evaluation: the paper's three metrics, exactly (paper section 4, Tables 2-4 and 6-9).

    python evaluate.py --ckpt model.pt --metric all                      # data set from the checkpoint
    python evaluate.py --ckpt model.pt --dataset voc --data-root VOCdevkit --metric boundary
    python evaluate.py --pred-dir preds/ --dataset voc --data-root VOCdevkit --metric all
    python evaluate.py --pred-dir preds/ --dataset cityscapes --data-root cityscapes --metric biou --biou-dilation 0.005
    python evaluate.py --ckpt aaf.pt --metric kernels                    # paper Fig. 3
    python evaluate.py --ckpt ce.pt --metric all --crf                   # + dense CRF (crf.py, Table 6)
    torchrun --nproc_per_node=4 evaluate.py --ckpt model.pt --metric all --amp   # 4 GPUs, bf16 network

Metrics (docs/metrics.md, whose section numbers the comments below cite):
1. mIoU: one confusion matrix summed over the data set, IoU_c = TP / (TP + FP + FN).
2. Instance-wise mIoU (Table 3): per-image IoU of each class weighted by the number of
   ground-truth instances of that class in the image.
3. Boundary precision / recall / F (Tables 4 and 8): the BSDS500 protocol on the boundaries of
   each class's binary masks, with an exact one-to-one maximum matching within a radius of
   0.75% of the image diagonal (boundary.py).
4. Boundary IoU (Cheng et al., CVPR 2021; not in the paper, `--metric biou`): per class, the IoU
   of the ground-truth and predicted masks' inner bands of width d (boundary.py).

Predictions come from infer.predict (sliding window, scales, flip; docs/protocol.md §7) or from saved label
PNGs (`--pred-dir`), so that the outputs of any method can be scored the same way. Under torchrun
each process predicts and scores images rank, rank + N, ...; the raw counts are summed and rank 0
prints and writes the same results file as one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

import boundary
import checkpoint
import checks
import crf
import data
import distributed
import infer

METRICS = ("miou", "instance", "boundary", "biou")
# Errors of the input (files, flags, data): one line, never a traceback (also from a torchrun rank).
INPUT_ERRORS = (FileNotFoundError, ValueError, data.DatasetError)

# Cityscapes classes that have instance ids (docs/metrics.md §2): the 8 "thing" train ids. Caravan and
# trailer also carry instances but map to void (255), so they never count.
CITYSCAPES_THING_NAMES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_INSTANCE_OFFSET = 1000  # instanceIds value = labelId * 1000 + k for single objects


# --------------------------------------------------------------------------------------------
# 1. mIoU (docs/metrics.md §1, paper Tables 2, 6, 9)
# --------------------------------------------------------------------------------------------
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts `[C, C]`, rows ground truth, columns prediction (np.int64).

    Pixels whose ground truth is outside [0, C) (void, 255) are skipped. A prediction outside
    [0, C) at a valid pixel (255 in a saved PNG, say) is a miss of the true class and a false
    positive of no class; a [C, C] matrix has no cell for that, so when (and only when) such
    pixels exist the result gets one extra column, `[C, C + 1]`, whose last column counts them.
    `miou` and `pixel_accuracy` read both shapes.
    """
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    gt = np.asarray(gt).astype(np.int64, copy=False).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in size: {pred.size} vs {gt.size}")
    valid = (gt >= 0) & (gt < num_classes)
    pred, gt = pred[valid], gt[valid]
    invalid_pred = (pred < 0) | (pred >= num_classes)
    has_miss = bool(invalid_pred.any())
    width = num_classes + 1 if has_miss else num_classes
    pred = np.where(invalid_pred, num_classes, pred)  # column C = "no valid class"
    counts = np.bincount(gt * width + pred, minlength=num_classes * width)
    return counts.reshape(num_classes, width)


def add_confusion(total: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Accumulate a [C, C] or [C, C + 1] matrix into a [C, C + 1] running total (in place)."""
    total[:, :conf.shape[1]] += conf
    return total


def miou(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU `[C]` and its mean, from a `[C, C]` (or `[C, C + 1]`) confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class that occurs neither in the ground truth nor in the
    prediction has 0 / 0: its IoU is NaN and it is left out of the mean (as Cityscapes does);
    a class that is only predicted gets IoU 0 and counts. The mean is NaN if no class occurs.
    """
    conf = np.asarray(conf, dtype=np.float64)
    num_classes = conf.shape[0]
    tp = np.diag(conf[:, :num_classes])
    fn = conf.sum(axis=1) - tp  # includes misses in the extra "no valid class" column
    fp = conf[:, :num_classes].sum(axis=0) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return iou, nanmean(iou)


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correct pixels / valid pixels (paper Table 9, "pix. acc"); NaN without valid pixels."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf[:, :conf.shape[0]]) / total) if total > 0 else math.nan


def nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


# --------------------------------------------------------------------------------------------
# 2. Instance-wise mIoU (docs/metrics.md §2, paper Tables 3 and 7)
# --------------------------------------------------------------------------------------------
def count_instances_voc(gt: np.ndarray, instances: np.ndarray, num_classes: int) -> np.ndarray:
    """VOC convention: every distinct instance id except 255 is one instance of the majority
    ground-truth class of its pixels (void pixels do not vote; ids with only void pixels are
    skipped; ties go to the lower class id). Id 0 is the background region: one background
    instance. Returns n `[C]` (np.int64)."""
    gt = gt.ravel().astype(np.int64)
    instances = instances.ravel().astype(np.int64)
    keep = (instances != 255) & (gt >= 0) & (gt < num_classes)
    ids, inverse = np.unique(instances[keep], return_inverse=True)
    if ids.size == 0:
        return np.zeros(num_classes, np.int64)
    votes = np.bincount(inverse * num_classes + gt[keep], minlength=ids.size * num_classes)
    majority = votes.reshape(ids.size, num_classes).argmax(axis=1)  # [ids]; every id has votes
    return np.bincount(majority, minlength=num_classes).astype(np.int64)


def count_instances_cityscapes(gt: np.ndarray, instances: np.ndarray, num_classes: int) -> np.ndarray:
    """Cityscapes convention on `*_gtFine_instanceIds.png` (labelId * 1000 + k for objects).

    The 8 thing classes count their distinct values (a value < 1000 of a thing class is a group
    region such as "cargroup": one instance); stuff classes count 1 when present in `gt`
    (train ids); values mapping to void (255) never count.
    """
    n = np.zeros(num_classes, np.int64)
    things = set(cityscapes_thing_train_ids())
    for c in range(num_classes):
        if c not in things and np.any(gt == c):
            n[c] = 1
    for value in np.unique(instances).tolist():
        label_id = value // CITYSCAPES_INSTANCE_OFFSET if value >= CITYSCAPES_INSTANCE_OFFSET else value
        train_id = data.CITYSCAPES_LABEL_TO_TRAIN.get(label_id, data.IGNORE_INDEX)  # unknown ids: void
        if train_id in things:
            n[train_id] += 1
    return n


@functools.lru_cache(maxsize=1)
def cityscapes_thing_train_ids() -> tuple[int, ...]:
    """Train ids of the Cityscapes thing classes, looked up by name in data.py's class list."""
    names = list(data.dataset_info("cityscapes").class_names)
    return tuple(names.index(name) for name in CITYSCAPES_THING_NAMES)


def count_instances(gt: np.ndarray, instances: np.ndarray | None, num_classes: int,
                    dataset: str) -> np.ndarray:
    """n_{c,x}: ground-truth instances per class in one image (docs/metrics.md §2)."""
    if instances is None:  # no instance annotation (CamVid, GTA5): a present class is one instance
        present = np.bincount(gt[(gt >= 0) & (gt < num_classes)].ravel().astype(np.int64),
                              minlength=num_classes)
        return (present > 0).astype(np.int64)
    if dataset == "cityscapes":
        return count_instances_cityscapes(gt, instances, num_classes)
    return count_instances_voc(gt, instances, num_classes)  # VOC and synthetic


def instance_iou_stats(pred: np.ndarray, gt: np.ndarray, instances: np.ndarray | None,
                       num_classes: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One image's share of U_c = sum_x n_{c,x} IoU_{c,x} / sum_x n_{c,x} (paper section 4.2).

    Returns (iou_weighted_sum [C] float64 = n_{c,x} * IoU_{c,x}, n_instances [C] int64).
    IoU_{c,x} uses this image's TP/FP/FN only (void pixels skipped, out-of-range predictions
    are misses, as in `confusion_matrix`). A class that is only predicted has n = 0 and so
    does not count, however wrong the prediction.
    """
    conf = confusion_matrix(pred, gt, num_classes)
    iou, _ = miou(conf)
    n = count_instances(np.asarray(gt), None if instances is None else np.asarray(instances),
                        num_classes, dataset)
    iou = np.nan_to_num(iou, nan=0.0)  # 0/0 only where n is 0 too
    return iou * n, n


def instance_miou(iou_weighted_sum: np.ndarray, n_instances: np.ndarray) -> tuple[np.ndarray, float]:
    """U_c `[C]` (NaN for classes without any instance in the data set) and their mean."""
    n = np.asarray(n_instances, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(n > 0, np.asarray(iou_weighted_sum, np.float64) / n, np.nan)
    return per_class, nanmean(per_class)


# --------------------------------------------------------------------------------------------
# 3. Boundary precision / recall (docs/metrics.md §3, paper Tables 4 and 8)
# --------------------------------------------------------------------------------------------
# In boundary.py (seg2bdry, thinning, the exact matcher, BoundaryPool); the counts are summed here.


# --------------------------------------------------------------------------------------------
# 4. Scoring a data set
# --------------------------------------------------------------------------------------------
def score_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], num_classes: int,
                dataset_name: str, metrics: Sequence[str] = ("miou",), max_dist: float = boundary.DEFAULT_MAX_DIST,
                workers: int = 0, total: int | None = None, progress: bool = True,
                biou_dilation: float = boundary.DEFAULT_BIOU_DILATION) -> dict[str, np.ndarray]:
    """Accumulate the raw counts of the requested metrics over (pred, gt, instances) triples.

    Returns {"confusion": [C, C + 1], "instance_sum": [C], "instance_count": [C],
    "boundary": [C, 4], "biou": [C, 2], "num_images": int} (only the requested entries). The
    boundary metrics run in `workers` processes (boundary.BoundaryPool).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {METRICS}")
    confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    inst_sum = np.zeros(num_classes, dtype=np.float64)
    inst_count = np.zeros(num_classes, dtype=np.int64)
    pool = None
    if "boundary" in metrics or "biou" in metrics:
        pool = boundary.BoundaryPool(num_classes, max_dist if "boundary" in metrics else None, workers,
                                     biou_dilation if "biou" in metrics else None)
    start = last_print = time.perf_counter()
    done = 0
    try:
        for pred, gt, instances in pairs:
            if pred.shape != gt.shape:
                raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
            if "miou" in metrics:
                add_confusion(confusion, confusion_matrix(pred, gt, num_classes))
            if "instance" in metrics:
                weighted, count = instance_iou_stats(pred, gt, instances, num_classes, dataset_name)
                inst_sum += weighted
                inst_count += count
            if pool is not None:
                pool.add(pred, gt)
            done += 1
            now = time.perf_counter()
            if progress and (now - last_print > 2.0 or done == total):
                print(infer.progress_line(done, total or done, start), file=sys.stderr, flush=True)
                last_print = now
        counts = pool.totals() if pool is not None else {}
    finally:
        if pool is not None:
            pool.close()
    raw: dict[str, Any] = {"num_images": done}
    if "miou" in metrics:
        raw["confusion"] = confusion
    if "instance" in metrics:
        raw["instance_sum"], raw["instance_count"] = inst_sum, inst_count
    raw.update(counts)  # "boundary" [C, 4], "biou" [C, 2]
    return raw


def summarize(raw: dict[str, Any], class_names: Sequence[str], dataset_name: str,
              settings: dict[str, Any]) -> dict[str, Any]:
    """Results dict: per-class lists (fractions in [0, 1], NaN for absent classes) and means."""
    results: dict[str, Any] = {"dataset": dataset_name, "num_images": raw["num_images"],
                               "class_names": list(class_names), "settings": settings}
    if "confusion" in raw:
        per_class, mean = miou(raw["confusion"])
        results["iou"] = per_class.tolist()
        results["miou"] = mean
        results["pixel_acc"] = pixel_accuracy(raw["confusion"])
        results["confusion"] = raw["confusion"].tolist()
    if "instance_sum" in raw:
        per_class, mean = instance_miou(raw["instance_sum"], raw["instance_count"])
        results["instance_iou"] = per_class.tolist()
        results["instance_miou"] = mean
        results["instance_count"] = raw["instance_count"].tolist()
    if "boundary" in raw:
        recall, precision, f = boundary.boundary_prf(raw["boundary"])
        results["boundary"] = {
            "recall": recall.tolist(), "precision": precision.tolist(), "f": f.tolist(),
            "mean_recall": nanmean(recall), "mean_precision": nanmean(precision), "mean_f": nanmean(f),
            "counts": raw["boundary"].tolist(),  # per class: cntR, sumR, cntP, sumP
        }
    if "biou" in raw:  # Boundary IoU (docs/metrics.md §4): NaN for a class in no band anywhere
        per_class, mean = boundary.biou(raw["biou"])
        results["biou"] = {"iou": per_class.tolist(), "mean_iou": mean,
                           "counts": raw["biou"].tolist()}  # per class: intersection, union
    return results


def compact_labels(labels: Any) -> np.ndarray:
    """A label map as uint8 when its values fit (8x less to send to the boundary workers, and
    faster per-class masks), else int64."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8:
        return labels
    if labels.size and 0 <= labels.min() and labels.max() <= 255:
        return labels.astype(np.uint8)
    return labels.astype(np.int64)


def sample_arrays(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """(gt [H, W], instances [H, W] int64 or None) of a data set sample."""
    instances = sample.get("instance")
    return compact_labels(sample["label"]), (None if instances is None else np.asarray(instances).astype(np.int64))


def save_prediction(save_dir: str | os.PathLike, name: str, pred: np.ndarray, palette) -> None:
    """Write `<save_dir>/<name>.png` as a palette PNG (the format --pred-dir reads back)."""
    path = Path(save_dir) / f"{name}.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.save_label_png(path, pred.astype(np.uint8), palette)
    except OSError as error:  # a full disk, no permission: one line, not a traceback from the scoring loop
        raise SystemExit(f"evaluate.py: --save-pred cannot write {path} ({error.strerror or error}); the evaluation "
                         f"stopped at that image, before any score") from None


def evaluate_model(model: torch.nn.Module, dataset, dataset_name: str, metrics: Sequence[str] = ("miou",),
                   crop_size: int | None = None, stride: int | None = None, scales: Sequence[float] = (1.0,),
                   flip: bool = False, max_dist: float = boundary.DEFAULT_MAX_DIST, device: str | torch.device = "cpu",
                   workers: int = 0, save_pred: str | os.PathLike | None = None,
                   progress: bool = True, crf_params: crf.CRFParams | None = None,
                   window_batch: int | None = None, amp: bool = False,
                   biou_dilation: float = boundary.DEFAULT_BIOU_DILATION,
                   dist: distributed.Dist = distributed.Dist()) -> dict[str, Any]:
    """Predict every image of `dataset` (full images, train=False) and score the predictions.

    crop_size / stride default (None) to the data set's evaluation window (data.DatasetInfo.eval_crop,
    eval_stride). `workers` processes compute the boundary metric while the model predicts.
    `crf_params`: refine each image's probabilities with the dense CRF (crf.py) before the argmax.
    `window_batch`, `amp`: see infer.predict. Under torchrun (`dist`) each rank predicts its share
    (distributed.shard) and the counts are summed over the ranks, so every rank returns the
    results of the whole data set; a rank that fails stops every rank (distributed.JobFailed).
    Returns the `summarize` dict: "iou"/"miou"/"pixel_acc", "instance_iou"/"instance_miou",
    "boundary" {"recall", "precision", "f", "mean_*"} for the requested metrics, and "timing":
    seconds per image of the network (all windows, scales, flips; per process) and of the CRF.
    """
    info = getattr(dataset, "info", None) or data.dataset_info(dataset_name)  # a folder set carries its own
    crop_size, stride = infer.resolve_window(crop_size, stride, info)
    window_batch = infer.default_window_batch(device) if window_batch is None else window_batch
    model = model.to(device)
    seconds = {"network": 0.0, "crf": 0.0}
    share = distributed.shard(len(dataset), dist)

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for index in share:
            sample = dataset[index]
            gt, instances = sample_arrays(sample)
            image = torch.as_tensor(sample["image"]).to(device)
            start = time.perf_counter()
            try:
                probs = infer.predict(model, image, crop_size, stride, scales=scales, flip=flip,
                                      window_batch=window_batch, amp=amp)  # [C, H, W] float32
            except torch.OutOfMemoryError:  # one line naming --window-batch, not the allocator's page
                problem = infer.out_of_memory(sample["name"], window_batch, amp, device)
                raise SystemExit(f"evaluate.py: {problem}") from None
            if probs.is_cuda:
                torch.cuda.synchronize(probs.device)  # the network's time, not the CRF's
            seconds["network"] += time.perf_counter() - start
            if crf_params is not None:  # Table 6 baseline: dense CRF on the image's own RGB
                start = time.perf_counter()
                probs = crf.refine(probs, data.denormalize(image, info), crf_params)  # RGB [H, W, 3] uint8
                seconds["crf"] += time.perf_counter() - start
            pred = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()  # [H, W]
            if save_pred is not None:
                save_prediction(save_pred, sample["name"], pred, info.palette)
            yield pred, gt, instances

    with distributed.FailTogether(dist, INPUT_ERRORS):
        raw = score_pairs(pairs(), info.num_classes, dataset_name, metrics, max_dist, workers,
                          total=len(share), progress=progress and dist.is_main,
                          biou_dilation=biou_dilation)
    totals = distributed.sum_counts({"raw": raw, "seconds": seconds}, dist)
    raw, seconds = totals["raw"], totals["seconds"]
    settings = {"crop_size": crop_size, "stride": stride, "scales": list(scales), "flip": flip, "amp": amp,
                "max_dist": max_dist, "crf": None if crf_params is None else dataclasses.asdict(crf_params)}
    if "biou" in metrics:
        settings["biou_dilation"] = biou_dilation
    results = summarize(raw, info.class_names, dataset_name, settings)
    count = max(raw["num_images"], 1)
    results["timing"] = {"network_s_per_image": seconds["network"] / count,
                         "crf_s_per_image": seconds["crf"] / count if crf_params is not None else None}
    return results


PRED_FORMATS = ("auto",) + infer.OUTPUT_FORMATS
# Cityscapes label ids of void classes that a 19-class prediction never holds but a map of train
# ids nearly always does (1 sidewalk, 2 building, ..., 6 traffic light).
_CITYSCAPES_VOID_LOW_IDS = (1, 2, 3, 4, 5, 6)


def detect_pred_format(pred_dir: Path, first_name: str, dataset_name: str) -> str:
    """The layout of infer.py --format that `pred_dir` holds: voc when it has the VOC server's
    results folder, palette when `<pred_dir>/<first sample>.png` exists, else cityscapes for
    Cityscapes (label ids somewhere below, found as cityscapesScripts finds them)."""
    if (pred_dir / infer.VOC_RESULTS_DIR).is_dir():
        return "voc"
    if (pred_dir / f"{first_name}.png").is_file() or dataset_name != "cityscapes":
        return "palette"
    return "cityscapes"


def cityscapes_prediction_index(pred_dir: Path) -> dict[str, list[Path]]:
    """Every PNG below `pred_dir` under its `<city>_<seq>_<frame>` prefix: cityscapesScripts'
    matching (`<city>_<seq>_<frame>*.png`, searched recursively; more than one match is an error),
    the same for Cityscapes' fixed-width numbers."""
    index: dict[str, list[Path]] = {}
    for path in sorted(pred_dir.rglob("*.png")):
        index.setdefault("_".join(path.stem.split("_")[:3]), []).append(path)
    return index


def prediction_reader(pred_dir: str | os.PathLike, dataset, dataset_name: str, info: data.DatasetInfo,
                      pred_format: str = "auto", progress: bool = True
                      ) -> tuple[str, Callable[[str], tuple[Path, np.ndarray]]]:
    """(the layout, read(name) -> (file, class ids [H, W])) of the predictions in `pred_dir`
    (see evaluate_predictions); a folder that is missing or does not suit the data set is a
    FileNotFoundError or ValueError naming it."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred-dir {pred_dir} is not a folder")
    if pred_format not in PRED_FORMATS:
        raise ValueError(f"unknown prediction format {pred_format!r}; choose from {', '.join(PRED_FORMATS)}")
    if pred_format == "auto":
        first = dataset[0]["name"] if len(dataset) else ""
        pred_format = detect_pred_format(pred_dir, first, dataset_name)
    if pred_format == "cityscapes" and dataset_name != "cityscapes":
        raise ValueError(f"--pred-format cityscapes holds Cityscapes label ids; the data set is {dataset_name}")
    folder = pred_dir / infer.VOC_RESULTS_DIR if pred_format == "voc" else pred_dir
    by_prefix = cityscapes_prediction_index(pred_dir) if pred_format == "cityscapes" else {}
    if progress:
        print(f"evaluate.py: reading {pred_format} predictions from {folder}", file=sys.stderr)
    warned = False

    def read(name: str) -> tuple[Path, np.ndarray]:
        nonlocal warned
        if pred_format != "cityscapes":
            path = folder / f"{name}.png"
            if not path.is_file():
                raise FileNotFoundError(f"no prediction for {name}: {path} is missing")
            pred = compact_labels(data.read_label(path))
            # Class ids 0..C-1, or 255 for "no prediction" (a miss). Any other value is another
            # encoding (e.g. Cityscapes label ids), which would be scored as misses without a word.
            odd = (pred >= info.num_classes) & (pred != data.IGNORE_INDEX) | (pred < 0)
            if odd.any():
                raise ValueError(f"{path} holds the value {int(pred[odd].flat[0])}, neither a class id of "
                                 f"{dataset_name} (0..{info.num_classes - 1}) nor 255 (no prediction)"
                                 + ("; are these Cityscapes label ids? then pass --pred-format cityscapes"
                                    if dataset_name == "cityscapes" else ""))
            return path, pred
        found = by_prefix.get(name, [])
        if not found:
            raise FileNotFoundError(f"no prediction for {name}: no {name}*.png under {pred_dir}")
        if len(found) > 1:  # cityscapesScripts stops here too
            raise ValueError(f"{len(found)} predictions for {name} under {pred_dir} ({found[0]}, {found[1]}); "
                             f"cityscapes layout: exactly one <city>_<seq>_<frame>*.png per image")
        path = found[0]
        label_ids = data.read_label(path)
        if not warned and np.isin(label_ids, _CITYSCAPES_VOID_LOW_IDS).any():
            print(f"evaluate.py: warning: {path} holds label ids 1..6 (void classes a 19-class model never "
                  f"predicts): are these train ids? infer.py --format cityscapes writes label ids", file=sys.stderr)
            warned = True
        return path, data.decode_label(label_ids, data.LABEL_CODECS["cityscapes"], path)  # -> train ids

    return pred_format, read


def evaluate_predictions(pred_dir: str | os.PathLike, dataset, dataset_name: str,
                         metrics: Sequence[str] = ("miou",), max_dist: float = boundary.DEFAULT_MAX_DIST,
                         workers: int = 0, progress: bool = True, pred_format: str = "auto",
                         biou_dilation: float = boundary.DEFAULT_BIOU_DILATION,
                         dist: distributed.Dist = distributed.Dist()) -> dict[str, Any]:
    """Score saved label PNGs in one of infer.py's layouts (`pred_format`, see infer.py):
    palette `<pred_dir>/<name>.png` and voc `<pred_dir>/results/VOC2012/Segmentation/comp6_test_cls/
    <name>.png` hold class ids; cityscapes `<pred_dir>/**/<name>*.png` holds Cityscapes label ids,
    mapped to train ids with the official table (the other label ids become 255, a miss of the
    true class as in cityscapesScripts). "auto" picks the layout with `detect_pred_format`. Under
    torchrun (`dist`) each rank scores its share and the counts are summed, as in evaluate_model."""
    info = getattr(dataset, "info", None) or data.dataset_info(dataset_name)  # a folder set carries its own
    share = distributed.shard(len(dataset), dist)
    progress = progress and dist.is_main

    def pairs(read: Callable[[str], tuple[Path, np.ndarray]]
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for index in share:
            sample = dataset[index]
            path, pred = read(sample["name"])
            gt, instances = sample_arrays(sample)
            if pred.shape != gt.shape:
                raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels but the ground truth "
                                 f"of {sample['name']} is {gt.shape[1]}x{gt.shape[0]} (width x height)")
            yield pred, gt, instances

    with distributed.FailTogether(dist, INPUT_ERRORS):
        pred_format, read = prediction_reader(pred_dir, dataset, dataset_name, info, pred_format, progress)
        raw = score_pairs(pairs(read), info.num_classes, dataset_name, metrics, max_dist, workers,
                          total=len(share), progress=progress, biou_dilation=biou_dilation)
    raw = distributed.sum_counts(raw, dist)
    settings = {"pred_dir": str(Path(pred_dir)), "pred_format": pred_format, "max_dist": max_dist}
    if "biou" in metrics:
        settings["biou_dilation"] = biou_dilation
    return summarize(raw, info.class_names, dataset_name, settings)


# --------------------------------------------------------------------------------------------
# 5. Reports: tables like the paper's, JSON, learned field sizes (Fig. 3)
# --------------------------------------------------------------------------------------------
def format_table(class_names: Sequence[str], rows: Sequence[tuple[str, Sequence[float], float]],
                 fmt: Callable[[float], str], mean_label: str = "mean") -> str:
    """One column per class plus the mean, one row per measurement (paper Tables 2-4, 6-9)."""
    headers = [str(name) for name in class_names] + [mean_label]
    cells = [[fmt(v) for v in values] + [fmt(mean)] for _, values, mean in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    label_width = max(len("metric"), *(len(label) for label, _, _ in rows))
    lines = ["  ".join([f"{'metric':<{label_width}}"] + [f"{h:>{w}}" for h, w in zip(headers, widths)])]
    for (label, _, _), row in zip(rows, cells):
        lines.append("  ".join([f"{label:<{label_width}}"] + [f"{c:>{w}}" for c, w in zip(row, widths)]))
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _fraction(value: float) -> str:  # the paper prints boundary recall as .527
    return "-" if value is None or math.isnan(value) else f"{value:.3f}".lstrip("0") if value < 1 else f"{value:.3f}"


def format_results(results: dict[str, Any]) -> str:
    """Tables of the computed metrics; '-' marks a class that never occurs (NaN)."""
    names = results["class_names"]
    parts = [f"{results['dataset']}: {results['num_images']} images, settings {results['settings']}"]
    if "iou" in results:
        parts.append("mIoU (%), paper Tables 2, 6, 9\n" + format_table(
            names, [("IoU", results["iou"], results["miou"])], _percent, "mIoU"))
        parts.append(f"pixel accuracy: {_percent(results['pixel_acc'])} %")
    if "instance_iou" in results:
        counting = f"; counting: {results['instance_counting']}" if "instance_counting" in results else ""
        parts.append(f"instance-wise mIoU (%), paper Tables 3, 7{counting}\n" + format_table(
            names, [("inst. IoU", results["instance_iou"], results["instance_miou"])], _percent,
            "instance mIoU"))
    titles, rows = [], []  # the boundary metrics share one table: P/R/F rows, then Boundary IoU
    if "boundary" in results:
        b = results["boundary"]
        titles.append(f"boundary (max_dist {results['settings'].get('max_dist')}), paper Tables 4, 8")
        rows += [("recall", b["recall"], b["mean_recall"]), ("precision", b["precision"], b["mean_precision"]),
                 ("F", b["f"], b["mean_f"])]
    if "biou" in results:
        titles.append(f"Boundary IoU (band {results['settings'].get('biou_dilation')} of the diagonal; "
                      f"Cheng et al. 2021, not in the paper)")
        rows.append(("Boundary IoU", results["biou"]["iou"], results["biou"]["mean_iou"]))
    if rows:
        parts.append("; ".join(titles) + "\n" + format_table(names, rows, _fraction, "mean"))
    timing = results.get("timing")
    if timing:
        crf_s = timing.get("crf_s_per_image")
        parts.append(f"seconds per image: network {timing['network_s_per_image']:.3f}"
                     + ("" if crf_s is None else f", dense CRF {crf_s:.3f} (paper Table 6: 'additional 40 seconds')"))
    return "\n\n".join(parts)


def kernel_sizes_of_checkpoint(ckpt: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Paper Fig. 3: learned field size per class, sum_k softmax(logits)[c, k] * k, for the
    (edge, non-edge) terms of an AAF checkpoint (`ckpt["aaf"]` = AdaptiveAffinityFieldLoss
    state dict)."""
    import losses  # only this report needs the loss module

    if not ckpt.get("aaf"):
        raise ValueError("this checkpoint has no AAF weights (ckpt['aaf'] is empty): train with the AAF loss")
    meta = ckpt["meta"]
    aaf = losses.AdaptiveAffinityFieldLoss(meta["num_classes"], kernel_sizes=tuple(meta["kernel_sizes"]))
    aaf.load_state_dict(ckpt["aaf"], strict=True)
    with torch.no_grad():
        edge, nonedge = aaf.kernel_size_per_class()
    return edge.cpu().numpy(), nonedge.cpu().numpy()


# --------------------------------------------------------------------------------------------
# 6. Command line
# --------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint of train.py to predict with (no default: give --ckpt or --pred-dir)")
    parser.add_argument("--pred-dir", help="score saved label PNGs <pred-dir>/<name>.png instead of a model "
                                           "(no default: give --ckpt or --pred-dir)")
    parser.add_argument("--pred-format", default="auto", choices=PRED_FORMATS,
                        help="layout of --pred-dir, as infer.py --format writes it: palette (<name>.png, class "
                             "ids), voc (results/VOC2012/Segmentation/comp6_test_cls/<name>.png), cityscapes "
                             "(<city>/<name>*.png, label ids); default auto: voc if that folder exists, palette "
                             "if <name>.png does, else cityscapes for Cityscapes")
    parser.add_argument("--dataset", help=f"{', '.join(data.DATASET_NAMES)} (default: the checkpoint's; needed with "
                                          f"--pred-dir; folder: your own data at --data-root, window "
                                          f"{data.FOLDER_DEFAULTS.eval_crop} stride {data.FOLDER_DEFAULTS.eval_stride})")
    parser.add_argument("--data-root", help="data set folder (default: none; not needed for synthetic)")
    parser.add_argument("--split", help=f"split to score (default: the data set's validation split: "
                                        f"{data.per_dataset_text('val_split')})")
    parser.add_argument("--metric", default="miou", choices=["miou", "instance", "boundary", "biou", "all", "kernels"],
                        help="mIoU, instance-wise mIoU, boundary P/R/F, Boundary IoU (Cheng et al. 2021; not in the "
                             "paper), all four, or the learned AAF field sizes of --ckpt (paper Fig. 3) (default: miou)")
    parser.add_argument("--scales", type=float, nargs="+",
                        help=f"test scales (default: the data set's: {data.per_dataset_text('eval_scales')})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help=f"also predict the mirrored image (default: the data set's: {data.per_dataset_text('eval_flip')})")
    parser.add_argument("--crop-size", type=int,
                        help=f"sliding-window size in pixels, >= 1 (default: the data set's: {data.per_dataset_text('eval_crop')})")
    parser.add_argument("--stride", type=int,
                        help=f"sliding-window stride in pixels, 1..crop size (default: the data set's: "
                             f"{data.per_dataset_text('eval_stride')})")
    parser.add_argument("--max-dist", type=float, default=boundary.DEFAULT_MAX_DIST,
                        help=f"boundary tolerance as a fraction of the image diagonal, in [0, 1) "
                             f"(default: {boundary.DEFAULT_MAX_DIST}, the BSDS value)")
    parser.add_argument("--biou-dilation", type=float, default=boundary.DEFAULT_BIOU_DILATION,
                        help=f"Boundary IoU band width d as a fraction of the image diagonal, in (0, 1), rounded to "
                             f"whole pixels, at least 1 (default: {boundary.DEFAULT_BIOU_DILATION}, the authors' "
                             f"default; they use 0.005 for Cityscapes' 2048x1024 images)")
    parser.add_argument("--save-pred", help="also write the predicted label PNGs to this folder (default: none)")
    parser.add_argument("--workers", type=int,
                        help=f"processes for the boundary metrics (P/R/F, Boundary IoU), 0: in the main process "
                             f"(default: the usable cores shared among the torchrun processes of this machine, here "
                             f"{default_workers()} per process)")
    parser.add_argument("--length", type=int, help="score only the first N images, N >= 1 (default: the whole split; "
                                                   "for synthetic, the split's size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when a GPU is visible, else cpu; here "
                             f"{'cuda' if torch.cuda.is_available() else 'cpu'}; under torchrun each process "
                             f"takes the GPU of its LOCAL_RANK)")
    infer.add_speed_args(parser)
    parser.add_argument("--json", help="where to write the results (default: beside the checkpoint "
                                       "or in --pred-dir, eval_<dataset>_<split>_<metric>.json; "
                                       "..._<metric>_crf.json with --crf)")
    crf.add_crf_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot mean anything (one line naming each), before any work.
    0 is never read as "use the default": a flag left out is None."""
    problems = checks.empty_path_problems({"--ckpt": args.ckpt, "--pred-dir": args.pred_dir, "--data-root": args.data_root,
                                    "--json": args.json, "--save-pred": args.save_pred, "--dataset": args.dataset,
                                    "--split": args.split})
    for flag, value, folder in (("--json", args.json, False), ("--save-pred", args.save_pred, True)):
        problem = checks.output_path_problem(value, flag, folder) if value else None
        if problem:
            problems.append(problem)
    if not (math.isfinite(args.max_dist) and 0 <= args.max_dist < 1):
        problems.append(f"--max-dist {args.max_dist} must be a fraction of the image diagonal in [0, 1) "
                        f"(default {boundary.DEFAULT_MAX_DIST})")
    if not (math.isfinite(args.biou_dilation) and 0 < args.biou_dilation < 1):
        problems.append(f"--biou-dilation {args.biou_dilation} must be a fraction of the image diagonal in (0, 1) "
                        f"(default {boundary.DEFAULT_BIOU_DILATION})")
    if args.workers is not None and args.workers < 0:
        problems.append(f"--workers {args.workers} must be >= 0 (0 computes the boundary metric in this process)")
    if args.length is not None and args.length < 1:
        problems.append(f"--length {args.length} must be >= 1 (leave it out for the whole split)")
    for flag, value in (("--crop-size", args.crop_size), ("--stride", args.stride)):
        if value is not None and value < 1:
            problems.append(f"{flag} {value} must be >= 1 pixel (leave it out for the data set's window)")
    if args.scales is not None and not all(math.isfinite(s) and s > 0 for s in args.scales):
        problems.append(f"--scales {args.scales} must be positive numbers")
    problems += crf.arg_problems(args) + infer.speed_problems(args)
    if args.crf and args.pred_dir is not None:
        problems.append("--crf refines a model's probabilities: it needs --ckpt, not --pred-dir (label PNGs)")
    if args.ckpt is not None and args.pred_format != "auto":
        problems.append(f"--pred-format {args.pred_format} describes a --pred-dir folder; with --ckpt the model "
                        "predicts (write a layout with infer.py --format)")
    if args.pred_dir is not None:  # prediction settings would be silently ignored on saved PNGs
        given = [flag for flag, value in (("--scales", args.scales), ("--flip", args.flip),
                                          ("--crop-size", args.crop_size), ("--stride", args.stride),
                                          ("--save-pred", args.save_pred), ("--window-batch", args.window_batch),
                                          ("--amp", args.amp or None)) if value is not None]
        if given:
            problems.append(f"{', '.join(given)} set how a model predicts; --pred-dir scores saved label PNGs "
                            "as they are: drop them, or predict with --ckpt")
    if problems:
        raise SystemExit("evaluate.py: " + "; ".join(problems))


def default_workers() -> int:
    """--workers when it is not given: the usable cores, shared among the processes of this machine."""
    return max(checks.usable_cpus() // distributed.processes_on_this_machine(), 1)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as `args` say; returns the results dict (on every torchrun rank).

    Under torchrun each process scores its share of the images (distributed.shard) and the counts
    are summed; rank 0 alone prints and writes the JSON, the same file as one process writes. A
    failure on any rank stops every rank (distributed.FailTogether): rank 0 prints its line, a
    bug keeps its traceback on the rank that met it, and a rank that was killed is a one-line
    'lost contact' on the others.
    """
    check_args(args)  # the same flags on every rank: every rank stops alike, before any process group
    if args.metric == "kernels":
        return print_kernels(args)
    if (args.ckpt is None) == (args.pred_dir is None):
        raise SystemExit("evaluate.py: give exactly one of --ckpt (predict with a model) and --pred-dir "
                         "(score saved PNGs)")
    problem = checks.device_problem(args.device) if args.ckpt is not None else None
    if problem:
        raise SystemExit(f"evaluate.py: {problem}")
    # Saved PNGs need no GPU: their ranks talk over gloo.
    dist, device = distributed.setup_distributed(args.device if args.ckpt is not None else "cpu", "evaluate.py")
    try:
        return evaluate_job(args, dist, device)
    except distributed.JobFailed as failed:
        if dist.is_main:
            print(failed.report("evaluate.py"), file=sys.stderr, flush=True)
        # torchrun stops the other processes once one exits with an error: rank 0's line goes first.
        distributed.wait_for_each_other(dist)
        if failed.own is not None and not isinstance(failed.own, (SystemExit,) + INPUT_ERRORS):
            raise failed.own from None  # a bug: the traceback of the rank that met it
        raise SystemExit(1) from None
    except RuntimeError as error:
        if not distributed.is_lost_peer(error, dist):
            raise
        raise SystemExit(f"evaluate.py: rank {dist.rank}: lost contact with another process of the job (it "
                         f"crashed or was killed; see its own message)") from None
    finally:
        try:
            distributed.cleanup_distributed()
        except RuntimeError:  # the process group may be broken already
            pass


def evaluate_job(args: argparse.Namespace, dist: distributed.Dist, device: torch.device) -> dict[str, Any]:
    """main's work on one rank: set up (every rank alike, failing together), score this rank's
    share, and on rank 0 print and write the results of the whole data set."""
    with distributed.FailTogether(dist, INPUT_ERRORS):
        model, ckpt, dataset_name, info = None, None, args.dataset, None
        if args.ckpt is not None:
            model, ckpt, dataset_name, info = infer.load_for_inference(args.ckpt, args.dataset, str(device),
                                                                       args.data_root, prog="evaluate.py")
            infer.resolve_window(args.crop_size, args.stride, info)  # a bad window, before any image
        elif args.dataset is None:
            raise SystemExit("evaluate.py: --dataset is needed with --pred-dir")
        else:
            info = data.dataset_info(dataset_name, args.data_root)
        split = args.split or info.val_split
        dataset = data.build_dataset(dataset_name, args.data_root, split, train=False, length=args.length)
        json_path = results_path(args, dataset_name, split)
        check_outputs(args, json_path, dataset, dataset_name, split)
    metrics = METRICS if args.metric == "all" else (args.metric,)
    workers = default_workers() if args.workers is None else args.workers
    if dist.enabled and dist.is_main:
        print(f"evaluate.py: {dist.world_size} processes, images rank, rank + {dist.world_size}, ...: "
              f"the progress below is rank 0's share ({len(distributed.shard(len(dataset), dist))} of "
              f"{len(dataset)} images)", file=sys.stderr)
    if model is not None:
        scales = tuple(args.scales or info.eval_scales)
        flip = info.eval_flip if args.flip is None else args.flip
        trained_on = ckpt["meta"].get("dataset")
        if trained_on and trained_on != dataset_name and dist.is_main:
            print(f"cross-domain: a {trained_on} model on {dataset_name} (paper Table 9)", file=sys.stderr)
        results = evaluate_model(model, dataset, dataset_name, metrics, args.crop_size, args.stride, scales,
                                 flip, args.max_dist, device, workers, args.save_pred,
                                 crf_params=crf.params_from_args(args, dataset_name),
                                 window_batch=args.window_batch, amp=args.amp, biou_dilation=args.biou_dilation,
                                 dist=dist)
        results["checkpoint"] = str(args.ckpt)
    else:
        results = evaluate_predictions(args.pred_dir, dataset, dataset_name, metrics, args.max_dist, workers,
                                       pred_format=args.pred_format, biou_dilation=args.biou_dilation, dist=dist)
    results["split"] = split
    if "instance_miou" in results:  # n_{c,x} from instance maps, or one per present class without them
        results["instance_counting"] = "instance maps" if dataset.has_instances else "one instance per present class (no instance maps)"
    if not dist.is_main:
        return results
    print(format_results(results))
    try:
        checkpoint.write_json(results, json_path)
    except OSError as error:  # checkpoint.WriteError, e.g. a full disk: the file of that name is left as it was
        raise SystemExit(f"evaluate.py: {error}; the results are printed above") from None
    print(f"\nresults written to {json_path}")
    return results


def results_path(args: argparse.Namespace, dataset_name: str, split: str) -> Path:
    """--json, or eval_<dataset>_<split>_<metric>[_crf].json beside the checkpoint / in --pred-dir."""
    if args.json is not None:
        return Path(args.json)
    if args.ckpt is not None:
        crf_tag = "_crf" if args.crf else ""  # a CRF run does not overwrite the plain run's file
        return Path(args.ckpt).parent / f"eval_{dataset_name}_{split}_{args.metric}{crf_tag}.json"
    return Path(args.pred_dir) / f"eval_{dataset_name}_{split}_{args.metric}.json"


def check_outputs(args: argparse.Namespace, json_path: Path, dataset, dataset_name: str, split: str) -> None:
    """Before any image is scored: the results file can be written, and neither it nor --save-pred
    would overwrite the checkpoint or a file of the data set (--save-pred <root>/labels/val would
    replace the ground truth with the predictions, which then score 100%)."""
    records = getattr(dataset, "records", ())  # file data sets; synthetic scenes have no files
    protected = {path.resolve(): path for record in records
                 for path in (record.image, record.label, record.instance) if path is not None}
    flag = "--json" if args.json is not None else "the results file"
    problem = checks.output_path_problem(json_path, flag, False)
    if problem is None and args.ckpt is not None and json_path.resolve() == Path(args.ckpt).resolve():
        problem = f"{flag} {json_path} is the checkpoint --ckpt; choose another file"
    if problem is None and json_path.resolve() in protected:
        problem = f"{flag} {json_path} is a file of the {dataset_name} {split} split; choose another file"
    if problem is None and args.save_pred is not None:
        for record in records:
            target = Path(args.save_pred) / f"{record.name}.png"
            if target.resolve() in protected:
                problem = (f"--save-pred {args.save_pred} would overwrite {protected[target.resolve()]}, a file of "
                           f"the {dataset_name} {split} split; write the predictions to a folder of their own")
                break
    if problem:
        raise SystemExit(f"evaluate.py: {problem}")


def print_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """`--metric kernels`: the learned edge / non-edge field size per class (paper Fig. 3)."""
    if args.ckpt is None:
        raise SystemExit("evaluate.py: --metric kernels needs --ckpt (an AAF checkpoint)")
    import model as model_lib  # checkpoint loading (one-line errors for missing or corrupt files)

    try:
        _, ckpt = model_lib.load_checkpoint(args.ckpt)
    except (FileNotFoundError, ValueError) as error:  # the message names the file
        raise SystemExit(f"evaluate.py: {error}") from None
    try:
        edge, nonedge = kernel_sizes_of_checkpoint(ckpt)
    except ValueError as error:
        raise SystemExit(f"evaluate.py: {args.ckpt}: {error}") from None
    names = ckpt["meta"].get("class_names") or [str(c) for c in range(len(edge))]
    print(f"learned affinity field size per class, sum_k w[c,k] * k over k in {list(ckpt['meta']['kernel_sizes'])}"
          " (paper Fig. 3)")
    print(format_table(names, [("edge", edge, float(edge.mean())), ("non-edge", nonedge, float(nonedge.mean()))],
                       lambda v: f"{v:.2f}"))
    return {"class_names": list(names), "edge": edge.tolist(), "nonedge": nonedge.tolist()}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError, data.DatasetError) as error:  # bad path or file: one line
        raise SystemExit(f"evaluate.py: {error}") from None
