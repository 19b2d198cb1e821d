"""DenseNet: published sizes, torchvision checkpoint compatibility, layouts, memory-efficient mode."""

from __future__ import annotations

import json

import pytest
import torch

from deploycraft.errors import UserError
from deploycraft.models import create_model
from deploycraft.models.densenet import DenseLayer, DenseNet, _cifar
from deploycraft.models.io import load_checkpoint
from deploycraft.models.profile import count_macs, count_params
from deploycraft.quant.graph import ChannelAffine, fold_bn
from tests.conftest import FIXTURES, randomize_bn

TORCHVISION = json.loads((FIXTURES / "torchvision_state_dicts.json").read_text())["models"]
IMAGENET = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize(
    "name, num_classes, millions",
    [
        # Huang et al. 2017: Table 1 / torchvision (ImageNet), Table 2 (CIFAR-10).
        ("densenet121", 1000, 8.0),
        ("densenet169", 1000, 14.1),
        ("densenet201", 1000, 20.0),
        ("densenet161", 1000, 28.7),
        ("densenet40_12", 10, 1.0),
        ("densenet_bc_100_12", 10, 0.8),
        ("densenet_bc_250_24", 10, 15.3),
        ("densenet_bc_190_40", 10, 25.6),
    ],
)
def test_published_param_counts(name, num_classes, millions):
    assert abs(count_params(create_model(name, num_classes=num_classes)) / 1e6 - millions) < 0.1


def test_densenet121_macs():
    # torchvision lists 2.83 GFLOPS (multiply-adds) for densenet121 at 224 px
    assert abs(count_macs(create_model("densenet121"), (3, 224, 224)) / 1e9 - 2.83) < 0.05


@pytest.mark.parametrize("name", IMAGENET)
def test_torchvision_checkpoint_loads_strict(name):
    """A state dict with torchvision's exact names, order and shapes loads with strict=True."""
    ref = TORCHVISION[name]
    model = create_model(name, num_classes=1000)
    assert list(model.state_dict()) == [k for k, _ in ref["state_dict"]]
    fake = {k: torch.full(shape, 0.5) if shape else torch.tensor(3) for k, shape in ref["state_dict"]}
    model.load_state_dict(fake, strict=True)
    assert count_params(model) == ref["params"]
    assert torch.all(model.state_dict()["classifier.weight"] == 0.5)


def test_load_checkpoint_finds_the_classifier(tmp_path):
    """io.load_checkpoint locates the head through get_classifier(): `classifier`, not `fc`."""
    ref = TORCHVISION["densenet121"]
    fake = {k: torch.full(shape, 0.25) if shape else torch.tensor(1) for k, shape in ref["state_dict"]}
    path = tmp_path / "densenet121.pth"
    torch.save(fake, path)
    with pytest.raises(UserError, match="classifier"):
        load_checkpoint(create_model("densenet121", num_classes=10), path)
    model = load_checkpoint(create_model("densenet121", num_classes=10), path, reset_classifier=True)
    assert torch.all(model.features.denseblock4.denselayer16.conv2.weight == 0.25)
    assert model.classifier.weight.shape == (10, 1024) and not torch.all(model.classifier.weight == 0.25)


def test_cifar_layouts():
    bc = create_model("densenet_bc_100_12", num_classes=10)
    assert bc.features.conv0.kernel_size == (3, 3) and bc.features.conv0.out_channels == 24  # 2k
    assert not hasattr(bc.features, "pool0") and not hasattr(bc.features, "norm0")
    assert len(list(bc.features.denseblock1.children())) == 16  # (100 - 4) / 6
    assert not hasattr(bc.features, "denseblock4")
    # compression 0.5: 24 + 16 * 12 = 216 channels -> 108
    assert (bc.features.transition1.conv.in_channels, bc.features.transition1.conv.out_channels) == (216, 108)
    assert bc.features.denseblock1.denselayer1.conv1.out_channels == 48  # bottleneck 4k

    plain = create_model("densenet40_12", num_classes=10)
    assert plain.features.conv0.out_channels == 16 and len(list(plain.features.denseblock1.children())) == 12
    layer = plain.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (3, 3) and layer.conv2 is None and layer.norm2 is None
    t = plain.features.transition1.conv
    assert t.in_channels == t.out_channels == 16 + 12 * 12  # no compression
    assert plain.num_features == 16 + 3 * 12 * 12


@pytest.mark.parametrize("name, size, grid", [("densenet_bc_100_12", 32, 8), ("densenet121", 64, 2)])
def test_feature_resolution(name, size, grid):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, size, size))
    assert feats.shape == (1, model.num_features, grid, grid)
    assert feats.min() >= 0  # ends in norm5 -> relu5


def test_bad_depth_and_compression():
    with pytest.raises(ValueError, match="6n\\+4"):
        _cifar(101, 12)
    with pytest.raises(ValueError, match="3n\\+4"):
        _cifar(41, 12, bc=False)
    with pytest.raises(ValueError, match="compression"):
        DenseNet(compression=0.0)


def test_interface():
    model = create_model("densenet_bc_100_12", num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier() is model.classifier
    model.reset_classifier(4)
    assert model.get_classifier().out_features == 4 and model(x).shape == (2, 4)


def _tiny(bottleneck: bool, memory_efficient: bool) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(
        growth_rate=4,
        block_config=(3, 2),
        num_init_features=8,
        bottleneck=bottleneck,
        compression=0.5,
        stem="cifar",
        memory_efficient=memory_efficient,
        num_classes=5,
        in_chans=1,
    )


@pytest.mark.parametrize("bottleneck", [True, False])
def test_memory_efficient_matches_plain(bottleneck):
    plain, efficient = _tiny(bottleneck, False).train(), _tiny(bottleneck, True).train()
    efficient.load_state_dict(plain.state_dict())
    recomputed = []
    for layer in efficient.modules():
        if isinstance(layer, DenseLayer):
            # a pre-hook: the recomputation stops as soon as conv1 has saved its inputs for backward
            layer.conv1.register_forward_pre_hook(lambda m, i: recomputed.append(m))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out_p, out_e = plain(x), efficient(x)
    assert torch.allclose(out_p, out_e, atol=1e-5)
    n_layers = len(recomputed)
    out_p.square().sum().backward()
    out_e.square().sum().backward()
    assert n_layers == 5 and len(recomputed) == 2 * n_layers  # conv1 ran again in backward
    grads_p = dict(plain.named_parameters())
    for name, p in efficient.named_parameters():
        assert torch.allclose(p.grad, grads_p[name].grad, atol=1e-5, rtol=1e-4), name
    # the recomputation must not update the BN running averages a second time
    buffers_p = dict(plain.named_buffers())
    for name, b in efficient.named_buffers():
        assert torch.allclose(b.float(), buffers_p[name].float(), atol=1e-6), name


def test_memory_efficient_eval_is_plain_and_traceable():
    model = _tiny(True, True).eval()
    randomize_bn(model)
    x = torch.randn(2, 1, 16, 16)
    gm = fold_bn(model)
    affines = sum(isinstance(m, ChannelAffine) for m in gm.modules())
    # BN after a concat (norm1 of each of 5 layers), the transition BN and norm5 have no conv to fold into.
    assert affines == 5 + 1 + 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
