"""AAF in other people's networks (issue 18): torch.hub entry points (hubconf.py), a torchvision
model with full-resolution logits trained a few steps with AAF on CPU, and the README section
"Using AAF in your own project", whose Python snippets are run as written.

The exactness of the binary and stride= paths against the literal references is in test_losses.py.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import checkpoint
import losses
import model as model_lib

REPO = Path(__file__).resolve().parent
SECTION = "## Using AAF in your own project"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU models: one thread is steadier on a shared machine (and the README's numbers
    were printed with one). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hub(entry: str, *args, **kwargs):
    return torch.hub.load(str(REPO), entry, *args, source="local", **kwargs)


def _blocky_labels(B: int, C: int, H: int, W: int, block: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B, -(-H // block), -(-W // block)), generator=g)
    labels = labels.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W].contiguous()
    labels[:, :2] = 255
    return labels


# =============================================================================================
# hubconf.py
# =============================================================================================
HUB_LOSSES = {"affinity_loss": losses.AffinityFieldLoss, "aaf_loss": losses.AdaptiveAffinityFieldLoss,
              "random_projection_loss": losses.RandomProjectionLoss,
              "adversarial_projection": losses.AdversarialProjection, "embedding_loss": losses.EmbeddingContrastiveLoss}


def test_hub_aaf_loss_equals_the_class():
    """torch.hub.load(<checkout>, 'aaf_loss', source='local', num_classes=21) is losses'
    AdaptiveAffinityFieldLoss(21): same class, settings and loss (with the same weights)."""
    hub = _hub("aaf_loss", num_classes=21)
    mine = losses.AdaptiveAffinityFieldLoss(21)
    assert type(hub) is losses.AdaptiveAffinityFieldLoss
    assert (hub.num_classes, hub.kernel_sizes, hub.margin, hub.ignore_index, hub.stride) == (21, (3, 5, 7), 3.0, 255, 1)
    logits = torch.randn(2, 21, 9, 11, generator=torch.Generator().manual_seed(0))
    labels = _blocky_labels(2, 21, 9, 11, block=3, seed=1)
    assert torch.equal(hub(logits, labels), mine(logits, labels))
    other = _hub("aaf_loss", 19, kernel_sizes=(3, 5), margin=2.0, stride=8)
    assert (other.num_classes, other.kernel_sizes, other.margin, other.stride) == (19, (3, 5), 2.0, 8)


def test_hub_loss_entry_points_build_their_classes_with_the_documented_arguments():
    """Every loss entry point returns its class, and its docstring's signature is the class's
    (so the documented arguments and defaults cannot drift from losses.py)."""
    import hubconf
    for entry, cls in HUB_LOSSES.items():
        kwargs = {} if cls is losses.EmbeddingContrastiveLoss else {"num_classes": 3}
        assert type(_hub(entry, **kwargs)) is cls, entry
        params = inspect.signature(cls.__init__).parameters.values()
        plain = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                          for p in params if p.name != "self")
        doc = " ".join(getattr(hubconf, entry).__doc__.split())
        assert doc.startswith(f"losses.{cls.__name__}({plain})"), (entry, doc, plain)


def _tiny_checkpoint(tmp_path: Path, arch: str = "fcn") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    net = model_lib.build_model(arch, 3, "tiny")
    with torch.no_grad():  # non-default BN statistics, so that a fresh network would differ
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "model.pt"
    checkpoint.save_checkpoint({"model": net.state_dict(), "meta": net.meta}, path)
    return path, net.eval()


def test_hub_networks_load_a_local_checkpoint(tmp_path):
    path, net = _tiny_checkpoint(tmp_path)
    hub = _hub("fcn", weights=str(path))
    assert isinstance(hub, model_lib.SegmentationModel) and not hub.training
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(hub(x), net(x))
    with pytest.raises(ValueError, match="holds a fcn on tiny, not the pspnet asked for"):
        _hub("pspnet", weights=str(path))
    with pytest.raises(ValueError, match="trained for 3 classes, but 5 classes were requested"):
        _hub("fcn", num_classes=5, weights=str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        _hub("fcn", weights=str(tmp_path / "missing.pt"))
    fresh = _hub("pspnet", num_classes=4, backbone="tiny")
    assert fresh.meta == {"arch": "pspnet", "backbone": "tiny", "num_classes": 4} and fresh.training
    with pytest.raises(ValueError, match="give num_classes"):
        _hub("pspnet")


# =============================================================================================
# A torchvision model with full-resolution logits, trained a few steps with AAF (stride=8)
# =============================================================================================
def test_deeplabv3_full_resolution_logits_train_with_aaf_on_cpu():
    """deeplabv3_resnet50 (random init, no download) outputs logits at the input's size; AAF with
    stride=8 reads them at pixels (8i, 8j): its value is the reference on that grid, the training
    steps run with finite losses, the cross-entropy falls and the backbone receives gradients."""
    from torchvision.models.segmentation import deeplabv3_resnet50
    torch.manual_seed(0)
    C = 21
    net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=C)
    aaf = losses.AdaptiveAffinityFieldLoss(C, kernel_sizes=(3, 5), stride=8)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    opt_w = torch.optim.SGD(aaf.parameters(), lr=1e-2, momentum=0.9, maximize=True)
    images = torch.randn(2, 3, 64, 80)
    labels = _blocky_labels(2, C, 64, 80, block=16, seed=2)
    first = net.backbone.conv1.weight.detach().clone()
    ces = []
    for step in range(3):
        logits = net(images)["out"]
        assert logits.shape == (2, C, 64, 80)
        ce, field = losses.unary_loss(logits, labels), aaf(logits, labels)
        ref = losses.affinity_field_reference(logits[..., ::8, ::8], labels[:, ::8, ::8], (3, 5), 3.0, 255,
                                              *aaf.weights())
        assert abs(field.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())
        assert torch.isfinite(ce) and torch.isfinite(field) and field.item() > 0
        loss = ce + 10 ** (-step / 3) * field
        opt.zero_grad()
        opt_w.zero_grad()
        loss.backward()
        assert aaf.edge_logits.grad is not None and torch.isfinite(aaf.edge_logits.grad).all()
        opt.step()
        opt_w.step()
        ces.append(ce.item())
    assert ces[-1] < ces[0] - 0.03, ces
    assert not torch.equal(net.backbone.conv1.weight, first)


# =============================================================================================
# The README section's snippets run as written
# =============================================================================================
def _section_snippets() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in readme
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


class _StrideEightNet(torch.nn.Module):
    """A stand-in for the user's stride-8 network: logits [B, 21, H/8, W/8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 21, kernel_size=8, stride=8)

    def forward(self, x):
        return self.conv(x)


def _stand_ins() -> dict:
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 80)
    labels = _blocky_labels(2, 21, 64, 80, block=16, seed=5)
    return {"net": _StrideEightNet(), "device": "cpu", "images": images, "labels": labels,
            "loader": [(images, labels), (images.flip(-1), labels.flip(-1))]}


def test_readme_section_snippets_run(monkeypatch, capsys):
    """Each ```python block of "Using AAF in your own project" runs in a fresh namespace holding
    only the stand-ins the section names (net, loader, device, images, labels), from the checkout
    (the torch.hub snippet loads "."). The DeepLabV3 snippet prints the lines the README quotes
    (the numbers to 2 decimals: other thread counts and CPUs change the last ones)."""
    monkeypatch.chdir(REPO)
    snippets = _section_snippets()
    assert len(snippets) >= 6
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), _stand_ins())
    printed = re.findall(r"step \d: cross-entropy ([\d.]+)  AAF ([\d.]+)", capsys.readouterr().out)
    quoted = re.findall(r"step \d: cross-entropy ([\d.]+)  AAF ([\d.]+)",
                        (REPO / "README.md").read_text(encoding="utf-8").split(SECTION, 1)[1])
    assert len(printed) == len(quoted) == 3
    for got, expected in zip(printed, quoted):
        assert all(abs(float(g) - float(e)) < 0.03 for g, e in zip(got, expected)), (printed, quoted)
