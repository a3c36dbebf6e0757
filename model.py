"""Segmentation networks of the paper: dilated ResNet PSPNet and FCN at output stride 8.

Paper section 4, "Implementation Details": AAF is evaluated on PSPNet and FCN, both on an
ImageNet-pretrained ResNet-101, whose logits come out at 1/8 of the input resolution and are
not upscaled for the losses. The embedding baseline of Table 2 puts its loss on "the last
convolutional layer before the classifier", which `forward(x, return_features=True)` returns.
docs/protocol.md §5 lists what the authors' code builds; this file follows it:

- backbone: a torchvision ResNet whose layer3 and layer4 keep their resolution and dilate all
  their 3x3 convolutions by 2 and 4 (every block of the stage, as the official code does,
  not torchvision's `replace_stride_with_dilation`, which leaves each stage's first block at
  the previous rate), so logits are `[B, C, ceil(H/8), ceil(W/8)]` for any input size;
- PSP head: average pooling to 1x1, 2x2, 3x3, 6x6 bins, 1x1 conv + BN + ReLU per bin,
  bilinear upsampling, concatenation with the backbone features, 3x3 conv + BN + ReLU,
  1x1 classifier with bias. No dropout and no auxiliary loss (official AAF code);
- FCN: the same backbone with a 1x1 classifier.

Also here, because every later stage needs them: the recipe's parameter split (docs/protocol.md §6:
the head learns 10x faster, weight decay on conv weights only), ImageNet initialisation from
torchvision's weight files, and rebuilding a network from a checkpoint (checkpoint.py writes
the files and checks them when they are read back).

BatchNorm is trained, not frozen. On several GPUs train.py converts it with
`torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`; nothing here depends on the BN class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import checkpoint
from checkpoint import WeightsError, WeightsNotFoundError  # raised here too; model.WeightsError stays valid

OUTPUT_STRIDE = 8
ARCHS = ("pspnet", "fcn")
BACKBONES = ("resnet101", "resnet50", "resnet34", "resnet18", "tiny")
PSP_BINS = (1, 2, 3, 6)
# Dilation of layer3 and layer4: their strides (2 and 2) become dilations so that the output
# stride stays 8 while the receptive field grows as if they were still strided.
STAGE_DILATION = {"layer3": 2, "layer4": 4}
# "tiny": four stages of one BasicBlock each, widths as ResNet-18 divided by 4. It exists for
# the CPU tests and the CPU demo only; it has no ImageNet weights.
TINY_WIDTHS = (16, 32, 64, 128)
TINY_BLOCKS = (1, 1, 1, 1)
# torchvision's original ImageNet weights ("V1", the classic ResNet recipe, which the
# segmentation literature of 2018 started from). The file names are torchvision's own.
IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}
# Keys of a torchvision classification checkpoint that a segmentation backbone does not use.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
CLASSIFIER_INIT_STD = 0.01  # small random init of the final 1x1 classifier (DeepLab/PSPNet habit)


class ImageNetWeightsMissing(WeightsNotFoundError):
    """torchvision's ImageNet file of `backbone` is not in the torch hub cache (never downloaded here).

    `remedy(flag)` words the message for a caller whose option is not the Python argument
    (train.py: `--pretrained`).
    """

    def __init__(self, backbone: str, path: Path, url: str):
        self.backbone, self.path, self.url = backbone, path, url
        super().__init__(self.remedy("pretrained=<path to the file>"))

    def remedy(self, alternative: str) -> str:
        return (f"ImageNet weights for {self.backbone} not found: download {self.url} and put the file "
                f"{self.path.name} in {self.path.parent} (or pass {alternative})")


# --------------------------------------------------------------------------------------------
# Backbone: dilated ResNet at output stride 8
# --------------------------------------------------------------------------------------------
def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one in place (same weights, same shapes).

    Every convolution loses its stride (the first block's 3x3 conv or BasicBlock conv1, and
    the 1x1 shortcut conv), and every 3x3 convolution gets `dilation` with padding
    `dilation`, so a 3x3 conv keeps the spatial size. Works for BasicBlock and Bottleneck,
    which is how resnet18/34 get dilation although torchvision's BasicBlock refuses it.
    """
    for module in stage.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        module.stride = (1, 1)
        if module.kernel_size == (3, 3):
            module.dilation = (dilation, dilation)
            module.padding = (dilation, dilation)


def init_weights(module: nn.Module) -> None:
    """He init for convs (fan_out, as torchvision's ResNet), identity BN."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DilatedResNet(nn.Module):
    """ResNet without avgpool/fc; attribute names match torchvision so its state dicts load.

    Sizes for an input `[B, 3, H, W]` (all ceil divisions, so odd sizes work):
    stem conv s2 -> H/2, maxpool s2 -> H/4, layer1 -> H/4, layer2 s2 -> H/8,
    layer3 and layer4 dilated -> H/8.
    """

    def __init__(self, conv1: nn.Conv2d, bn1: nn.Module, layers: list[nn.Sequential], out_channels: int):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        # k3 s2 p1: output ceil(h/2) for every h, so the stem never drops a border row.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = out_channels
        for name, dilation in STAGE_DILATION.items():
            dilate_stage(getattr(self, name), dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, C1, H/4, W/4]
        x = self.layer2(self.layer1(x))  # [B, C2, H/8, W/8]
        return self.layer4(self.layer3(x))  # [B, C4, H/8, W/8], dilated 2 then 4


def torchvision_resnet(name: str) -> DilatedResNet:
    """One of torchvision's ResNets (random init), made dilated at stride 8."""
    net = getattr(torchvision.models, name)(weights=None)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return DilatedResNet(net.conv1, net.bn1, layers, out_channels=net.fc.in_features)


def tiny_resnet() -> DilatedResNet:
    """A very small BasicBlock ResNet (16-32-64-128 channels), still dilated at stride 8."""
    # A 3x3 stem instead of ResNet's 7x7: k3 s2 p1 gives ceil(H/2) exactly like k7 s2 p3.
    conv1 = nn.Conv2d(3, TINY_WIDTHS[0], kernel_size=3, stride=2, padding=1, bias=False)
    bn1 = nn.BatchNorm2d(TINY_WIDTHS[0])
    layers, in_channels = [], TINY_WIDTHS[0]
    for index, (width, blocks) in enumerate(zip(TINY_WIDTHS, TINY_BLOCKS)):
        stride = 1 if index == 0 else 2  # layer3/4 strides are removed by dilate_stage
        stage = []
        for block in range(blocks):
            downsample = None
            if block == 0 and (stride != 1 or in_channels != width):
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, width, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            stage.append(BasicBlock(in_channels, width, stride if block == 0 else 1, downsample))
            in_channels = width
        layers.append(nn.Sequential(*stage))
    backbone = DilatedResNet(conv1, bn1, layers, out_channels=TINY_WIDTHS[-1])
    init_weights(backbone)
    return backbone


def build_backbone(name: str) -> DilatedResNet:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return tiny_resnet() if name == "tiny" else torchvision_resnet(name)


# --------------------------------------------------------------------------------------------
# ImageNet initialisation
# --------------------------------------------------------------------------------------------
def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `backbone`: <torch hub>/checkpoints/<file>."""
    if backbone not in IMAGENET_WEIGHTS:
        raise WeightsError(f"backbone {backbone!r} has no ImageNet weights; "
                         "use pretrained=None or a state-dict path")
    file_name = os.path.basename(IMAGENET_WEIGHTS[backbone].url)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict from disk, with one-line errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"pretrained weights file not found: {path}") from None
    except Exception as error:  # pickle, zip or weights_only errors all mean "not a state dict"
        first_line = f"{type(error).__name__}: {error}".splitlines()[0]
        raise WeightsError(f"{path} is not a readable state dict ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a plain state dict (name -> tensor)")
    return state


def load_backbone_weights(backbone: DilatedResNet, pretrained: str | os.PathLike, name: str) -> str:
    """Load ImageNet / state-dict weights into `backbone` strictly; returns a report line.

    The only keys allowed to go unused are the classification layer's `fc.weight`/`fc.bias`;
    any other missing, unexpected or mis-shaped tensor is an error.
    """
    if pretrained == "imagenet":
        path = imagenet_weights_file(name)
        if not path.is_file():
            raise ImageNetWeightsMissing(name, path, IMAGENET_WEIGHTS[name].url)
    else:
        path = Path(pretrained)
    state = read_state_dict(path)
    dropped = [key for key in CLASSIFIER_KEYS if key in state]
    for key in dropped:
        del state[key]
    check_state_dict(backbone, state, f"backbone {name} from {path}")
    backbone.load_state_dict(state, strict=True)
    report = f"loaded {len(state)} backbone tensors for {name} from {path}"
    return report + (f" (dropped {', '.join(dropped)})" if dropped else "")


def check_state_dict(module: nn.Module, state: dict[str, Any], what: str) -> None:
    """Raise one line naming what differs, before `load_state_dict(strict=True)` would."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if keys:
            problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise WeightsError(f"weights do not match {what}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Heads and the full model
# --------------------------------------------------------------------------------------------
def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    # No conv bias: the BN that follows has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """PSP module: context pooled at 4 scales, fused with the local features by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, bins: tuple[int, ...] = PSP_BINS):
        super().__init__()
        self.bins = bins
        self.stages = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in bins)
        self.fuse = conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]  # (h, w) = (ceil(H/8), ceil(W/8))
        pyramid = [x]
        for bin_size, stage in zip(self.bins, self.stages):
            # [B, F, bin, bin] -> [B, channels, bin, bin] -> [B, channels, h, w]. Adaptive
            # pooling also works when h or w < bin (bins then overlap). align_corners=False:
            # TF's resize_bilinear default, which the official code used.
            pooled = stage(F.adaptive_avg_pool2d(x, bin_size))
            pyramid.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(pyramid, dim=1))  # [B, channels, h, w]


class SegmentationModel(nn.Module):
    """backbone -> head (PSP module or nothing for FCN) -> 1x1 classifier, logits at stride 8."""

    def __init__(self, arch: str, num_classes: int, backbone_name: str):
        super().__init__()
        self.arch, self.backbone_name, self.num_classes = arch, backbone_name, num_classes
        self.backbone = build_backbone(backbone_name)
        in_channels = self.backbone.out_channels
        if arch == "pspnet":
            # in/4 channels per bin as PSPNet: 512 for ResNet-50/101 (docs/protocol.md §5), 128 for
            # ResNet-18/34, 32 for tiny.
            self.head: nn.Module = PyramidPooling(in_channels, in_channels // len(PSP_BINS))
            feature_channels = self.head.out_channels
            init_weights(self.head)
        else:
            self.head = nn.Identity()  # FCN: the classifier reads the backbone directly
            feature_channels = in_channels
        self.feature_channels = feature_channels
        self.classifier = nn.Conv2d(feature_channels, num_classes, kernel_size=1, bias=True)
        nn.init.normal_(self.classifier.weight, std=CLASSIFIER_INIT_STD)
        nn.init.zeros_(self.classifier.bias)

    @property
    def meta(self) -> dict[str, Any]:
        """What `build_model` needs to rebuild this network (stored in checkpoints)."""
        return {"arch": self.arch, "backbone": self.backbone_name, "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.head(self.backbone(x))  # [B, F, ceil(H/8), ceil(W/8)]
        logits = self.classifier(features)  # [B, C, ceil(H/8), ceil(W/8)]
        return (logits, features) if return_features else logits


def build_model(arch: str, num_classes: int, backbone: str = "resnet101",
                pretrained: str | os.PathLike | None = None, verbose: bool = True) -> SegmentationModel:
    """PSPNet or FCN on a dilated ResNet (docs/protocol.md §5); logits `[B, C, ceil(H/8), ceil(W/8)]`.

    pretrained: None (random init), "imagenet" (torchvision's ImageNet file, read from the
    torch hub cache, never downloaded here), or a path to a torchvision ResNet state dict.
    verbose: print what was loaded (train.py passes False on every rank but 0).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = SegmentationModel(arch, num_classes, backbone)
    if pretrained is not None:
        report = load_backbone_weights(model.backbone, pretrained, backbone)
        if verbose:
            print(report, flush=True)
    return model


# --------------------------------------------------------------------------------------------
# Optimiser parameter groups (docs/protocol.md §6)
# --------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float = 5e-4, head_lr_mult: float = 10.0) -> list[dict]:
    """SGD groups: backbone (lr_mult 1) vs head = PSP module + classifier (lr_mult head_lr_mult),
    each split into conv weights (weight decay) and everything else (BN, biases: no decay).

    The trainer sets `group["lr"] = poly_lr(step) * group["lr_mult"]`. Group order is fixed
    (backbone/decay, backbone/no_decay, head/decay, head/no_decay) so optimizer state dicts
    of a resumed run line up.
    """
    model = getattr(model, "module", model)  # DDP wrapper -> the model (same Parameters)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for part_name in ("backbone", "head", "classifier"):
        part = "backbone" if part_name == "backbone" else "head"
        for module in getattr(model, part_name).modules():
            for param_name, param in module.named_parameters(recurse=False):
                decay = isinstance(module, nn.Conv2d) and param_name == "weight"
                groups.setdefault((part, decay), []).append(param)
                seen.add(id(param))
    unassigned = [name for name, p in model.named_parameters() if id(p) not in seen]
    if unassigned:  # a parameter outside backbone/head/classifier would silently not train
        raise ValueError(f"parameters outside backbone/head/classifier: {', '.join(unassigned)}")
    result = []
    for part, decay in (("backbone", True), ("backbone", False), ("head", True), ("head", False)):
        params = groups.get((part, decay), [])
        if not params:
            continue
        result.append({
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_mult": 1.0 if part == "backbone" else head_lr_mult,
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
        })
    return result


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, num_classes: int | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[SegmentationModel, dict]:
    """Rebuild the model from `ckpt["meta"]` and load `ckpt["model"]` strictly.

    Returns `(model, ckpt)`; the model is on `map_location` and in eval mode (call `.train()`
    to fine-tune). `num_classes`, when given, must equal the checkpoint's.
    """
    ckpt = checkpoint.read_checkpoint(path, map_location)
    meta = ckpt["meta"]
    missing = [key for key in ("arch", "backbone", "num_classes") if key not in meta]
    if missing:
        raise WeightsError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    if meta["arch"] not in ARCHS or meta["backbone"] not in BACKBONES:
        raise WeightsError(f"{path}: checkpoint meta names an unknown network "
                           f"({meta['arch']!r} on {meta['backbone']!r})")
    if num_classes is not None and num_classes != meta["num_classes"]:
        raise WeightsError(f"{path} was trained for {meta['num_classes']} classes, "
                         f"but {num_classes} classes were requested")
    model = build_model(meta["arch"], meta["num_classes"], meta["backbone"], pretrained=None)
    what = f"{meta['arch']}/{meta['backbone']} with {meta['num_classes']} classes ({path})"
    check_state_dict(model, ckpt["model"], what)
    model.load_state_dict(ckpt["model"], strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), ckpt
