"""Structured pruning: coupled channels removed together, targets met, pruned models saved and rebuilt."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deploycraft.errors import UserError
from deploycraft.models import create_model, is_registered
from deploycraft.models.io import load_model, save_model
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.pruning import (
    IMPORTANCE_NAMES,
    PruneSettings,
    conv_widths,
    prune_once,
    pruned_copy,
    relative_step_ratio,
    search_ratio,
    size_of,
)
from deploycraft.quant.graph import fold_bn
from deploycraft.runtime.ort import OrtRunner
from tests.conftest import randomize_bn

SHAPE = (3, 16, 16)


def _model(name="resnet20"):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10).eval()
    randomize_bn(m)
    return m


def test_ratio_prunes_and_keeps_classifier_and_stem():
    m = _model()
    p = pruned_copy(m, 0.5, PruneSettings(round_to=8), SHAPE)
    assert size_of(p, SHAPE)["macs"] < 0.5 * size_of(m, SHAPE)["macs"]
    assert p.fc.out_features == 10 and p.conv1.out_channels == m.conv1.out_channels
    assert all(w % 8 == 0 for w in conv_widths(p).values())
    assert p(torch.randn(2, *SHAPE)).shape == (2, 10)


def _kill_inner_channels(m, dead):
    block = m.layer2[1]
    with torch.no_grad():
        block.conv1.weight[dead] = 0
        block.bn1.weight[dead] = 0
        block.bn1.bias[dead] = 0
        block.conv2.weight[:, dead] = 0
    return block


def test_coupled_group_removal_is_exact():
    """Removing a block's dead inner channels (conv1 out, bn1, conv2 in: one group) changes no output."""
    import torch_pruning as tp

    m = _model()
    dead = list(range(0, 32, 2))
    block = _kill_inner_channels(m, dead)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        ref = m(x)
    graph = tp.DependencyGraph().build_dependency(m, example_inputs=torch.zeros(1, *SHAPE))
    group = graph.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=dead)
    assert {dep.target.module for dep, _ in group} >= {block.conv1, block.bn1, block.conv2}
    group.prune()
    assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_l1_importance_removes_the_dead_channels():
    m = _model()
    _kill_inner_channels(m, list(range(0, 32, 2)))
    p = pruned_copy(m, 0.5, PruneSettings(importance="l1", round_to=None, max_layer_ratio=0.9), SHAPE)
    kept = p.layer2[1].conv1.weight
    assert kept.shape[0] == 16 and kept.abs().flatten(1).sum(1).min() > 0  # only live channels survive


@pytest.mark.parametrize("importance", IMPORTANCE_NAMES)
def test_every_importance_criterion(importance):
    m = _model()

    def grads(model):
        torch.nn.functional.cross_entropy(model(torch.randn(8, *SHAPE)), torch.randint(0, 10, (8,))).backward()

    p = pruned_copy(m, 0.4, PruneSettings(importance=importance, round_to=4), SHAPE, gradients=grads)
    assert size_of(p, SHAPE)["params"] < size_of(m, SHAPE)["params"]


def test_importance_decides_which_channels_go():
    m = _model()
    a = pruned_copy(m, 0.5, PruneSettings(importance="l1", round_to=None), SHAPE)
    b = pruned_copy(m, 0.5, PruneSettings(importance="random", round_to=None), SHAPE, seed=1)
    assert conv_widths(a) == conv_widths(b)
    assert not torch.equal(a.layer3[0].conv1.weight, b.layer3[0].conv1.weight)


def test_search_meets_macs_target():
    m = _model()
    settings = PruneSettings(round_to=8)
    base = size_of(m, SHAPE)["macs"]
    ratio = search_ratio(lambda r: size_of(pruned_copy(m, r, settings, SHAPE), SHAPE)["macs"] <= 0.5 * base, hi=0.8)
    assert ratio is not None and 0 < ratio < 0.8
    assert size_of(pruned_copy(m, ratio, settings, SHAPE), SHAPE)["macs"] <= 0.5 * base
    smaller = max(0.0, ratio - 0.05)
    assert size_of(pruned_copy(m, smaller, settings, SHAPE), SHAPE)["macs"] > 0.5 * base


def test_search_handles_unreachable_and_non_monotone_targets():
    assert search_ratio(lambda r: False, hi=0.8) is None
    # fits only in a window (widths rounding can make bigger ratios skip groups): the smallest fit is found
    r = search_ratio(lambda r: 0.3 <= r <= 0.5, hi=0.8)
    assert 0.3 <= r <= 0.32


def test_relative_step_ratio_composes():
    first = relative_step_ratio(0.25, 0.0)
    second = relative_step_ratio(0.5, 0.25)
    assert abs((1 - first) * (1 - second) - 0.5) < 1e-12


def test_unprunable_model_is_a_clear_error():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 10)

        def get_classifier(self):
            return self.fc

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    with pytest.raises(UserError, match="no prunable channels"):
        prune_once(Tiny(), 0.5, PruneSettings(), SHAPE)


FAMILIES = [
    "resnet20",
    "preact_resnet20",
    "wrn_16_2",
    "resnext29_4x16d",
    "se_resnet20",
    "densenet40_12",
    "pyramidnet20_a48",
    "highway_conv",
    "shake_resnet26_2x32d",
    "resnet110_sd",
    "plain20",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_pruning_every_family(name, tmp_path):
    """Forward, BN-free ONNX export with ONNX Runtime parity, and a bit-identical rebuild from spec + weights."""
    if not is_registered(name):
        pytest.skip(f"{name} is not registered in this build")
    m = _model(name)
    p = pruned_copy(m, 0.3, PruneSettings(round_to=8), SHAPE)
    assert size_of(p, SHAPE)["macs"] < size_of(m, SHAPE)["macs"]
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        out = p(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    path = tmp_path / "p.onnx"
    export_onnx(fold_bn(p), x[:2], path)
    assert op_counts(path).get("BatchNormalization", 0) == 0
    assert relative_error(OrtRunner(path)(x.numpy()), out.numpy()) < 1e-4
    save_model(p, tmp_path / "model", name, {"num_classes": 10})
    again = load_model(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_removable_blocks_are_the_identity_shortcut_ones():
    from deploycraft.pruning import removable_blocks

    names = removable_blocks(_model("resnet20"), SHAPE)
    assert list(names) == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert names["layer1.0"] == 16 * 16 * 16 and names["layer3.1"] == 64 * 4 * 4
    if is_registered("preact_resnet20"):
        assert len(removable_blocks(_model("preact_resnet20"), SHAPE)) == 7


def test_block_removal_is_exact_and_persists(tmp_path):
    from deploycraft.pruning import block_scores, remove_blocks

    m = _model()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        skip_hook = m.layer2[1].register_forward_hook(lambda _m, args, _out: args[0])
        bypassed = m(x)
        skip_hook.remove()
    batches = [(x, torch.randint(0, 10, (4,)))]
    scores = block_scores(m, ["layer1.0", "layer2.1"], batches)
    assert set(scores) == {"layer1.0", "layer2.1"}
    remove_blocks(m, ["layer2.1"])
    with torch.no_grad():
        torch.testing.assert_close(m(x), bypassed)
    save_model(m, tmp_path / "m", "resnet20", {"num_classes": 10})
    again = load_model(tmp_path / "m")
    assert isinstance(again.layer2[1], nn.Identity)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    assert size_of(m, SHAPE)["macs"] < size_of(_model(), SHAPE)["macs"]
