"""BatchNorm folding: same outputs, no BatchNorm left anywhere."""

from __future__ import annotations

import torch
import torch.nn as nn

from deploycraft.models import create_model
from deploycraft.models.layers import StochasticDepth
from deploycraft.quant.graph import ChannelAffine, fold_bn
from tests.conftest import randomize_bn


def _no_bn(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_resnet20_exact(tiny_resnet):
    folded = fold_bn(tiny_resnet)
    x = torch.randn(4, 3, 16, 16)
    assert _no_bn(folded)
    torch.testing.assert_close(folded(x), tiny_resnet(x), rtol=1e-5, atol=1e-5)


def test_fold_resnet50_exact():
    model = create_model("resnet50", num_classes=10).eval()
    randomize_bn(model, seed=1)
    x = torch.randn(2, 3, 64, 64)
    folded = fold_bn(model)
    assert _no_bn(folded)
    ref = model(x)
    assert (folded(x) - ref).abs().max() / ref.abs().max() < 1e-5


def test_original_model_untouched(tiny_resnet):
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    fold_bn(tiny_resnet)
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class PreAct(nn.Module):
    """BN -> ReLU -> Conv: the BN cannot go into a conv and must become a channel affine."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


def test_standalone_bn_becomes_affine():
    model = PreAct().eval()
    randomize_bn(model)
    folded = fold_bn(model)
    assert _no_bn(folded) and any(isinstance(m, ChannelAffine) for m in folded.modules())
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_stochastic_depth_scale_folds_into_bn():
    model = create_model("resnet20", num_classes=10, final_survival_prob=0.5).eval()
    randomize_bn(model)
    assert any(isinstance(m, StochasticDepth) for m in model.modules())
    folded = fold_bn(model)
    assert not any(isinstance(m, StochasticDepth) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_channel_affine_has_no_autograd_history():
    """A BN that no conv absorbs becomes buffers without the BN's autograd history: the folded graph can be copied
    (QAT's control) and trained step after step (a second backward used to reach the freed BN graph)."""
    import copy

    model = create_model("preact_resnet20", num_classes=10, in_chans=3).eval()
    gm = fold_bn(model).train()
    assert any(isinstance(m, ChannelAffine) for m in gm.modules())
    assert not any(b.requires_grad for b in gm.buffers())
    copy.deepcopy(gm)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        gm(x).sum().backward()


def test_the_convs_a_bn_folds_into_are_found_from_the_graph_alone():
    """``folded_conv_paths`` (preflight's check for qat.bn_fold: after, on the meta device) names the convs that
    ``fold_bn`` records with their BN, and a standalone BN (pre-activation) is not one of them."""
    from deploycraft.quant.graph import folded_conv_paths

    def resnet20():
        return create_model("resnet20", num_classes=10, final_survival_prob=0.5)

    for build, count in ((resnet20, 21), (PreAct, 0)):
        record: dict = {}
        fold_bn(build().eval(), record)
        with torch.device("meta"):
            meta = build()
        assert folded_conv_paths(meta) == list(record) and len(record) == count
        assert all(isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) for c, b in record.values())
