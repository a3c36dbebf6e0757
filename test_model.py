"""Tests for model.py (docs/protocol.md §5 networks, §6 parameter split, checkpoints). CPU only, no downloads.

Reference numbers are derived by hand in the comments (output sizes, receptive fields,
parameter counts), never read back from the code under test.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import checkpoint
import model as model_lib
from checkpoint import save_checkpoint
from model import OUTPUT_STRIDE, build_model, load_checkpoint, param_groups

# Odd, even and non-square sizes; 33x47 is smaller than the 6x6 PSP bin grid at stride 8 (5x6).
SIZES = [(33, 47), (64, 64), (65, 97), (71, 50), (96, 129)]


def expected_size(h: int, w: int) -> tuple[int, int]:
    return math.ceil(h / 8), math.ceil(w / 8)


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    # These convolutions are too small to gain from 2 threads, and on the shared 2-core
    # machine OpenMP threads spin-waiting for each other made this file 7x slower (130 s vs
    # 19 s at load 8). Restored afterwards so other test files keep torch's default.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def resnet101_pspnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("pspnet", 21, "resnet101").eval()


# --------------------------------------------------------------------------------------------
# Output size and features
# --------------------------------------------------------------------------------------------
def test_output_stride_constant():
    assert OUTPUT_STRIDE == 8


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
@pytest.mark.parametrize("arch", ["pspnet", "fcn"])
def test_logits_are_ceil_h_over_8_for_any_size(arch, backbone):
    torch.manual_seed(0)
    net = build_model(arch, 7, backbone).eval()
    with torch.no_grad():
        for h, w in SIZES:
            logits = net(torch.randn(1, 3, h, w))
            assert logits.shape == (1, 7, *expected_size(h, w)), (h, w)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_paper_crop_sizes(backbone):
    # docs/protocol.md §1: a 336x336 crop gives 42x42; the odd 353x481 gives ceil -> 45x61.
    net = build_model("pspnet", 2, backbone).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 336, 336)).shape == (1, 2, 42, 42)
        assert net(torch.randn(1, 3, 353, 481)).shape == (1, 2, 45, 61)


def test_tiny_output_size_every_height_17_to_48():
    # Every residue mod 8 four times over: the stem/maxpool/stride-2 chain must round up.
    net = build_model("pspnet", 3, "tiny").eval()
    with torch.no_grad():
        for h in range(17, 49):
            assert net(torch.randn(1, 3, h, 9)).shape[-2:] == (math.ceil(h / 8), 2), h


def test_resnet101_output_size(resnet101_pspnet):
    with torch.no_grad():
        logits = resnet101_pspnet(torch.randn(1, 3, 33, 47))
    assert logits.shape == (1, 21, 5, 6)


def test_training_mode_batch_and_backward():
    torch.manual_seed(0)
    net = build_model("pspnet", 5, "tiny").train()
    logits = net(torch.randn(4, 3, 50, 61))
    assert logits.shape == (4, 5, 7, 8)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("arch, channels", [("pspnet", 32), ("fcn", 128)])
def test_return_features_are_the_classifier_input(arch, channels):
    # tiny backbone ends at 128 channels; the PSP head fuses to 128 / 4 = 32 channels.
    torch.manual_seed(0)
    net = build_model(arch, 6, "tiny").eval()
    x = torch.randn(2, 3, 41, 56)
    with torch.no_grad():
        logits, features = net(x, return_features=True)
        plain = net(x)
    assert features.shape == (2, channels, 6, 7)
    assert torch.equal(logits, plain)
    # The logits are a 1x1 conv (with bias) of the returned features.
    w, b = net.classifier.weight, net.classifier.bias
    torch.testing.assert_close(logits, F.conv2d(features, w, b))


def test_psp_bins_average_pool_and_upsample_bilinearly():
    # One input channel, left half 0 and right half 4. The 2x2 bin averages to [[0, 4], [0, 4]];
    # with a unit 1x1 conv, identity BN (eval) and ReLU, bilinear upsampling back to 4 columns
    # with align_corners=False gives 0, 1, 3, 4 (sample points at -0.25, 0.25, 0.75, 1.25).
    psp = model_lib.PyramidPooling(in_channels=1, channels=1, bins=(2,)).eval()
    psp.fuse = nn.Identity()  # look at the concatenation itself: [x, upsampled bin]
    with torch.no_grad():
        psp.stages[0][0].weight.fill_(1.0)
        psp.stages[0][1].eps = 0.0
        x = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(4, 1)[None, None]  # [1, 1, 4, 4]
        out = psp(x)
    assert out.shape == (1, 2, 4, 4)
    assert torch.equal(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 1], torch.tensor([[0.0, 1.0, 3.0, 4.0]]).repeat(4, 1))


# --------------------------------------------------------------------------------------------
# Dilation and receptive field
# --------------------------------------------------------------------------------------------
def test_resnet101_layer3_layer4_are_dilated_not_strided(resnet101_pspnet):
    backbone = resnet101_pspnet.backbone
    for stage, dilation, n_blocks in (("layer3", 2, 23), ("layer4", 4, 3)):
        convs = [m for m in getattr(backbone, stage).modules() if isinstance(m, nn.Conv2d)]
        assert all(m.stride == (1, 1) for m in convs), stage
        k3 = [m for m in convs if m.kernel_size == (3, 3)]
        # One 3x3 per Bottleneck, and every block dilated, the first one included.
        assert len(k3) == n_blocks
        assert all(m.dilation == (dilation, dilation) and m.padding == (dilation, dilation) for m in k3)
    # layer2 still halves the resolution (stride 4 -> 8) in its first block.
    assert backbone.layer2[0].conv2.stride == (2, 2)
    assert backbone.layer2[0].downsample[0].stride == (2, 2)


def test_resnet18_basic_blocks_are_dilated():
    backbone = build_model("fcn", 3, "resnet18").backbone
    for stage, dilation in (("layer3", 2), ("layer4", 4)):
        for block in getattr(backbone, stage):
            for conv in (block.conv1, block.conv2):
                assert conv.stride == (1, 1) and conv.dilation == (dilation, dilation)
                assert conv.padding == (dilation, dilation)


def centre_gradient(net: nn.Module, size: int) -> torch.Tensor:
    """|d logit[0, centre] / d input| summed over batch and channels, along the centre row."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    logits = net(x)
    c = logits.shape[-1] // 2
    logits[:, 0, c, c].sum().backward()
    return x.grad.abs().sum(dim=(0, 1))[8 * c]  # output pixel c is centred on input pixel 8c


def test_tiny_fcn_receptive_field_matches_hand_computation():
    # Receptive field of the tiny backbone, RF += (k_eff - 1) * jump, jump = input pixels per step:
    # stem 3x3 s2: 3 (jump 2); maxpool 3 s2: +4 = 7 (jump 4); layer1 two 3x3: +8 +8 = 23;
    # layer2 3x3 s2, 3x3: +8 = 31 (jump 8), +16 = 47; layer3 two 3x3 dilated 2 (k_eff 5):
    # +32 +32 = 111; layer4 two 3x3 dilated 4 (k_eff 9): +64 +64 = 239 -> half-width 119.
    # Without dilation layer3/4 would add 4 x 16 -> RF 111, half-width 55.
    net = build_model("fcn", 2, "tiny").eval()  # eval: BN must not mix pixels through batch stats
    grad = centre_gradient(net, 256)  # centre output 16 -> input pixel 128
    assert grad[128 + 119] > 0 and grad[128 - 119] > 0  # edge of the dilated field
    assert grad[128 + 80] > 0  # beyond what an undilated stride-8 net could see (55)
    assert grad[128 + 120] == 0 and grad[128 - 120] == 0  # outside: exactly nothing


def test_psp_pooling_sees_beyond_the_backbone_receptive_field():
    # Same geometry as above: pixel 128+120 cannot reach the centre through the backbone,
    # only through the pyramid's global (1x1 bin) and 2x2/3x3 average pooling.
    net = build_model("pspnet", 2, "tiny").eval()
    grad = centre_gradient(net, 256)
    assert grad[128 + 120] > 0 and grad[0] > 0 and grad[255] > 0


# --------------------------------------------------------------------------------------------
# Size of the paper's network
# --------------------------------------------------------------------------------------------
def test_pspnet_resnet101_parameter_count(resnet101_pspnet):
    resnet101_without_fc = 44_549_160 - (2048 * 1000 + 1000)  # torchvision's published count
    bins = 4 * (2048 * 512 + 2 * 512)  # 1x1 conv (no bias) + BN per bin
    fuse = (2048 + 4 * 512) * 512 * 9 + 2 * 512  # 3x3 conv 4096 -> 512 + BN
    classifier = 512 * 21 + 21
    expected = resnet101_without_fc + bins + fuse + classifier  # 65,584,725
    assert sum(p.numel() for p in resnet101_pspnet.parameters()) == expected
    assert resnet101_pspnet.meta == {"arch": "pspnet", "backbone": "resnet101", "num_classes": 21}


def test_unknown_arch_and_backbone_are_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'deeplab'"):
        build_model("deeplab", 3, "tiny")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_model("fcn", 3, "vgg16")


# --------------------------------------------------------------------------------------------
# Parameter groups (docs/protocol.md §6)
# --------------------------------------------------------------------------------------------
def test_param_groups_split_and_cover_every_parameter_once():
    net = build_model("pspnet", 5, "tiny")
    groups = param_groups(net, weight_decay=5e-4, head_lr_mult=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    by_name = {g["name"]: g for g in groups}
    # A fixed order, so that a resumed optimizer's state dict lines up with its groups.
    assert [g["name"] for g in groups] == ["backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"]
    # tiny backbone: 12 convs (stem, 2 in layer1, 2 + shortcut in layers 2-4) and 12 BNs;
    # head: 4 bin convs + fuse conv + classifier weight; 5 BNs (10 tensors) + classifier bias.
    counts = {name: len(g["params"]) for name, g in by_name.items()}
    assert counts == {"backbone/decay": 12, "backbone/no_decay": 24, "head/decay": 6, "head/no_decay": 11}
    for name, g in by_name.items():
        assert g["lr_mult"] == (10.0 if name.startswith("head") else 1.0)
        assert g["weight_decay"] == (5e-4 if name.endswith("/decay") else 0.0)
        # Conv weights are 4-D; BN weights/biases and the classifier bias are 1-D.
        assert all((p.dim() == 4) == name.endswith("/decay") for p in g["params"])
    assert any(p is net.classifier.weight for p in by_name["head/decay"]["params"])
    assert any(p is net.classifier.bias for p in by_name["head/no_decay"]["params"])
    assert any(p is net.backbone.layer4[0].conv2.weight for p in by_name["backbone/decay"]["params"])
    # The groups are valid SGD groups and the trainer's lr rule applies.
    opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_mult"]
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 1e-2]


def test_param_groups_fcn_and_after_sync_batchnorm():
    net = build_model("fcn", 5, "tiny")
    before = {g["name"]: len(g["params"]) for g in param_groups(net)}
    assert before == {"backbone/decay": 12, "backbone/no_decay": 24, "head/decay": 1, "head/no_decay": 1}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert {g["name"]: len(g["params"]) for g in param_groups(synced)} == before


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def make_checkpoint(num_classes: int = 5, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    net = build_model("pspnet", num_classes, "tiny").train()
    with torch.no_grad():  # move the BN running statistics away from their initial values
        for _ in range(2):
            net(torch.randn(2, 3, 24, 24) * 2 + 1)
    net.eval()
    meta = {**net.meta, "class_names": [f"c{i}" for i in range(num_classes)], "dataset": "synthetic",
            "loss": "aaf", "kernel_sizes": [3, 5, 7]}
    return net, {"model": net.state_dict(), "meta": meta, "step": 7, "args": {"lr": 1e-3}}


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    net, ckpt = make_checkpoint()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["step"] == 7 and raw["meta"]["class_names"][4] == "c4"
    loaded, got = load_checkpoint(path, num_classes=5)
    assert not loaded.training and got["meta"]["dataset"] == "synthetic"
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    _, first = make_checkpoint(seed=0)
    _, second = make_checkpoint(seed=1)
    path = tmp_path / "last.pt"
    save_checkpoint(first, path)
    before = path.read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(second, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    monkeypatch.undo()
    _, got = load_checkpoint(path)
    assert torch.equal(got["model"]["classifier.weight"], first["model"]["classifier.weight"])


def test_checkpoints_get_the_usual_file_mode(tmp_path):
    # open() would give 0666 minus the umask; tempfile.mkstemp gave 0600 whatever the umask.
    _, ckpt = make_checkpoint()
    previous = os.umask(0o022)
    try:
        save_checkpoint(ckpt, tmp_path / "shared.pt")
        os.umask(0o077)
        save_checkpoint(ckpt, tmp_path / "private.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600


def test_save_checkpoint_never_writes_a_non_finite_value(tmp_path):
    _, ckpt = make_checkpoint()
    path = tmp_path / "last.pt"
    save_checkpoint(ckpt, path)
    before = path.read_bytes()
    momentum = {"state": {3: {"momentum_buffer": torch.tensor([1.0, float("inf")])}}, "param_groups": []}
    with pytest.raises(checkpoint.NonFiniteCheckpointError, match=r"optimizer\.state\.3\.momentum_buffer"):
        save_checkpoint({**ckpt, "optimizer": momentum}, path)
    stats = dict(ckpt["model"])
    stats["backbone.bn1.running_var"] = stats["backbone.bn1.running_var"].clone()
    stats["backbone.bn1.running_var"][2] = float("nan")
    with pytest.raises(checkpoint.NonFiniteCheckpointError, match=r"model\.backbone\.bn1\.running_var"):
        save_checkpoint({**ckpt, "model": stats}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]
    # Integer tensors (BatchNorm's num_batches_tracked, RNG states) are not floating point: fine.
    save_checkpoint({**ckpt, "rng": torch.zeros(4, dtype=torch.uint8)}, path)


def test_weight_and_checkpoint_errors_have_their_own_class(tmp_path, monkeypatch):
    # train.py turns these (and data.DatasetError) into one line, and nothing else: a ValueError
    # from a bug keeps its traceback. They stay ValueError / FileNotFoundError for older callers.
    with pytest.raises(checkpoint.WeightsNotFoundError) as info:
        load_checkpoint(tmp_path / "absent.pt")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, checkpoint.WeightsError)
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.WeightsError) as info:
        load_checkpoint(tmp_path / "garbage.pt")
    assert isinstance(info.value, ValueError)
    with pytest.raises(checkpoint.WeightsError):
        build_model("fcn", 3, "resnet18", pretrained=tmp_path / "garbage.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(model_lib.ImageNetWeightsMissing) as info:
        build_model("fcn", 3, "resnet18", pretrained="imagenet")
    assert "(or pass --pretrained x)" in info.value.remedy("--pretrained x")
    _, ckpt = make_checkpoint()
    torch.save({**ckpt, "meta": {**ckpt["meta"], "arch": "unet"}}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.WeightsError, match="unknown network"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_load_checkpoint_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")

    _, ckpt = make_checkpoint(num_classes=5)
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, num_classes=19)
    message = str(info.value)
    assert "5 classes" in message and "19 classes" in message and "\n" not in message

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint") as info:
        load_checkpoint(garbage)
    assert "\n" not in str(info.value)

    bare = tmp_path / "bare.pt"
    torch.save(ckpt["model"], bare)  # a state dict without meta
    with pytest.raises(ValueError, match="expected a dict with 'model' and 'meta'"):
        load_checkpoint(bare)

    wrong = tmp_path / "wrong.pt"
    torch.save({**ckpt, "meta": {**ckpt["meta"], "arch": "fcn"}}, wrong)  # PSP weights, FCN meta
    with pytest.raises(ValueError, match="weights do not match fcn/tiny.*unexpected") as info:
        load_checkpoint(wrong)
    assert "\n" not in str(info.value)


def test_load_checkpoint_refuses_damaged_non_finite_and_folder_paths(tmp_path):
    """What torch.load accepts silently: a flipped bit in a weight (the archive's CRC-32 catches it),
    NaN weights written by another tool, and a run folder given for its checkpoint."""
    _, ckpt = make_checkpoint(num_classes=5)
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    raw = bytearray(path.read_bytes())
    weight = ckpt["model"]["classifier.weight"].numpy().tobytes()
    at = bytes(raw).index(weight)                      # the classifier's bytes inside the archive
    raw[at + 5] ^= 0x40                                 # one bit of one float
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    assert torch.load(flipped, weights_only=True)["step"] == 7   # torch itself does not notice
    with pytest.raises(ValueError, match=r"flipped\.pt is damaged: .* fails its checksum") as info:
        load_checkpoint(flipped)
    assert "\n" not in str(info.value)

    bad = {**ckpt, "model": {**ckpt["model"]}}
    bad["model"]["classifier.weight"] = torch.full_like(ckpt["model"]["classifier.weight"], float("nan"))
    nan_path = tmp_path / "nan.pt"
    torch.save(bad, nan_path)                          # not through save_checkpoint, which refuses it
    with pytest.raises(ValueError, match=r"nan\.pt holds non-finite values in model\.classifier\.weight"):
        load_checkpoint(nan_path)

    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is a folder, not a checkpoint: give a file such as"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# Pretrained backbones
# --------------------------------------------------------------------------------------------
def test_imagenet_weights_missing_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        build_model("pspnet", 21, "resnet18", pretrained="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message  # torchvision's IMAGENET1K_V1 file name
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("fcn", 3, "tiny", pretrained="imagenet")


def test_imagenet_weights_read_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    # A stand-in for the real file, under torchvision's file name in the cache folder.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, folder / "resnet18-f37072fd.pth")
    net = build_model("fcn", 4, "resnet18", pretrained="imagenet")
    assert torch.equal(net.backbone.conv1.weight, reference["conv1.weight"])
    assert "resnet18-f37072fd.pth" in capsys.readouterr().out


def test_pretrained_state_dict_path_loads_strictly(tmp_path, capsys):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    for tensor in reference.values():  # make every tensor (running stats too) distinctive
        if tensor.is_floating_point():
            tensor.add_(torch.rand_like(tensor))
    path = tmp_path / "r18.pth"
    torch.save(reference, path)
    net = build_model("pspnet", 4, "resnet18", pretrained=path)
    backbone_state = net.backbone.state_dict()
    # Every key of the file except the two classification tensors.
    assert sorted(backbone_state) == sorted(k for k in reference if not k.startswith("fc."))
    for key, value in backbone_state.items():
        assert torch.equal(value, reference[key]), key
    assert "dropped fc.weight, fc.bias" in capsys.readouterr().out


def test_pretrained_state_dict_mismatch_is_an_error(tmp_path):
    reference = torchvision.models.resnet18(weights=None).state_dict()
    extra = tmp_path / "extra.pth"
    torch.save({**reference, "layer5.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match="unexpected .*layer5.0.conv1.weight"):
        build_model("fcn", 3, "resnet18", pretrained=extra)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in reference.items() if k != "layer1.0.bn1.running_mean"}, missing)
    with pytest.raises(ValueError, match="missing .*layer1.0.bn1.running_mean"):
        build_model("fcn", 3, "resnet18", pretrained=missing)
    # ResNet-18 weights into a ResNet-34: layer1.2.* etc. are missing.
    with pytest.raises(ValueError, match="weights do not match backbone resnet34"):
        build_model("fcn", 3, "resnet34", pretrained=extra.with_name("missing.pth"))
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        build_model("fcn", 3, "resnet18", pretrained=tmp_path / "absent.pth")



def test_atomic_write_names_write_failures_and_keeps_bugs_as_they_are(tmp_path, monkeypatch):
    """A failure to create the file (no permission, say) is a WriteError without the 'disk may be
    full' guess; a full disk says so; an error of the writer itself (a bug) is not disguised."""
    import errno

    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    real_open = os.open

    def no_permission(name, *args, **kwargs):
        if str(name).startswith(str(tmp_path / ".f.bin.")):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    with pytest.raises(checkpoint.WriteError) as info:
        checkpoint.atomic_write(path, lambda f: f.write(b"new"))
    assert str(info.value) == f"cannot write {path}: Permission denied (the previous file is unchanged)"
    monkeypatch.setattr(os, "open", real_open)

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(checkpoint.WriteError, match=r"No space left on device \(the disk may be full; the previous"):
        checkpoint.atomic_write(path, full)

    def bug(f):
        raise RuntimeError("shape mismatch in the writer")

    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        checkpoint.atomic_write(path, bug)
    assert not isinstance(info.value, OSError)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(checkpoint.WriteError) as info:  # no earlier file: nothing to keep
        checkpoint.atomic_write(tmp_path / "new.bin", full)
    assert str(info.value).endswith("(the disk may be full; nothing was written)")
