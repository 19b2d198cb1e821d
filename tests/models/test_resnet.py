"""ResNet family: published sizes, torchvision checkpoint compatibility, forward/backward."""

from __future__ import annotations

import json

import pytest
import torch

from deploycraft.models import create_model, list_models
from deploycraft.models.profile import count_macs, count_params
from tests.conftest import FIXTURES

TORCHVISION = json.loads((FIXTURES / "torchvision_state_dicts.json").read_text())["models"]


@pytest.mark.parametrize(
    "name, millions",
    [
        ("resnet18", 11.7),
        ("resnet34", 21.8),
        ("resnet50", 25.6),
        ("resnet101", 44.5),
        ("resnet152", 60.2),
    ],
)
def test_imagenet_param_counts(name, millions):
    assert abs(count_params(create_model(name, num_classes=1000)) / 1e6 - millions) < 0.1


def test_cifar_resnet56_params_and_resnet50_macs():
    assert abs(count_params(create_model("resnet56", num_classes=10)) / 1e6 - 0.85) < 0.1
    assert abs(count_macs(create_model("resnet50"), (3, 224, 224)) / 1e9 - 4.1) < 0.05


@pytest.mark.parametrize("name", [n for n in TORCHVISION if n.startswith("resnet") and n in list_models()])
def test_torchvision_checkpoint_loads_strict(name):
    """A state dict with torchvision's exact names and shapes loads with strict=True."""
    ref = TORCHVISION[name]
    model = create_model(name, num_classes=1000)
    ours = model.state_dict()
    assert list(ours) == [k for k, _ in ref["state_dict"]]
    fake = {k: torch.full(shape, 0.5) if shape else torch.tensor(3) for k, shape in ref["state_dict"]}
    model.load_state_dict(fake, strict=True)
    assert count_params(model) == ref["params"]
    assert torch.all(model.state_dict()["fc.weight"] == 0.5)


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("resnet20", 16), ("resnet56", 16)])
def test_forward_backward(name, size):
    model = create_model(name, num_classes=7, in_chans=1)
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_shortcut_options(shortcut):
    model = create_model("resnet20", num_classes=10, shortcut=shortcut)
    projections = sum(1 for n, _ in model.named_modules() if n.endswith("downsample.0"))
    assert projections == {"A": 0, "B": 2, "C": 9}[shortcut]
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_zero_init_residual_makes_blocks_identity():
    model = create_model("resnet20", num_classes=10).eval()
    block = model.layer1[0]
    x = torch.relu(torch.randn(2, 16, 8, 8))
    assert torch.allclose(block(x), x)


def test_interface():
    model = create_model("resnet50", num_classes=10)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[1] == model.num_features == 2048
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_duplicate_registration_is_an_error():
    from deploycraft.models.registry import register_model

    with pytest.raises(RuntimeError, match="registered twice"):

        @register_model("resnet")
        def resnet50(**kwargs):  # noqa: F811 - the point of the test
            return None
