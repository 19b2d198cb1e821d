"""Pre-activation ResNet and Wide ResNet: published sizes, unit structure, stochastic depth, dropout.

Forward/backward, eval determinism and ONNX parity of every registered name are in test_zoo.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deploycraft.models import create_model
from deploycraft.models.layers import ResidualAdd, StochasticDepth, linear_survival_probs
from deploycraft.models.preact import PreActBasicBlock, PreActBottleneck, _cifar, _wrn
from deploycraft.models.profile import count_params
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.quant.graph import ChannelAffine, fold_bn
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.runtime.ort import OrtRunner, optimized_op_counts
from tests.conftest import randomize_bn

UNITS = (PreActBasicBlock, PreActBottleneck)


def _units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, UNITS)]


def _weighted_depth(model: nn.Module) -> int:
    """Convs and fcs on the main path: the depth the papers name their networks by (projections excluded)."""
    return sum(
        1
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.endswith("downsample")
    )


@pytest.mark.parametrize(
    "name, num_classes, millions",
    [
        # He et al. 2016b (CIFAR-10): ResNet-110 and ResNet-164 1.7 M.
        ("preact_resnet110", 10, 1.7),
        ("preact_resnet164", 10, 1.7),
        # Same layouts as the CIFAR ResNet-20/56 of He et al. 2015: 0.27 M and 0.85 M.
        ("preact_resnet20", 10, 0.27),
        ("preact_resnet56", 10, 0.85),
        # Zagoruyko & Komodakis 2016.
        ("wrn_16_2", 10, 0.7),
        ("wrn_16_4", 10, 2.7),
        ("wrn_16_8", 10, 11.0),
        ("wrn_40_4", 10, 8.9),
        ("wrn_28_10", 10, 36.5),
        # No published pre-activation ImageNet counts; moving the BNs before the convs changes the count
        # by a few thousand, so torchvision's ResNet figures must hold.
        ("preact_resnet18", 1000, 11.7),
        ("preact_resnet34", 1000, 21.8),
        ("preact_resnet50", 1000, 25.6),
        ("preact_resnet101", 1000, 44.5),
        ("preact_resnet152", 1000, 60.2),
    ],
)
def test_published_param_counts(name, num_classes, millions):
    assert abs(count_params(create_model(name, num_classes=num_classes)) / 1e6 - millions) < 0.1


@pytest.mark.parametrize("name, depth", [("preact_resnet20", 20), ("preact_resnet110", 110), ("preact_resnet164", 164)])
def test_depth_matches_name(name, depth):
    assert _weighted_depth(create_model(name, num_classes=10)) == depth


def test_resnet1001_builds_trains_and_matches_published_size():
    torch.manual_seed(0)
    model = create_model("preact_resnet1001", num_classes=10)
    assert _weighted_depth(model) == 1001 and len(_units(model)) == 333
    # The paper's 10.2 M counts conv and fc weights: the 149 k BN scales and shifts bring the total
    # to 10.33 M (ResNet-164's 1.7 M is the same either way: 1.68 M vs 1.70 M).
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert abs((count_params(model) - bn) / 1e6 - 10.2) < 0.1
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()  # zero-init keeps the untrained eval net finite
    # Train mode, with the default init and with the paper's He init (live branches from the start).
    for net in (model, create_model("preact_resnet1001", num_classes=10, zero_init_residual=False)):
        out = net.train()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # The identity path carries gradient to the stem through 333 units without vanishing.
        assert net.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet50", "wrn_16_2"])
def test_no_activation_after_add_and_final_bn_relu(name):
    model = create_model(name, num_classes=10, zero_init_residual=False).eval()
    randomize_bn(model)
    adds = [m for m in model.modules() if isinstance(m, ResidualAdd)]
    assert len(adds) == len(_units(model)) and all(a.act is None for a in adds)
    seen = {}
    model.layer1[-1].register_forward_hook(lambda m, inp, out: seen.update(unit=out))
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert (seen["unit"] < 0).any(), "a unit's output is a plain sum and should take negative values"
    assert (feats >= 0).all() and feats.shape[1] == model.num_features


@pytest.mark.parametrize("name, projections", [("preact_resnet20", 2), ("wrn_16_2", 3), ("preact_resnet50", 4)])
def test_projection_only_where_shape_changes_and_reads_preactivation(name, projections):
    model = create_model(name, num_classes=10).eval()
    randomize_bn(model)
    with_proj = [u for u in _units(model) if u.downsample is not None]
    assert len(with_proj) == projections
    assert all(isinstance(u.downsample, nn.Conv2d) and u.downsample.kernel_size == (1, 1) for u in with_proj)
    unit = model.layer2[0]
    seen = {}
    unit.downsample.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    x = torch.randn(2, unit.conv1.in_channels, 8, 8)
    with torch.no_grad():
        unit(x)
        assert torch.allclose(seen["x"], torch.relu(unit.bn1(x)))
        assert not torch.allclose(seen["x"], x)


def test_only_first_unit_skips_preactivation():
    model = create_model("preact_resnet20", num_classes=10)
    units = _units(model)
    assert units[0].bn1 is None and all(u.bn1 is not None for u in units[1:])


@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet50", "wrn_16_2"])
def test_fold_bn_leaves_only_preactivation_affines(name):
    """Conv -> BN pairs fold; each unit's input BN and the final BN (BN -> ReLU -> conv) become affines."""
    model = create_model(name, num_classes=10, zero_init_residual=False).eval()
    randomize_bn(model)
    folded = fold_bn(model)
    modules = list(folded.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert sum(isinstance(m, ChannelAffine) for m in modules) == len(_units(model))  # units - 1 + final BN
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(folded(x).numpy(), model(x).numpy()) < 1e-5


def test_stochastic_depth_linear_decay_and_eval():
    model = create_model("preact_resnet20", num_classes=10, final_survival_prob=0.5, zero_init_residual=False)
    drops = [u.drop_path for u in _units(model)]
    assert all(isinstance(d, StochasticDepth) for d in drops)
    probs = [d.survival_prob for d in drops]
    assert probs == pytest.approx(linear_survival_probs(9, 0.5)) and probs[-1] == pytest.approx(0.5)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        # Eval-time scaling by p_l folds into the last conv of each branch: no StochasticDepth node left.
        folded = fold_bn(model)
        assert not any(isinstance(m, StochasticDepth) for m in folded.modules())
        assert relative_error(folded(x).numpy(), model(x).numpy()) < 1e-5


@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet164", "wrn_16_2"])
def test_no_stochastic_depth_modules_at_full_survival(name):
    model = create_model(name, num_classes=10, final_survival_prob=1.0)
    assert not any(isinstance(m, StochasticDepth) for m in model.modules())


def test_stochastic_depth_drops_branches_in_training():
    torch.manual_seed(0)
    model = create_model("preact_resnet20", num_classes=10, final_survival_prob=0.5).train()
    kept = []
    for _ in range(8):
        model(torch.randn(2, 3, 16, 16))
        kept += [u.drop_path.last_kept for u in _units(model)]
    assert True in kept and False in kept


def test_wrn_widths_and_units():
    model = create_model("wrn_28_10", num_classes=10)
    assert model.conv1.out_channels == 16 and model.num_features == 640
    for stage, width in zip(model.stage_names, (160, 320, 640), strict=True):
        units = getattr(model, stage)
        assert len(units) == 4 and all(u.conv2.out_channels == width for u in units)


def test_wrn_dropout_between_convs():
    assert not any(isinstance(m, nn.Dropout) for m in create_model("wrn_16_2", num_classes=10).modules())
    model = create_model("wrn_16_2", num_classes=10, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)
    # Between the convs: the second conv of a unit reads the dropout's output.
    unit, seen = model.layer1[1], {}
    unit.dropout.register_forward_hook(lambda m, inp, out: seen.update(drop=out))
    unit.conv2.register_forward_hook(lambda m, inp, out: seen.update(conv2_in=inp[0]))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)
    assert seen["conv2_in"] is seen["drop"] and (seen["drop"] == 0).any()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_zero_init_residual_makes_units_identity():
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        zeroed = create_model("preact_resnet20", num_classes=10).eval()
        assert torch.equal(zeroed.layer1[1](x), x)
        paper = create_model("preact_resnet20", num_classes=10, zero_init_residual=False).eval()
        assert not torch.allclose(paper.layer1[1](x), x)
        bottleneck = create_model("preact_resnet164", num_classes=10).eval()
        y = torch.randn(2, 64, 8, 8)
        assert torch.equal(bottleneck.layer1[1](y), y)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("preact_resnet20", {"final_survival_prob": 0.8}),
        ("wrn_16_2", {"dropout": 0.3}),
        ("preact_resnet164", {}),
    ],
)
def test_onnx_export_with_live_branches(name, kwargs, tmp_path):
    """The registry test exports fresh models, whose zero-initialised branches contribute nothing; here the
    branches are live (papers' init, random BN), so the parity covers them."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, zero_init_residual=False, **kwargs).eval()
    randomize_bn(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"{name}.onnx"
    export_onnx(fold_bn(model), x[:2], path)
    ops = op_counts(path)
    assert ops.get("BatchNormalization", 0) == 0 and ops.get("Dropout", 0) == 0
    with torch.no_grad():
        ref = model(x).numpy()
    assert relative_error(OrtRunner(path)(x.numpy()), ref) < 1e-4


@pytest.mark.parametrize(
    "name, kwargs", [("preact_resnet20", {"final_survival_prob": 0.8}), ("wrn_16_2", {"dropout": 0.3})]
)
def test_int8_for_onnxruntime_runs_every_conv_and_add_quantized(name, kwargs, tmp_path):
    """The recipes' path: the pre-activation affines stay float, every conv and residual add runs in INT8."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, zero_init_residual=False, **kwargs).eval()
    randomize_bn(model)
    qmodel = insert_quantizers(model, "onnxruntime-cpu")
    for _, q in act_quantizers(qmodel):
        q.start_calibration()
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qmodel(x)
    for _, q in act_quantizers(qmodel):
        q.finish_calibration("max", 100.0)
    path = tmp_path / "int8.onnx"
    export_onnx(qmodel, x[:2], path)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    ops = optimized_op_counts(path, tmp_path)
    assert ops.get("QLinearConv") == convs and ops.get("Conv", 0) == 0 and ops.get("FusedConv", 0) == 0
    assert ops.get("QLinearAdd") == len(_units(model))
    with torch.no_grad():
        ref, sim = model(x).numpy(), qmodel(x).numpy()
    assert relative_error(sim, ref) < 0.1  # measured 0.023 / 0.028 with max calibration
    assert relative_error(OrtRunner(path)(x.numpy()), sim) < 0.1  # one INT8 rounding step apart


@pytest.mark.parametrize("name", ["preact_resnet20", "wrn_16_2"])
def test_fashion_mnist_input(name):
    """The recipes' input: one channel at 28 px."""
    model = create_model(name, num_classes=10, in_chans=1)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_interface():
    model = create_model("preact_resnet50", num_classes=10)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[1] == model.num_features == 2048
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="6n\\+2"):
        _cifar(21, bottleneck=False)
    with pytest.raises(ValueError, match="9n\\+2"):
        _cifar(30, bottleneck=True)
    with pytest.raises(ValueError, match="6n\\+4"):
        _wrn(15, 2)
    with pytest.raises(ValueError, match="dropout"):
        create_model("wrn_16_2", dropout=1.0)
    with pytest.raises(ValueError, match="stem"):
        create_model("preact_resnet18", stem="tiny")
