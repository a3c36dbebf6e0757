"""Tests for train.py (issue 4): schedules, every loss, minimax ascent, NaN stop, exact resume, torchrun.

CPU only: the tiny backbone on the synthetic data set, 48-pixel crops, a few iterations. Expected
numbers are worked out by hand in the comments, never read back from train.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import distributed
import finite
import losses
import runfolder
import train
from model import load_checkpoint

REPO = Path(__file__).resolve().parent


def run_args(out: Path, *extra: str) -> list[str]:
    """A tiny synthetic run: 48-px crops, batch 2, no final evaluation."""
    return ["--dataset", "synthetic", "--crop-size", "48", "--batch-size", "2", "--iters", "4",
            "--log-every", "1", "--no-eval", "--out", str(out), *extra]


def train_main(*argv: str) -> dict:
    return train.main(train.get_args_parser().parse_args(list(argv)))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def one_batch(crop: int = 48, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = data.build_dataset("synthetic", None, "train", train=True, crop_size=crop, seed=0)
    dataset.set_epoch(0)
    samples = [dataset[i] for i in range(batch)]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def build_for_steps(*argv: str) -> tuple[train.Parts, object]:
    """train.py's own parts for calling train_step directly on a fixed batch."""
    args, info = train.resolve_args(train.get_args_parser().parse_args(list(argv)))
    torch.manual_seed(0)
    return train.build_parts(args, info, torch.device("cpu"), distributed.Dist()), args


# ----------------------------------------------------------------------------- schedules

def test_poly_lr_hand_values():
    assert train.poly_lr(1e-3, 0, 100) == pytest.approx(1e-3, rel=1e-12)
    # (1 - 50/100)^0.9 = 0.5^0.9 = 0.535886731268146...
    assert train.poly_lr(1e-3, 50, 100) == pytest.approx(5.35886731268146e-4, rel=1e-12)
    # (1 - 99/100)^0.9 = 0.01^0.9 = 10^-1.8 = 0.0158489319246111...
    assert train.poly_lr(1e-2, 99, 100) == pytest.approx(1.58489319246111e-4, rel=1e-12)
    # power 1 is linear: 0.1 * (1 - 3/4)
    assert train.poly_lr(0.1, 3, 4, power=1.0) == pytest.approx(0.025, rel=1e-12)


def test_affinity_decay_hand_values():
    assert train.affinity_decay(0, 30000) == 1.0
    assert train.affinity_decay(30000, 30000) == pytest.approx(0.1, rel=1e-12)
    assert train.affinity_decay(15000, 30000) == pytest.approx(0.316227766016838, rel=1e-12)  # 10^-0.5
    assert train.affinity_decay(3000, 30000) == pytest.approx(0.794328234724281, rel=1e-12)   # 10^-0.1


def test_step_sets_the_learning_rates_of_every_group():
    parts, args = build_for_steps("--crop-size", "48", "--batch-size", "2", "--iters", "100", "--lr", "1e-3",
                                  "--loss", "aaf")
    images, labels = one_batch()
    train.train_step(parts, images, labels, 50, args)
    # step 50 of 100: 1e-3 * 0.5^0.9 = 5.35886731268146e-4; the head 10x; the AAF weights 1x.
    lrs = {group["name"]: group["lr"] for group in parts.optimizer.param_groups}
    assert lrs["backbone/decay"] == pytest.approx(5.35886731268146e-4, rel=1e-9)
    assert lrs["head/decay"] == pytest.approx(5.35886731268146e-3, rel=1e-9)
    decay = {group["name"]: group["weight_decay"] for group in parts.optimizer.param_groups}
    assert decay["backbone/no_decay"] == 0.0 and decay["backbone/decay"] == 5e-4
    (aaf_group,) = parts.projection_optimizer.param_groups
    assert aaf_group["lr"] == pytest.approx(5.35886731268146e-4, rel=1e-9)
    assert aaf_group["maximize"] and aaf_group["momentum"] == 0.9 and aaf_group["weight_decay"] == 0


# ----------------------------------------------------------------------------- arguments

def test_dataset_defaults_and_invariants():
    args, _ = train.resolve_args(train.get_args_parser().parse_args(["--dataset", "voc", "--loss", "aaf"]))
    # docs/protocol.md §6 / paper: VOC crop 336, batch 8, lr 1e-3, 30k iterations, lambda 1, sizes {3, 5}, m = 3.
    assert (args.crop_size, args.batch_size, args.lr, args.iters) == (336, 8, 1e-3, 30000)
    assert (args.loss_lambda, args.kernel_sizes, args.margin, args.decay) == (1.0, [3, 5], 3.0, True)
    assert args.backbone == "resnet101" and args.out == "runs/voc_aaf"
    args, _ = train.resolve_args(train.get_args_parser().parse_args(["--dataset", "cityscapes", "--loss", "affinity"]))
    assert (args.crop_size, args.iters, args.loss_lambda, args.kernel_sizes) == (720, 90000, 0.6, [3])
    args, _ = train.resolve_args(train.get_args_parser().parse_args(["--dataset", "voc", "--loss", "gan"]))
    assert args.loss_lambda == 0.01
    args, _ = train.resolve_args(train.get_args_parser().parse_args(
        ["--dataset", "voc", "--finetune", "--init", "runs/voc_aaf/model.pt"]))
    assert (args.train_split, args.lr, args.iters, args.pretrained) == ("train", 1e-4, 30000, "none")
    with pytest.raises(SystemExit, match="multiple of the output stride 8"):
        train.resolve_args(train.get_args_parser().parse_args(["--crop-size", "50"]))
    with pytest.raises(SystemExit, match="odd"):
        train.resolve_args(train.get_args_parser().parse_args(["--kernel-sizes", "3", "4"]))


# ----------------------------------------------------------------------------- every loss runs

@pytest.mark.parametrize("loss", train.LOSSES)
def test_every_loss_trains_and_writes_a_loadable_checkpoint(tmp_path, loss):
    result = train_main(*run_args(tmp_path, "--loss", loss, "--iters", "3"))
    assert result["step"] == 3
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected_terms = {"ce", "total"} | ({loss} if loss != "ce" else set()) | ({"disc"} if loss == "gan" else set())
    for record in records:
        assert set(record["loss"]) == expected_terms
        assert all(math.isfinite(v) for v in record["loss"].values())
        assert record["loss"]["ce"] > 0
    # load_checkpoint reads with weights_only=True: only plain types may be inside.
    _, ckpt = load_checkpoint(tmp_path / "model.pt", num_classes=8)
    assert ckpt["step"] == 3 and ckpt["meta"]["loss"] == loss and ckpt["meta"]["dataset"] == "synthetic"
    assert ckpt["meta"]["class_names"][0] == "background" and ckpt["args"]["crop_size"] == 48
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert (ckpt["aaf"] is not None) == (loss == "aaf") and (ckpt["disc"] is not None) == (loss == "gan")
    if loss == "aaf":
        assert len(records[-1]["kernel_sizes"]["edge"]) == 8  # one field size per class, each log line


# ----------------------------------------------------------------------------- learning

def test_overfitting_one_batch_drives_the_loss_down():
    parts, args = build_for_steps("--crop-size", "48", "--batch-size", "2", "--iters", "10000", "--loss", "aaf")
    images, labels = one_batch()
    values = [train.train_step(parts, images, labels, step, args) for step in range(20)]
    totals, ces = [v["total"] for v in values], [v["ce"] for v in values]
    assert totals[-1] < 0.5 * totals[0], totals
    assert ces[-1] < 0.5 * ces[0], ces


def test_aaf_weights_ascend_their_loss_while_the_network_is_frozen():
    parts, args = build_for_steps("--crop-size", "48", "--batch-size", "2", "--iters", "10000", "--lr", "1.0",
                                  "--loss", "aaf", "--no-decay")
    # An untrained classifier predicts nearly uniform classes: every KL is ~0, each field size
    # gives the same loss and the weights get no gradient. Random classifier weights of std 1
    # give confident, spatially varying predictions, so the sizes' losses differ.
    with torch.no_grad():
        torch.manual_seed(1)
        parts.model.classifier.weight.normal_(0.0, 1.0)
    parts.model.requires_grad_(False)
    images, labels = one_batch()
    before = {k: v.clone() for k, v in parts.model.state_dict().items() if v.is_floating_point()}
    values = [train.train_step(parts, images, labels, step, args)["aaf"] for step in range(5)]
    # The first call sees uniform weights; each later one sees the weights after more ascent steps.
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0] + 1e-3, values
    for name, param in parts.model.named_parameters():
        assert torch.equal(param, before[name]), name  # only the AAF weights moved
    edge, _ = parts.projection.kernel_size_per_class()
    assert not torch.allclose(edge, torch.full_like(edge, 5.0))  # sizes (3, 5, 7) start at mean 5


# ----------------------------------------------------------------------------- failure and resume

def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_unary = losses.unary_loss
    calls = {"n": 0}

    def blows_up_at_step_5(logits, labels, ignore_index=255):
        calls["n"] += 1
        loss = real_unary(logits, labels, ignore_index)
        return loss * float("nan") if calls["n"] == 6 else loss  # 0-based step 5

    monkeypatch.setattr(losses, "unary_loss", blows_up_at_step_5)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, "--loss", "affinity", "--iters", "8", "--save-every", "2"))
    message = str(stop.value)
    # Iteration 5 (0-based) makes step 6, as log.jsonl and checkpoints count steps.
    assert "non-finite loss at step 6" in message and "ce=nan" in message and "affinity=" in message
    assert str(tmp_path / "last.pt") in message
    assert not (tmp_path / "model.pt").exists()
    _, ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_resume_after_a_kill_ends_with_identical_weights(tmp_path):
    # 6 training samples, batch 2: 3 batches per epoch, so the run crosses epochs and the kill
    # lands mid-epoch (last.pt at step 4 = epoch 1, batch 1; step 5's work is lost as in a kill).
    common = ("--loss", "aaf", "--iters", "8", "--save-every", "2", "--train-length", "6")
    train_main(*run_args(tmp_path / "whole", *common))
    killed = train_main(*run_args(tmp_path / "split", *common, "--stop-after", "5"))
    assert killed["checkpoint"] is None and not (tmp_path / "split" / "model.pt").exists()
    with pytest.raises(SystemExit, match="lr"):  # a changed trajectory setting is refused
        train_main(*run_args(tmp_path / "split", *common, "--lr", "0.5",
                             "--resume", str(tmp_path / "split" / "last.pt")))
    # The resumed part loads with a worker process: augmentation depends on (seed, epoch, index) only.
    train_main(*run_args(tmp_path / "split", *common, "--workers", "1",
                         "--resume", str(tmp_path / "split" / "last.pt")))
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert whole["step"] == split["step"] == 8
    for key in ("model", "aaf"):
        assert whole[key].keys() == split[key].keys()
        for name in whole[key]:
            assert torch.equal(whole[key][name], split[key][name]), f"{key}.{name}"
    for key in ("optimizer", "aaf_optimizer"):
        for index, state in whole[key]["state"].items():
            assert torch.equal(state["momentum_buffer"], split[key]["state"][index]["momentum_buffer"])
    # The killed run logged steps 1-5; the resumed one dropped step 5's record (past last.pt's
    # step 4) and redid it: each step is logged once, and the records equal the whole run's.
    split_log, whole_log = read_log(tmp_path / "split"), read_log(tmp_path / "whole")
    assert [r["step"] for r in split_log] == [1, 2, 3, 4, 5, 6, 7, 8]
    for a, b in zip(split_log, whole_log):
        assert a["loss"] == b["loss"] and a["kernel_sizes"] == b["kernel_sizes"], a["step"]


def test_init_carries_network_and_aaf_weights_into_a_fresh_schedule(tmp_path):
    train_main(*run_args(tmp_path / "stage1", "--loss", "aaf", "--iters", "3"))
    ckpt = torch.load(tmp_path / "stage1" / "model.pt", weights_only=True)
    assert ckpt["aaf"]["edge_logits"].abs().max() > 0  # stage 1 moved the AAF weights
    train_main(*run_args(tmp_path / "stage2", "--loss", "aaf", "--iters", "2", "--lr", "1e-4",
                         "--init", str(tmp_path / "stage1" / "model.pt")))
    assert [r["step"] for r in read_log(tmp_path / "stage2")] == [1, 2]  # not from the checkpoint's step 3
    args, info = train.resolve_args(train.get_args_parser().parse_args(
        run_args(tmp_path / "stage2", "--loss", "aaf", "--init", str(tmp_path / "stage1" / "model.pt"))))
    parts = train.build_parts(args, info, torch.device("cpu"), distributed.Dist(), init=ckpt)
    for name, value in parts.model_without_ddp.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    for name, value in parts.projection.state_dict().items():
        assert torch.equal(value, ckpt["aaf"][name]), name
    assert parts.optimizer.state_dict()["state"] == {}  # momentum starts afresh


# ----------------------------------------------------------------------------- torchrun

# With --accum-steps 2 (2 micro-batches of 2 per process): DDP all-reduces in the last one's backward.
@pytest.mark.parametrize("extra", [(), ("--batch-size", "8", "--accum-steps", "2")])
def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path, extra):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *run_args(out, "--loss", "aaf", "--iters", "3", "--batch-size", "4",
                                                 "--dump-rank-state", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("step 3/3") == 1  # rank 0 alone logs
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The AAF weights did move (different data per rank would have split them without the all_reduce).
    assert rank0["projection.edge_logits"].abs().max() > 0
    saved = torch.load(out / "model.pt", weights_only=True)
    for name, value in saved["model"].items():
        if f"model.{name}" in rank0:
            assert torch.equal(value, rank0[f"model.{name}"]), name


# ----------------------------------------------------------------------------- TensorBoard

def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_repeats_the_log_and_shows_validation_predictions(tmp_path, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    import infer

    monkeypatch.setitem(data.SYNTHETIC_LENGTHS, "val", 2)  # a 2-image validation split
    out = tmp_path / "run"
    train_main("--dataset", "synthetic", "--crop-size", "48", "--batch-size", "2", "--iters", "3", "--log-every", "1",
               "--loss", "aaf", "--out", str(out), "--tensorboard")
    events = read_events(out / "tensorboard")
    log = read_log(out)
    records = [r for r in log if "step" in r]
    assert [r["step"] for r in records] == [1, 2, 3]

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for term in ("ce", "aaf", "total"):
        assert series(f"loss/{term}") == [(r["step"], pytest.approx(r["loss"][term], rel=1e-6)) for r in records]
    for key in ("lr", "images_per_s"):
        assert series(key) == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]
    names = data.dataset_info("synthetic").class_names
    for term in ("edge", "nonedge"):
        for c, name in enumerate(names):
            assert series(f"aaf_field_{term}/{name}") == \
                [(r["step"], pytest.approx(r["kernel_sizes"][term][c], rel=1e-6)) for r in records]
    miou = [r["miou"] for r in log if "eval" in r]
    assert series("val/miou") == [(3, pytest.approx(miou[0], rel=1e-6))]
    # One strip per validation image: image | ground truth | prediction of the final model.
    tags = sorted(events.Tags()["images"])
    assert tags == ["val_image_gt_prediction/synthetic_val_000000", "val_image_gt_prediction/synthetic_val_000001"]
    net, _ = load_checkpoint(out / "model.pt")
    info = data.dataset_info("synthetic")
    val = data.build_dataset("synthetic", None, "val", train=False, length=2)
    for tag, sample in zip(tags, (val[0], val[1])):
        strip = np.array(Image.open(io.BytesIO(events.Images(tag)[0].encoded_image_string)))
        height, width = sample["label"].shape
        assert strip.shape == (height, 3 * width + 4, 3) and events.Images(tag)[0].step == 3
        pred = infer.predict(net, sample["image"], info.eval_crop, info.eval_stride).argmax(0).numpy()
        np.testing.assert_array_equal(strip[:, :width], data.denormalize(sample["image"], info))
        np.testing.assert_array_equal(strip[:, width + 2:2 * width + 2], data.colorize(sample["label"].numpy(), info.palette))
        np.testing.assert_array_equal(strip[:, 2 * width + 4:], data.colorize(pred, info.palette))


def test_tensorboard_after_resume_holds_each_step_once(tmp_path):
    out = tmp_path / "run"
    common = ["--crop-size", "48", "--batch-size", "2", "--iters", "4", "--log-every", "1", "--loss", "ce",
              "--no-eval", "--out", str(out), "--tensorboard", "--save-every", "2"]
    train_main(*common, "--stop-after", "3")  # killed after logging step 3; last.pt is at step 2
    train_main(*common, "--resume", str(out / "last.pt"))  # logs step 3 again, then 4
    lr = [(e.step, e.value) for e in read_events(out / "tensorboard").Scalars("lr")]
    assert [step for step, _ in lr] == [1, 2, 3, 4]
    assert lr[-1][1] == pytest.approx(train.poly_lr(data.dataset_info("synthetic").lr, 3, 4), rel=1e-6)


def test_overwrite_also_clears_the_old_runs_tensorboard_events(tmp_path):
    out = tmp_path / "run"
    common = ["--crop-size", "48", "--batch-size", "2", "--log-every", "1", "--loss", "ce", "--no-eval",
              "--out", str(out), "--tensorboard"]
    train_main(*common, "--iters", "4")
    (out / "eval_synthetic_val_miou.json").write_text("{}")     # evaluate.py's result of the old model
    train_main(*common, "--iters", "2", "--overwrite")       # a new, shorter run in the same folder
    assert [e.step for e in read_events(out / "tensorboard").Scalars("lr")] == [1, 2]
    assert not (out / "eval_synthetic_val_miou.json").exists()


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        train_main(*run_args(tmp_path / "run"), "--tensorboard")

# ----------------------------------------------------------------------------- issue 13: nothing lost, nothing silently wrong

def all_finite(ckpt: dict) -> list[str]:
    """Names of the non-finite tensors anywhere in a checkpoint dict (empty when all are finite)."""
    bad = []

    def walk(obj, where):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not torch.isfinite(obj).all():
                bad.append(where)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")
    walk(ckpt, "ckpt")
    return bad


def test_overflowing_batchnorm_statistics_stop_training_and_are_never_saved(tmp_path):
    # A huge learning rate makes activations overflow: BatchNorm's running variance becomes +inf
    # while the loss, computed on batch statistics, stays finite (the issue's --lr 50 / --lr 5 runs).
    # Synthetic crops 48, batch 2, lr 5000: running_var overflows at step 3 (seen: steps 3-5).
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, "--iters", "30", "--lr", "5000", "--save-every", "1", "--log-every", "30"))
    message = str(stop.value)
    assert "\n" not in message
    assert "non-finite BatchNorm statistics at step" in message and "running_var" in message, message
    bad_step = int(message.split("at step ")[1].split()[0])
    assert not (tmp_path / "model.pt").exists()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == bad_step - 1, message  # the state just before the bad iteration
    assert all_finite(ckpt) == []                 # weights, BN statistics, momentum, AAF weights
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (step {bad_step - 1})" in message


def test_non_finite_gradients_from_a_finite_loss_stop_at_their_step(tmp_path, monkeypatch):
    real_build = train.build_parts
    state = {"calls": 0}

    def build_with_a_bad_gradient(*args, **kwargs):
        parts = real_build(*args, **kwargs)

        def poison(grad):  # the classifier bias of iteration 3 (0-based) gets an infinite gradient
            state["calls"] += 1
            return grad.clone().fill_(float("inf")) if state["calls"] == 4 else grad
        parts.model_without_ddp.classifier.bias.register_hook(poison)
        return parts

    monkeypatch.setattr(train, "build_parts", build_with_a_bad_gradient)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, "--loss", "ce", "--iters", "8", "--save-every", "1", "--log-every", "8"))
    message = str(stop.value)
    assert message.startswith("train.py: non-finite gradients at step 4 from a finite loss (ce="), message
    assert "also non-finite: parameters, optimizer state" in message  # the SGD step spread it
    assert "model.classifier.bias" in message
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and all_finite(ckpt) == []


def test_non_finite_weights_after_a_finite_step_stop_before_any_checkpoint(tmp_path, monkeypatch):
    # Loss and gradients of iteration 0 are finite, the weights after its SGD step are not (what an
    # overflowing update does). Today's main writes them to last.pt at step 1 and stops one step later.
    real_build = train.build_parts

    def build_with_an_overflowing_step(*args, **kwargs):
        parts = real_build(*args, **kwargs)
        real_sgd_step = parts.optimizer.step

        def overflowing_step(*a, **k):
            result = real_sgd_step(*a, **k)
            with torch.no_grad():
                parts.model_without_ddp.backbone.conv1.weight[0, 0, 0, 0] = float("inf")
            return result
        parts.optimizer.step = overflowing_step
        return parts

    monkeypatch.setattr(train, "build_parts", build_with_an_overflowing_step)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, "--loss", "ce", "--save-every", "1", "--log-every", "4"))
    message = str(stop.value)
    assert "non-finite parameters at step 1 from a finite loss" in message, message
    assert "model.backbone.conv1.weight" in message and "no checkpoint was written yet" in message
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "nan", "--lr nan must be a finite number"),
    ("--lr", "inf", "--lr inf must be a finite number"),
    ("--lambda", "nan", "--lambda nan must be a finite number"),
    ("--margin", "-inf", "--margin -inf must be a finite number"),
    ("--momentum", "1.5", "--momentum 1.5 must be in [0, 1)"),
    ("--weight-decay", "-1e-4", "--weight-decay -0.0001 must be in [0, inf)"),
    ("--head-lr-mult", "nan", "--head-lr-mult nan must be a finite number"),
    ("--crop-size", "0", "--crop-size 0 must be a positive multiple"),
    ("--train-length", "-1", "--train-length -1 must be >= 1"),
    ("--train-length", "0", "--train-length 0 must be >= 1"),
    ("--iters", "0", "--iters 0 must be >= 1"),
    ("--batch-size", "0", "--batch-size 0 must be >= 1"),
    ("--save-every", "0", "--save-every 0 must be >= 1"),
    ("--log-every", "0", "--log-every 0 must be >= 1"),
    ("--workers", "-1", "--workers -1 must be >= 0"),
    ("--out", "", "--out is empty"),
    ("--lr", "1e38", "--lr 1e+38 x --head-lr-mult 10 overflows float32"),
    ("--seed", "-1", "--seed -1 must be in 0..2**32-1"),
    ("--seed", str(2**64), f"--seed {2**64} must be in 0..2**32-1"),
    ("--compile", "nosuchbackend", "--compile nosuchbackend: unknown torch.compile backend"),
    ("--kernel-sizes", "3 3", "--kernel-sizes [3, 3]: a size is listed twice"),
    ("--kernel-sizes", "3 257", "--kernel-sizes 257 pairs logits 128 apart, beyond the 16x16 logits of a 128-px crop"),
    ("--out", __file__ + "/run", "is a file, so nothing can be created below it"),
])
def test_bad_flag_values_are_one_line_errors_not_defaults(flag, value, expected):
    with pytest.raises(SystemExit) as stop:
        train.resolve_args(train.get_args_parser().parse_args([flag, *value.split(" ")] if flag == "--kernel-sizes"
                                                              else [f"{flag}={value}"]))
    message = str(stop.value)
    assert expected in message and "\n" not in message, message


def test_data_root_needs_a_dataset_and_synthetic_takes_none(tmp_path):
    with pytest.raises(SystemExit, match="--data-root .* given without --dataset"):
        train.resolve_args(train.get_args_parser().parse_args(["--data-root", str(tmp_path)]))
    with pytest.raises(SystemExit, match="synthetic .* takes no --data-root"):
        train.resolve_args(train.get_args_parser().parse_args(["--dataset", "synthetic", "--data-root", str(tmp_path)]))
    args, _ = train.resolve_args(train.get_args_parser().parse_args([]))
    assert args.dataset == "synthetic" and args.workers == 0  # CPU: data loads in the training process


def test_default_workers_follow_the_cpus_of_each_process(monkeypatch):
    monkeypatch.setattr(data.checks, "usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.default_workers("cuda") == 3    # 16 CPUs / 4 processes, one left to the process itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data.default_workers("cuda") == 15
    monkeypatch.setattr(data.checks, "usable_cpus", lambda: 128)
    assert data.default_workers("cuda") == data.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(data.checks, "usable_cpus", lambda: 1)
    assert data.default_workers("cuda") == 1
    assert data.default_workers("cpu") == 0


def test_resume_refuses_a_changed_amp(tmp_path):
    train_main(*run_args(tmp_path, "--iters", "3", "--save-every", "1", "--stop-after", "1"))
    with pytest.raises(SystemExit, match=r"--amp: True now, False in the checkpoint"):
        train_main(*run_args(tmp_path, "--iters", "3", "--save-every", "1", "--amp",
                             "--resume", str(tmp_path / "last.pt")))


def test_a_rerun_never_destroys_a_run(tmp_path):
    common = ("--loss", "ce", "--iters", "4", "--save-every", "1")
    train_main(*run_args(tmp_path, *common, "--stop-after", "3"))
    before = (tmp_path / "last.pt").read_bytes(), (tmp_path / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, *common))  # the same command again, without --resume
    message = str(stop.value)
    assert "\n" not in message
    assert "last.pt at step 3" in message and "log.jsonl with 3 records" in message, message
    assert f"--resume {tmp_path / 'last.pt'}" in message and "another --out" in message
    assert ((tmp_path / "last.pt").read_bytes(), (tmp_path / "log.jsonl").read_text()) == before
    # An explicit --overwrite starts afresh.
    result = train_main(*run_args(tmp_path, *common, "--overwrite"))
    assert result["step"] == 4 and [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="model.pt at step 4"):  # a finished run is protected too
        train_main(*run_args(tmp_path, *common))


def test_a_second_start_into_a_folder_in_use_is_refused_and_the_lock_goes_with_the_run(tmp_path):
    """Two train.py writing one folder would interleave their logs and checkpoints: while a start
    holds the folder's lock (here: taken by hand, as a running train.py holds it), another is
    refused; the lock ends with its holder and leaves nothing behind."""
    out = tmp_path / "run"
    holder = runfolder.RunLock(out)
    assert holder.refusal is None
    with pytest.raises(SystemExit, match=rf"another train\.py \(pid {os.getpid()}\) is writing into {out}"):
        train_main(*run_args(out, "--loss", "ce", "--iters", "2"))
    assert not (out / "log.jsonl").exists()                       # the refused start wrote nothing
    holder.release()
    assert not out.exists()                                       # the holder created it and left it empty
    train_main(*run_args(out, "--loss", "ce", "--iters", "2"))
    assert (out / "model.pt").exists() and not (out / runfolder.RunLock.NAME).exists()


def test_ctrl_c_and_a_full_disk_end_in_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = train.train_step

    def interrupted(parts, images, labels, step, *rest, **kw):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(parts, images, labels, step, *rest, **kw)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(out, "--loss", "ce", "--iters", "6", "--save-every", "2"))
    assert str(stop.value) == (f"train.py: stopped by Ctrl-C; the last good checkpoint is {out / 'last.pt'} "
                               f"(step 2; continue with --resume {out / 'last.pt'})")
    monkeypatch.setattr(train, "train_step", real_step)

    out = tmp_path / "full"
    real_save, calls = torch.save, []

    def disk_full(obj, f, *a, **kw):  # torch.save's own error when the disk fills mid-write
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 1950592 vs 1950480")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(out, "--loss", "ce", "--iters", "6", "--save-every", "2"))
    message = str(stop.value)
    assert message.startswith(f"train.py: cannot write {out / 'last.pt'}: ") and "\n" not in message, message
    assert f"the last good checkpoint is {out / 'last.pt'} (step 2" in message
    assert load_checkpoint(out / "last.pt")[1]["step"] == 2 and not list(out.glob(".*.tmp"))


def test_resume_refuses_a_training_set_of_another_size(tmp_path):
    from test_folder import make_binary_folder

    root, out = tmp_path / "mydata", tmp_path / "run"
    make_binary_folder(root)                                      # 4 training images
    common = ["--dataset", "folder", "--data-root", str(root), "--loss", "ce", "--backbone", "tiny", "--pretrained",
              "none", "--crop-size", "32", "--batch-size", "2", "--iters", "4", "--save-every", "1", "--no-eval",
              "--out", str(out)]
    train_main(*common, "--stop-after", "1")
    for kind in ("images", "labels"):
        (root / kind / "train" / "train3.png").unlink()
    with pytest.raises(SystemExit, match=r"trained on 4 train images, the data set now has 3"):
        train_main(*common, "--resume", str(out / "last.pt"))


def test_the_saved_model_is_announced_before_a_final_evaluation_that_fails(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise data.DatasetError("val label x.png: label values [7] are outside 0..7")

    monkeypatch.setattr(train, "evaluate_after_training", broken)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="label values"):
        train_main("--dataset", "synthetic", "--crop-size", "48", "--batch-size", "2", "--iters", "2", "--out", str(out))
    assert f"train.py: wrote {out / 'model.pt'} (step 2)" in capsys.readouterr().out


def test_resume_cleans_the_folder_and_args_json_describes_each_start(tmp_path):
    common = ("--loss", "ce", "--iters", "6", "--save-every", "2")
    train_main(*run_args(tmp_path, *common, "--stop-after", "5"))     # last.pt at step 4, log 1..5
    settings = json.loads((tmp_path / "args.json").read_text())
    assert settings["start_step"] == 0 and settings["args"]["crop_size"] == 48
    assert settings["args"]["iters"] == 6 and settings["args"]["workers"] == 0
    # What a kill -9 leaves: a half-written log line and the temporary file of a checkpoint write.
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 6, "iters": 6, "lo')
    (tmp_path / ".last.pt.1a2b3c4d.tmp").write_bytes(b"PK\x03\x04 half a zip")
    train_main(*run_args(tmp_path, *common, "--resume", str(tmp_path / "last.pt")))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]  # step 5 redone, logged once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json", "last.pt", "log.jsonl", "model.pt"]
    settings = json.loads((tmp_path / "args.json").read_text())
    assert settings["start_step"] == 4 and settings["args"]["resume"] == str(tmp_path / "last.pt")
    # Checkpoints get the mode open() gives under the umask (mkstemp's 0600 before).
    umask = os.umask(0)
    os.umask(umask)
    for name in ("last.pt", "model.pt", "log.jsonl", "args.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def count_host_reads(monkeypatch) -> list[str]:
    """Patch every Tensor method that reads device memory back into Python; returns the call log."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(f"{_name} in step {train_state['step']}")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


train_state = {"step": None}


@pytest.mark.parametrize("extra", [(), ("--batch-size", "4", "--accum-steps", "2")])
def test_no_host_read_back_inside_the_training_step(tmp_path, monkeypatch, extra):
    real_step = train.train_step

    def marked_step(parts, images, labels, step, *args, **kwargs):
        train_state["step"] = step
        try:
            return real_step(parts, images, labels, step, *args, **kwargs)
        finally:
            train_state["step"] = None

    monkeypatch.setattr(train, "train_step", marked_step)
    calls = count_host_reads(monkeypatch)
    # 9 iterations, logged (and checked) every 3, no intermediate checkpoint (--save-every 9).
    train_main(*run_args(tmp_path, "--loss", "aaf", "--iters", "9", "--log-every", "3", "--save-every", "9", *extra))
    monkeypatch.undo()
    inside = [c for c in calls if not c.endswith("None")]
    assert inside == [], inside[:5]
    # The reads happen at the 3 log points (finiteness check, averages, AAF field sizes) and at the
    # end, never once per iteration: far fewer than a per-step check would make.
    assert 3 <= len(calls) < 9 * 10, len(calls)
    assert [r["step"] for r in read_log(tmp_path)] == [3, 6, 9]


def test_logged_averages_are_the_means_of_the_step_values(tmp_path, monkeypatch):
    seen = []
    real_step = train.train_step

    def recording_step(*args, **kwargs):
        values = real_step(*args, **kwargs)
        seen.append({k: float(v) for k, v in values.items()})
        return values

    monkeypatch.setattr(train, "train_step", recording_step)
    train_main(*run_args(tmp_path, "--loss", "affinity", "--iters", "5", "--log-every", "3"))
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [3, 5]
    for record, window in zip(records, (seen[0:3], seen[3:5])):
        for key, value in record["loss"].items():
            # float64 sums of the float32 values, as the Python floats of the previous trainer.
            assert value == sum(v[key] for v in window) / len(window), key


def test_one_loader_serves_every_epoch_with_the_crops_of_zero_workers(monkeypatch):
    dataset = data.build_dataset("synthetic", None, "train", train=True, crop_size=32, seed=0, length=6)
    made = []
    real_loader = data.DataLoader

    def counting_loader(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(data, "DataLoader", counting_loader)
    streams = {}
    for workers in (0, 2):
        args = train.resolve_args(train.get_args_parser().parse_args(
            ["--batch-size", "2", "--crop-size", "32", "--workers", str(workers)]))[0]
        batches = data.training_batches(dataset, args, distributed.Dist(), 1, pin_memory=False)
        streams[workers] = [next(batches) for _ in range(7)]  # from step 1: epochs 0, 1, 2, 3
        batches.close()
    assert made == [0, 2]  # one loader per run, not one per epoch
    for a, b in zip(streams[0], streams[2]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # Epochs differ (new permutation and augmentation): batch 1 of epoch 0 vs of epoch 1.
    assert not torch.equal(streams[0][0]["image"], streams[0][3]["image"])


def test_a_corrupt_image_in_a_worker_is_one_line_naming_it(tmp_path):
    from PIL import Image
    import numpy as np
    root = tmp_path / "camvid"
    for folder in ("train", "trainannot", "val", "valannot"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(root / "train" / f"f{i}.png")
        Image.fromarray(np.full((24, 32), i, np.uint8)).save(root / "trainannot" / f"f{i}.png")
    corrupt = root / "train" / "f2.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated PNG
    with pytest.raises(SystemExit) as stop:
        train_main("--dataset", "camvid", "--data-root", str(root), "--crop-size", "16", "--batch-size", "2",
                   "--iters", "4", "--workers", "1", "--loss", "ce", "--backbone", "tiny", "--no-eval",
                   "--out", str(tmp_path / "run"))
    message = str(stop.value)
    assert "\n" not in message and str(corrupt) in message, message


def test_programming_errors_keep_their_traceback(tmp_path, monkeypatch):
    def buggy(*args, **kwargs):
        raise ValueError("a bug, not an input error")

    monkeypatch.setattr(losses, "unary_loss", buggy)
    with pytest.raises(ValueError, match="a bug"):
        train_main(*run_args(tmp_path, "--loss", "ce"))
    monkeypatch.undo()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")  # an input error stays one line
    with pytest.raises(SystemExit, match=r"bad.pt is not a readable checkpoint"):
        train_main(*run_args(tmp_path / "run", "--init", str(tmp_path / "bad.pt")))


def test_missing_imagenet_weights_name_the_flag_and_field_sizes_print_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path / "r18", "--backbone", "resnet18"))
    message = str(stop.value)
    assert "--pretrained <file>" in message and "pretrained=" not in message and "\n" not in message
    capsys.readouterr()
    train_main(*run_args(tmp_path / "aaf", "--iters", "2", "--log-every", "2"))
    assert capsys.readouterr().out.count("AAF field size per class") == 1  # the last log line only


def test_compiled_steps_match_eager_closely():
    # aot_eager: TorchDynamo capture + AOT autograd (the graphs inductor would compile), without
    # code generation, so that the test stays cheap on CPU; FCN + cross-entropy keep the traced
    # graphs small (the projection losses' own compile test is in test_losses.py).
    flags = ("--crop-size", "48", "--batch-size", "2", "--iters", "100", "--loss", "ce", "--arch", "fcn")
    eager, args = build_for_steps(*flags)
    compiled, compiled_args = build_for_steps(*flags, "--compile", "aot_eager")
    assert isinstance(compiled.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled.loss_terms, torch._dynamo.eval_frame.OptimizedModule)
    images, labels = one_batch()
    for step in range(2):
        a = train.train_step(eager, images, labels, step, args)
        b = train.train_step(compiled, images, labels, step, compiled_args)
        for key in a:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-6), (step, key)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    # The checkpoint holds the plain module's names (no torch.compile "_orig_mod." prefix).
    info = data.dataset_info("synthetic")
    keys = runfolder.training_state(compiled, compiled_args, info, 2, torch.device("cpu"), 1)["model"].keys()
    assert keys == eager.model.state_dict().keys()


def test_killing_one_torchrun_rank_leaves_one_line_per_survivor(tmp_path):
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", str(REPO / "train.py"),
               *run_args(tmp_path / "ddp", "--loss", "ce", "--iters", "6", "--batch-size", "4",
                         "--save-every", "2", "--kill-at", "1:3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode != 0
    (rank0_err,) = logs.rglob("0/stderr.log")
    lines = [line for line in rank0_err.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("train.py: rank 0: ") and "last good checkpoint" in lines[0], lines
    assert "step 2" in lines[0]  # last.pt of step 2 is kept; iteration 3 never finished


def test_a_non_finite_value_on_one_rank_stops_every_rank_at_its_step(monkeypatch):
    # Two threads stand in for two torchrun ranks; all_reduce combines their tensors as gloo would
    # (MIN / SUM). Real processes would cost seconds of imports (spawn), and fork deadlocks once
    # OpenMP threads exist in the pytest process.
    import threading
    barrier, slots, local = threading.Barrier(2), {}, threading.local()

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM):
        slots[local.rank] = tensor.clone()
        barrier.wait()
        a, b = slots[0], slots[1]
        result = torch.minimum(a, b) if op == torch.distributed.ReduceOp.MIN else a + b
        barrier.wait()
        tensor.copy_(result)

    monkeypatch.setattr(finite.torch_dist, "all_reduce", all_reduce)
    parts, _ = build_for_steps("--crop-size", "48", "--batch-size", "2", "--loss", "ce")
    answers = {}

    def rank_thread(rank: int) -> None:
        local.rank = rank
        dist = distributed.Dist(rank, 2, rank)
        guard = finite.FiniteGuard(torch.device("cpu"))
        answers[rank] = []
        for step in range(6):
            ce = float("nan") if (rank == 1 and step == 3) else 1.0 + step  # rank 1 alone goes bad
            guard.record(step, {"ce": torch.tensor(ce), "total": torch.tensor(1.0 + step)}, parts)
            if step in (1, 5):  # the check points (log intervals), the same on every rank
                answers[rank].append(guard.check(parts, dist))

    threads = [threading.Thread(target=rank_thread, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers[0][0] is None and answers[1][0] is None   # steps 1-2: fine on both ranks
    # Iteration 3 of rank 1 makes step 4; the values shown are those of the rank(s) that went bad.
    assert answers[0][1] == answers[1][1], answers
    assert answers[0][1].startswith("non-finite loss at step 4: ce=nan total=4"), answers[0][1]


# ----------------------------------------------------------------------------- issue 11: --accum-steps

def strip_batchnorm(module: torch.nn.Module) -> None:
    """Every BatchNorm2d replaced by nn.Identity, in place (BN is the one layer that sees the batch)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.Identity())
        else:
            strip_batchnorm(child)


def batchnorm_free_steps(loss: str, accum: int, steps: int = 3) -> tuple[list[dict], train.Parts]:
    """`steps` iterations of the tiny PSPNet without BatchNorm on one batch of 4 whose first image
    is half ignored, so that the two halves have different valid, edge and pair counts, and whose
    last image is flat, so that their per-element losses differ."""
    parts, args = build_for_steps("--crop-size", "48", "--batch-size", "4", "--iters", "100", "--loss", loss,
                                  "--accum-steps", str(accum))
    strip_batchnorm(parts.model)
    # Confident, spatially varying predictions (an untrained classifier's are nearly uniform, which
    # makes every pixel's loss alike, and per-half means then add up right by chance).
    with torch.no_grad():
        parts.model.classifier.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    images, labels = one_batch(batch=4)
    labels[0, :20] = 255  # rows 0, 8, 16 of the stride-8 picks
    images[3] = 0.0  # a flat image: features nearly constant, so the halves' per-element losses differ
    values = [{k: float(v) for k, v in train.train_step(parts, images, labels, step, args).items()}
              for step in range(steps)]
    return values, parts


@pytest.mark.parametrize("loss", ["ce", "affinity", "aaf", "random", "embedding"])
def test_two_micro_batches_take_the_steps_of_one_batch_without_batchnorm(loss, monkeypatch):
    whole, whole_parts = batchnorm_free_steps(loss, 1)
    split, split_parts = batchnorm_free_steps(loss, 2)
    # The halves' denominators differ, else per-half means would add up right by chance.
    _, labels = one_batch(batch=4)
    labels[0, :20] = 255
    small = losses.downsample_labels(labels, (6, 6))
    first, second = (whole_parts.loss_terms.counts([half]) for half in small.chunk(2))
    for term in first:
        assert not torch.equal(first[term], second[term]), term
    for a, b in zip(whole, split):
        assert b.keys() == a.keys()
        for term in a:  # the micro-batch terms add up to the whole batch's
            assert b[term] == pytest.approx(a[term], rel=1e-5), term
    for (name, p), q in zip(whole_parts.model.named_parameters(), split_parts.model.parameters()):
        # Parameters move by up to ~0.5 in these 3 steps; float32 rounding leaves ~1e-7.
        assert torch.allclose(q, p, rtol=1e-5, atol=1e-6), name
    if loss == "aaf":  # the weights' ascent gradients were accumulated too
        for name, p in whole_parts.projection.named_parameters():
            q = dict(split_parts.projection.named_parameters())[name]
            assert p.abs().max() > 1e-4 and (q - p).abs().max() <= 1e-5 * p.abs().max(), name
    # The usual recipe (each micro-batch's own means, divided by N) is a different step here.
    real_forward = train.LossTerms.forward
    monkeypatch.setattr(train.LossTerms, "counts", lambda self, smalls: None)
    monkeypatch.setattr(train.LossTerms, "forward",
                        lambda self, *a, counts=None: {k: v / 2 for k, v in real_forward(self, *a).items()})
    naive, naive_parts = batchnorm_free_steps(loss, 2, steps=1)
    for term in whole[0]:  # step 0: the same weights, only the denominators differ
        assert naive[0][term] != pytest.approx(whole[0][term], rel=1e-3), term


def test_the_default_step_is_one_batch_in_one_piece():
    # --accum-steps 1, a namespace from before the flag, and the literal recipe of one iteration
    # (forward, CE + lambda * AAF, one backward, both SGD steps) leave bit-identical weights.
    flags = ("--crop-size", "48", "--batch-size", "2", "--iters", "100", "--loss", "aaf")
    images, labels = one_batch()
    results = []
    for variant in ("flag", "old namespace", "literal"):
        parts, args = build_for_steps(*flags)
        for step in range(2):
            if variant == "old namespace":
                old = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "accum_steps"})
                train.train_step(parts, images, labels, step, old)
            elif variant == "flag":
                assert args.accum_steps == 1
                train.train_step(parts, images, labels, step, args)
            else:
                lr = train.poly_lr(args.lr, step, args.iters)
                train.set_lr(parts.optimizer, lr)
                train.set_lr(parts.projection_optimizer, lr)
                logits = parts.model(images)
                small = labels[:, ::8, ::8]
                total = losses.unary_loss(logits, small) \
                    + args.loss_lambda * train.affinity_decay(step, args.iters) * parts.projection(logits, small)
                parts.optimizer.zero_grad()
                parts.projection_optimizer.zero_grad()
                total.backward()
                parts.optimizer.step()
                parts.projection_optimizer.step()
        results.append([p.detach().clone() for p in parts.model.parameters()]
                       + [p.detach().clone() for p in parts.projection.parameters()])
    for a, b, c in zip(*results):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_resume_with_accumulation_ends_with_identical_weights(tmp_path):
    # 12 samples, batch 4 in 2 micro-batches of 2 (PSPNet's BN needs 2): 3 batches per epoch.
    common = ("--loss", "aaf", "--iters", "6", "--save-every", "2", "--train-length", "12", "--batch-size", "4",
              "--accum-steps", "2")
    train_main(*run_args(tmp_path / "whole", *common))
    train_main(*run_args(tmp_path / "split", *common, "--stop-after", "3"))  # last.pt at step 2
    train_main(*run_args(tmp_path / "split", *common, "--resume", str(tmp_path / "split" / "last.pt")))
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert whole["args"]["accum_steps"] == split["args"]["accum_steps"] == 2
    for key in ("model", "aaf"):
        for name in whole[key]:
            assert torch.equal(whole[key][name], split[key][name]), f"{key}.{name}"
    for key in ("optimizer", "aaf_optimizer"):
        for index, state in whole[key]["state"].items():
            assert torch.equal(state["momentum_buffer"], split[key]["state"][index]["momentum_buffer"])
    assert [r["loss"] for r in read_log(tmp_path / "split")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    # The accumulated run is a different trajectory from one in one piece (BatchNorm): not the same weights.
    train_main(*run_args(tmp_path / "one", *common[:-2]))
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    assert not torch.equal(one["model"]["classifier.weight"], whole["model"]["classifier.weight"])


@pytest.mark.parametrize("flags, expected", [
    (("--batch-size", "6", "--accum-steps", "4"), "--batch-size 6 does not split into --accum-steps 4 equal"),
    (("--accum-steps", "0"), "--accum-steps 0 must be >= 1"),
    (("--batch-size", "4", "--accum-steps", "4"), "PSPNet's BatchNorm needs at least 2 images per micro-batch "
                                                  "(--batch-size 4 in 4 micro-batches on 1 cpu process(es))"),
    (("--batch-size", "4", "--accum-steps", "2", "--loss", "gan"), "--loss gan cannot use --accum-steps > 1: "),
])
def test_accumulation_refusals_are_one_line(tmp_path, flags, expected):
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, *flags))
    message = str(stop.value)
    assert expected in message and "\n" not in message, message
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything was written


def test_resume_refuses_another_accum_steps_also_for_checkpoints_from_before_the_flag(tmp_path):
    common = ("--iters", "3", "--save-every", "1", "--batch-size", "4", "--loss", "ce")
    train_main(*run_args(tmp_path, *common, "--stop-after", "1"))
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(tmp_path, *common, "--accum-steps", "2", "--resume", str(tmp_path / "last.pt")))
    assert "--accum-steps: 2 now, 1 in the checkpoint" in str(stop.value) and "\n" not in str(stop.value)
    # A checkpoint written before --accum-steps existed ran in one piece: 1 resumes, 2 is refused.
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["args"]["accum_steps"]
    args, _ = train.resolve_args(train.get_args_parser().parse_args(run_args(tmp_path, *common)))
    runfolder.check_resume_args(args, ckpt, world_size=1)
    args.accum_steps = 2
    with pytest.raises(SystemExit, match="--accum-steps: 2 now, 1 in the checkpoint"):
        runfolder.check_resume_args(args, ckpt, world_size=1)


def test_a_stop_after_model_pt_is_written_says_the_training_finished(tmp_path, monkeypatch):
    """Ctrl-C in the final evaluation used to say 'continue with --resume last.pt' of an earlier
    step, although model.pt was complete."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_after_training", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_main("--dataset", "synthetic", "--crop-size", "48", "--batch-size", "2", "--iters", "4",
                   "--save-every", "3", "--out", str(out))
    assert str(stop.value) == (f"train.py: stopped by Ctrl-C; the training had finished: {out / 'model.pt'} (step 4) "
                               f"is complete; score it with python evaluate.py --ckpt {out / 'model.pt'} --metric all")


def test_an_out_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir
    out = tmp_path / "locked" / "run"

    def no_permission(self, *args, **kwargs):
        if self == out:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_permission)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(out))
    assert str(stop.value) == (f"train.py: cannot create {out / '.train.lock'} (Permission denied); --out must be a "
                               "folder this user can write")


def test_resume_takes_a_checkpoint_that_does_not_record_its_training_set_size():
    args, _ = train.resolve_args(train.get_args_parser().parse_args(run_args(Path("x"), "--resume", "x/last.pt")))
    ckpt = {"args": vars(args), "train_size": None, "world_size": 1}
    runfolder.check_resume_args(args, ckpt, world_size=1, train_size=2000)   # nothing to compare: no refusal
    with pytest.raises(SystemExit, match="trained on 100 train images, the data set now has 2000"):
        runfolder.check_resume_args(args, {**ckpt, "train_size": 100}, world_size=1, train_size=2000)


def test_the_run_lock_is_taken_on_the_lock_file_that_is_there(tmp_path, monkeypatch):
    """A start that opened .train.lock just before the holder's release unlinked it held a lock on
    a deleted file, while a third start could lock a new one: two runs in one folder."""
    import fcntl

    real_flock, calls = fcntl.flock, []

    def release_in_between(fd, operation):
        if not calls:  # the previous holder's release() unlinks the file after our open()
            (tmp_path / runfolder.RunLock.NAME).unlink()
        calls.append(operation)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", release_in_between)
    lock = runfolder.RunLock(tmp_path)
    try:
        assert lock.refusal is None and len(calls) == 2  # retried on the file that exists now
        assert os.path.samestat(os.fstat(lock.fd), os.stat(tmp_path / runfolder.RunLock.NAME))
    finally:
        lock.release()


def test_a_stop_before_training_does_not_take_an_old_model_pt_for_this_run(tmp_path, monkeypatch):
    """The 'training had finished' line comes from this start having written model.pt, not from
    a model.pt lying in the folder (here one that --overwrite is about to replace)."""
    out = tmp_path / "run"
    train_main(*run_args(out, "--loss", "ce", "--save-every", "2"))   # a finished 4-step run: model.pt
    real_prepare = runfolder.prepare_run_folder

    def interrupted(*args, **kwargs):  # Ctrl-C before --overwrite has cleared the folder
        raise KeyboardInterrupt

    monkeypatch.setattr(runfolder, "prepare_run_folder", interrupted)
    with pytest.raises(SystemExit) as stop:
        train_main(*run_args(out, "--loss", "ce", "--iters", "8", "--overwrite"))
    assert "had finished" not in str(stop.value)
    assert str(stop.value).startswith("train.py: stopped by Ctrl-C; the last good checkpoint is ")
    monkeypatch.setattr(runfolder, "prepare_run_folder", real_prepare)


def test_a_file_system_without_locks_or_with_a_changing_lock_file_runs_unlocked(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = runfolder.RunLock(tmp_path)
    assert lock.refusal is None and lock.fd is None
    assert f"{tmp_path / runfolder.RunLock.NAME} cannot be locked here (No locks available); running without" \
        in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(os.path, "samestat", lambda a, b: False)  # fstat and stat never agree
    lock = runfolder.RunLock(tmp_path)                                  # bounded: ends, does not spin
    assert lock.refusal is None and lock.fd is None
    assert "kept being replaced while it was locked" in capsys.readouterr().err
