"""Highway networks: gate init near the carry, identity at a very negative gate bias, deep gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deploycraft.models import create_model
from deploycraft.models.highway import HighwayConv2d, HighwayConvNet, HighwayLinear, HighwayMLP
from deploycraft.models.layers import ResidualAdd
from deploycraft.models.profile import count_params
from deploycraft.onnx_io import export_onnx, relative_error
from deploycraft.quant.graph import fold_bn
from deploycraft.runtime.ort import OrtRunner

SIGMOID_MINUS_2 = 1 / (1 + math.exp(2.0))  # 0.119


KINDS = ["fc", "conv3x3", "conv1x1"]


def _layer(kind: str, gate_bias: float = -2.0, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "fc":
        return HighwayLinear(64, gate_bias)
    return HighwayConv2d(16, gate_bias, gate_kernel=3 if kind == "conv3x3" else 1)


def _x(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (32, 64) if isinstance(layer, HighwayLinear) else (4, 16, 8, 8)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("kind", KINDS)
def test_transform_gate_starts_near_sigmoid_of_bias(kind):
    layer = _layer(kind)
    t = layer.transform_gate(_x(layer))
    assert abs(t.mean().item() - SIGMOID_MINUS_2) < 0.03
    assert torch.quantile(t.flatten(), 0.99) < 0.5  # almost every unit starts mostly carrying


@pytest.mark.parametrize("name", ["highway_fc", "highway_conv"])
def test_gates_of_registered_nets_start_near_carry(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    means = []
    for m in model.modules():
        if isinstance(m, (HighwayLinear, HighwayConv2d)):
            m.register_forward_hook(lambda mod, inp, out: means.append(mod.transform_gate(inp[0]).mean().item()))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert len(means) == (10 if name == "highway_fc" else 6)
    assert all(abs(m - SIGMOID_MINUS_2) < 0.04 for m in means), means


@pytest.mark.parametrize("kind", KINDS)
def test_very_negative_gate_bias_is_identity(kind):
    layer = _layer(kind, gate_bias=-10.0)
    x = _x(layer)
    y = layer(x)
    # T <= sigmoid(-10 + W_T x) ~ 5e-5: the output is x up to T * (H - x)
    assert torch.allclose(y, x, rtol=1e-3, atol=1e-3) and (y - x).abs().mean() < 1e-4
    # the default bias -2 already transforms a noticeable part of the signal
    assert (_layer(kind)(x) - x).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_the_papers_formula(kind):
    layer = _layer(kind).eval()
    x = _x(layer, seed=3)
    with torch.no_grad():
        if isinstance(layer, HighwayLinear):
            h = torch.relu(layer.fc_h(x))
        else:
            h = torch.relu(layer.bn_h(layer.conv_h(x)))
        t = torch.sigmoid(layer.fc_t(x) if isinstance(layer, HighwayLinear) else layer.conv_t(x))
        assert torch.allclose(layer(x), h * t + x * (1 - t), atol=1e-5)


def test_gradients_reach_the_first_layer_of_a_30_layer_net():
    torch.manual_seed(0)
    net = HighwayMLP(width=64, depth=30, grid=4, num_classes=10, in_chans=1)
    out = net(torch.randn(8, 1, 16, 16))
    F.cross_entropy(out, torch.arange(8) % 10).backward()
    first, last = net.proj.weight.grad.norm().item(), net.fc.weight.grad.norm().item()
    assert math.isfinite(first) and first > 1e-3
    assert first / last > 1e-2  # measured ~0.15; a plain 30-layer sigmoid net gets exactly 0 here
    assert all(layer.fc_h.weight.grad.norm() > 0 and layer.fc_t.weight.grad.norm() > 0 for layer in net.layers)


def test_sizes():
    fc = create_model("highway_fc", num_classes=10)
    assert count_params(fc) == (3 * 16 * 256 + 256) + 10 * 2 * (256 * 256 + 256) + (256 * 10 + 10)
    conv = create_model("highway_conv", num_classes=10)
    assert 0.5e6 < count_params(conv) < 1.0e6
    assert [conv.stage1[0].conv_h.out_channels, conv.stage2[1].conv_h.out_channels, conv.num_features] == [32, 64, 128]
    # a 1x1 gate conv holds 1/9 of the 3x3 gate's weights
    assert count_params(create_model("highway_conv", num_classes=10, gate_kernel=1)) < 0.65 * count_params(conv)
    with pytest.raises(ValueError, match="gate_kernel"):
        HighwayConv2d(8, gate_kernel=5)
    with pytest.raises(ValueError, match="widths"):
        HighwayConvNet(layers=(1, 1), widths=(8,))


def test_carry_is_a_residual_add_after_folding():
    """The carry reaches a ResidualAdd as its skip, so quantization placement sees it like a shortcut."""
    model = create_model("highway_conv", num_classes=10).eval()
    gm = fold_bn(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ResidualAdd)]
    assert len(adds) == 6
    for add in adds:  # add(t * (h - x), x): the skip is the x that the branch subtracts
        mul = add.args[0]
        assert mul.args[1].args[1] is add.args[1]


@pytest.mark.parametrize("name", ["highway_fc", "highway_conv"])
def test_fashion_mnist_shape_exports(name, tmp_path):
    """28 px grey input (Fashion-MNIST): the pooled grid divides 28, so the ONNX export works."""
    model = create_model(name, num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / f"{name}.onnx"
    export_onnx(fold_bn(model), x, path)
    with torch.no_grad():
        ref = model(x).numpy()
    assert relative_error(OrtRunner(path)(x.numpy()), ref) < 1e-4
