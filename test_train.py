"""Tests for train.py (issue 4): schedules, every loss, minimax ascent, NaN stop, exact resume, torchrun.

CPU only: the tiny backbone on the synthetic data set, 48-pixel crops, a few iterations. Expected
numbers are worked out by hand in the comments, never read back from train.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import losses
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
    return train.build_parts(args, info, torch.device("cpu"), train.Dist()), args


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
    # SPEC 6 / paper: VOC crop 336, batch 8, lr 1e-3, 30k iterations, lambda 1, sizes {3, 5}, m = 3.
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
    assert "non-finite loss at step 5" in message and "ce=nan" in message and "affinity=" in message
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
    # The killed run logged steps 1-5; the resumed one appends from step 5 (step 5 is redone).
    assert [r["step"] for r in read_log(tmp_path / "split")] == [1, 2, 3, 4, 5, 5, 6, 7, 8]


def test_init_carries_network_and_aaf_weights_into_a_fresh_schedule(tmp_path):
    train_main(*run_args(tmp_path / "stage1", "--loss", "aaf", "--iters", "3"))
    ckpt = torch.load(tmp_path / "stage1" / "model.pt", weights_only=True)
    assert ckpt["aaf"]["edge_logits"].abs().max() > 0  # stage 1 moved the AAF weights
    train_main(*run_args(tmp_path / "stage2", "--loss", "aaf", "--iters", "2", "--lr", "1e-4",
                         "--init", str(tmp_path / "stage1" / "model.pt")))
    assert [r["step"] for r in read_log(tmp_path / "stage2")] == [1, 2]  # not from the checkpoint's step 3
    args, info = train.resolve_args(train.get_args_parser().parse_args(
        run_args(tmp_path / "stage2", "--loss", "aaf", "--init", str(tmp_path / "stage1" / "model.pt"))))
    parts = train.build_parts(args, info, torch.device("cpu"), train.Dist(), init=ckpt)
    for name, value in parts.model_without_ddp.state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    for name, value in parts.projection.state_dict().items():
        assert torch.equal(value, ckpt["aaf"][name]), name
    assert parts.optimizer.state_dict()["state"] == {}  # momentum starts afresh


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *run_args(out, "--loss", "aaf", "--iters", "3", "--batch-size", "4",
                                                 "--dump-rank-state")]
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


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        train_main(*run_args(tmp_path / "run"), "--tensorboard")
