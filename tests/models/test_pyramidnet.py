"""PyramidNet (Han, Kim & Kim 2017): pyramid widths, published sizes, shortcuts, stochastic depth, export."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn as nn

from deploycraft.models import create_model
from deploycraft.models.layers import ResidualAdd, StochasticDepth
from deploycraft.models.profile import count_params
from deploycraft.models.pyramidnet import (
    PyramidBasicBlock,
    PyramidNet,
    PyramidShortcut,
    _pyramidnet,
    pyramid_widths,
)
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.quant.graph import capture, fold_bn
from deploycraft.runtime.ort import OrtRunner
from tests.conftest import randomize_bn


@pytest.mark.parametrize(
    "name, millions",
    [
        ("pyramidnet110_a48", 1.7),
        ("pyramidnet164_a48_bottleneck", 1.7),
        ("pyramidnet272_a200_bottleneck", 26.0),
    ],
)
def test_published_param_counts(name, millions):
    assert abs(count_params(create_model(name, num_classes=10)) / 1e6 - millions) < 0.1


def test_a270_param_count():
    # The paper reports 28.3 M; this architecture has 28.49 M whatever the rounding rule (alpha / N is
    # the integer 5), and an independent implementation counts the same 28,485,477 (see the docstring).
    assert count_params(create_model("pyramidnet110_a270", num_classes=10)) == 28_485_477


def test_widths_follow_the_additive_rule_exactly():
    n_units, alpha = 54, 48
    widths = pyramid_widths(n_units, alpha)
    assert widths == [(16 * n_units + alpha * k) // n_units for k in range(1, n_units + 1)]
    # Floating-point accumulation gives 39.99999999999998 at k=27 and 63.99999999999989 at k=54.
    assert widths[26] == 40 and widths[-1] == 64
    assert all(b - a in (0, 1) for a, b in pairwise(widths))
    assert pyramid_widths(54, 270)[-1] == 286 and pyramid_widths(90, 200)[-1] == 216


@pytest.mark.parametrize("n_units, alpha", [(0, 48), (9, -1)])
def test_widths_reject_bad_arguments(n_units, alpha):
    with pytest.raises(ValueError):
        pyramid_widths(n_units, alpha)


@pytest.mark.parametrize(
    "name, depth, features",
    [("pyramidnet110_a48", 110, 64), ("pyramidnet164_a48_bottleneck", 164, 256), ("pyramidnet20_a48", 20, 64)],
)
def test_depth_counts_weighted_layers_and_final_width(name, depth, features):
    model = create_model(name, num_classes=10)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs + 1 == depth  # the convs and the FC; shortcuts add none
    assert model.num_features == features


@pytest.mark.parametrize("depth, bottleneck", [(111, False), (112, True)])
def test_bad_depth_is_rejected(depth, bottleneck):
    with pytest.raises(ValueError, match="depth"):
        _pyramidnet(depth, 48, bottleneck=bottleneck)


def test_shortcut_averages_and_zero_pads():
    shortcut = PyramidShortcut(4, 6, stride=2)
    x = torch.randn(2, 4, 5, 5)
    out = shortcut(x)
    assert out.shape == (2, 6, 3, 3)
    assert torch.allclose(out[:, :4, 0, 0], x[:, :, :2, :2].mean((2, 3)))
    # The last window at an odd size holds one pixel: it averages the real pixel, not zero padding.
    assert torch.allclose(out[:, :4, 2, 2], x[:, :, 4, 4])
    assert torch.count_nonzero(out[:, 4:]) == 0
    assert count_params(shortcut) == 0
    with pytest.raises(ValueError):
        PyramidShortcut(6, 4, stride=1)


def test_unit_has_no_relu_after_add_and_features_are_rectified():
    torch.manual_seed(0)
    model = create_model("pyramidnet20_a48", num_classes=10).eval()
    randomize_bn(model)
    adds = [m for m in model.modules() if isinstance(m, ResidualAdd)]
    assert len(adds) == 9 and all(m.act is None for m in adds)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model.layer1[0](model.bn1(model.conv1(x))).min() < 0
        assert model.forward_features(x).min() >= 0


def test_zero_init_makes_units_padded_identities():
    torch.manual_seed(0)
    model = create_model("pyramidnet20_a48", num_classes=10, zero_init_residual=True).eval()
    x = torch.randn(2, 16, 8, 8)
    for unit in (model.layer1[0], model.layer1[1]):
        with torch.no_grad():
            assert torch.equal(unit(x), unit.shortcut(x))
        x = unit.shortcut(x)


def test_fmnist_shape_one_channel_28px():
    model = create_model("pyramidnet20_a48", num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_survival_probs_decay_linearly_to_final():
    model = create_model("pyramidnet20_a48", num_classes=10, final_survival_prob=0.5)
    probs = [m.survival_prob for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(probs) == 9 and probs == model.survival_probs
    assert probs[-1] == pytest.approx(0.5) and probs[0] == pytest.approx(1 - 0.5 / 9)
    steps = [a - b for a, b in pairwise(probs)]
    assert all(s == pytest.approx(0.5 / 9) for s in steps)


def test_stochastic_depth_drops_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    model = create_model("pyramidnet20_a48", num_classes=10, final_survival_prob=0.5)
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    x = torch.randn(2, 3, 16, 16)
    model.train()
    kept = []
    for _ in range(4):
        model(x)
        kept += [m.last_kept for m in layers]
    assert True in kept and False in kept
    model.eval()
    randomize_bn(model)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(model(x), ref)
        # Eval scales each branch by its survival probability; folding moves that into the last BN.
        assert relative_error(fold_bn(model)(x).numpy(), ref.numpy()) < 1e-5


def test_shortcut_stays_one_graph_node():
    model = create_model("pyramidnet20_a48", num_classes=10)
    gm = capture(model)
    shortcuts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(".shortcut")]
    assert len(shortcuts) == 9
    assert not any(n.op == "call_function" and "pad" in str(n.target) for n in gm.graph.nodes)


def test_onnx_parity_at_odd_sizes(tmp_path):
    # 18 px -> 9 -> 5: the second downsampling pools a partial window, which must match in ONNX Runtime.
    torch.manual_seed(0)
    model = PyramidNet(PyramidBasicBlock, 1, 24, num_classes=10, in_chans=1).eval()
    randomize_bn(model)
    x = torch.randn(3, 1, 18, 18)
    path = tmp_path / "pyramid.onnx"
    export_onnx(fold_bn(model), x[:2], path)
    assert op_counts(path).get("BatchNormalization", 0) == 0
    with torch.no_grad():
        ref = model(x).numpy()
    assert relative_error(OrtRunner(path)(x.numpy()), ref) < 1e-4
