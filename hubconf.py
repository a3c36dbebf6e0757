"""torch.hub entry points: the paper's losses and networks from a local checkout.

    import torch
    aaf = torch.hub.load("path/to/this/checkout", "aaf_loss", source="local", num_classes=21)
    net = torch.hub.load("path/to/this/checkout", "pspnet", source="local", weights="runs/voc_aaf/model.pt")

Every loss entry point returns the class of losses.py built with the same arguments (see that
class for them). The networks are model.py's, built by ``model.build_model``; ``weights=`` is a
checkpoint file written by train.py on this machine (nothing is ever downloaded here).
"""
from __future__ import annotations

dependencies = ["torch"]  # the networks also need torchvision (imported when one is built)


def affinity_loss(*args, **kwargs):
    """losses.AffinityFieldLoss(num_classes, kernel_sizes=(3,), margin=3.0, ignore_index=255,
    lambda_edge=1.0, lambda_nonedge=1.0, stride=1): the affinity field, paper Eq. (7)."""
    import losses
    return losses.AffinityFieldLoss(*args, **kwargs)


def aaf_loss(*args, **kwargs):
    """losses.AdaptiveAffinityFieldLoss(num_classes, kernel_sizes=(3, 5, 7), margin=3.0,
    ignore_index=255, stride=1): adaptive affinity fields, paper Eqs. (8)-(10). Its weights
    maximise the loss: give them an optimizer with maximize=True (see the README)."""
    import losses
    return losses.AdaptiveAffinityFieldLoss(*args, **kwargs)


def random_projection_loss(*args, **kwargs):
    """losses.RandomProjectionLoss(num_classes, kernel_size=5, seed=0, ignore_index=255, stride=1):
    the random projection baseline, paper Eq. (4)."""
    import losses
    return losses.RandomProjectionLoss(*args, **kwargs)


def adversarial_projection(*args, **kwargs):
    """losses.AdversarialProjection(num_classes, width=64, ignore_index=255, stride=1): the GAN
    baseline, paper Eqs. (5)-(6) (``discriminator_loss`` and ``generator_loss``)."""
    import losses
    return losses.AdversarialProjection(*args, **kwargs)


def embedding_loss(*args, **kwargs):
    """losses.EmbeddingContrastiveLoss(margin=1.0, kernel_size=3, normalize=True, ignore_index=255,
    num_classes=None, stride=1): the "Emb." baseline on feature maps."""
    import losses
    return losses.EmbeddingContrastiveLoss(*args, **kwargs)


def _network(arch: str, num_classes: int | None, backbone: str | None, weights: str | None,
             backbone_weights: str | None):
    try:
        import model
    except ImportError as error:
        raise ImportError(f"the networks need torchvision ({error}): pip install torchvision") from None
    if weights is None:
        if num_classes is None:
            raise ValueError(f"{arch}: give num_classes (or weights=, a checkpoint of train.py)")
        return model.build_model(arch, num_classes, backbone or "resnet101", pretrained=backbone_weights)
    if backbone_weights is not None:
        raise ValueError(f"{arch}: weights= (a whole network) and backbone_weights= exclude each other")
    net, ckpt = model.load_checkpoint(weights, num_classes=num_classes)
    meta = ckpt["meta"]
    if meta["arch"] != arch or (backbone is not None and meta["backbone"] != backbone):
        raise ValueError(f"{weights} holds a {meta['arch']} on {meta['backbone']}, not the "
                         f"{arch}{f' on {backbone}' if backbone else ''} asked for")
    return net


def pspnet(num_classes: int | None = None, backbone: str | None = None, weights: str | None = None,
           backbone_weights: str | None = None):
    """PSPNet on a dilated ResNet (output stride 8; logits [B, C, ceil(H/8), ceil(W/8)]).

    weights: a checkpoint file of train.py (model.pt / last.pt): the network it holds, in eval
    mode (model.load_checkpoint; num_classes and backbone, if given, must match it). Without it a
    new network in train mode (model.build_model) with ``num_classes`` classes on ``backbone``
    (default resnet101), randomly initialised or, with ``backbone_weights``, from "imagenet"
    (torchvision's file, only if already in the torch hub cache) or a ResNet state-dict path.
    """
    return _network("pspnet", num_classes, backbone, weights, backbone_weights)


def fcn(num_classes: int | None = None, backbone: str | None = None, weights: str | None = None,
        backbone_weights: str | None = None):
    """FCN (the dilated ResNet with a 1x1 classifier); arguments as ``pspnet``."""
    return _network("fcn", num_classes, backbone, weights, backbone_weights)
