"""Shake-Shake (Gastaldi 2017): forward alpha / backward beta, eval mean, shortcut, published sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deploycraft.models import create_model
from deploycraft.models.profile import count_params
from deploycraft.models.shakeshake import ShakeBlock, ShakeResNet, ShakeShortcut
from deploycraft.quant.graph import ChannelAffine, fold_bn
from tests.conftest import randomize_bn


@pytest.mark.parametrize("name, millions", [("shake_resnet26_2x32d", 2.9), ("shake_resnet26_2x96d", 26.2)])
def test_published_param_counts(name, millions):
    assert abs(count_params(create_model(name, num_classes=10)) / 1e6 - millions) < 0.1


def _record_branches(block: ShakeBlock) -> dict:
    """Branch outputs of the next forward, and the gradients that reach them in the backward."""
    seen: dict = {}

    def hook(name):
        def fn(_module, _inp, out):
            seen[name] = out.detach().clone()
            if out.requires_grad:
                out.register_hook(lambda g: seen.__setitem__(f"grad_{name}", g.clone()))

        return fn

    block.branch1.register_forward_hook(hook("b1"))
    block.branch2.register_forward_hook(hook("b2"))
    return seen


def test_forward_mixes_with_alpha_and_backward_with_beta():
    torch.manual_seed(0)
    block = ShakeBlock(8, 8).train()
    seen = _record_branches(block)
    x = torch.randn(4, 8, 6, 6)
    y = block(x)
    alpha, beta = block.shake.last_alpha, block.shake.last_beta
    assert alpha.shape == beta.shape == (4, 1, 1, 1)  # one coefficient per image
    assert torch.allclose(y - x, alpha * seen["b1"] + (1 - alpha) * seen["b2"], atol=1e-6)

    upstream = torch.randn_like(y)  # the add has no ReLU, so this gradient reaches the mix unchanged
    (y * upstream).sum().backward()
    assert torch.allclose(seen["grad_b1"], beta * upstream, atol=1e-6)
    assert torch.allclose(seen["grad_b2"], (1 - beta) * upstream, atol=1e-6)
    # alpha and beta are independent draws: the gradient the forward coefficients would give differs.
    assert (alpha - beta).abs().max() > 0.05
    assert not torch.allclose(seen["grad_b1"], alpha * upstream, atol=1e-3)
    assert not torch.allclose(seen["grad_b2"], (1 - alpha) * upstream, atol=1e-3)


def test_eval_is_the_branch_mean_plus_shortcut_and_deterministic():
    torch.manual_seed(0)
    for block, x in [
        (ShakeBlock(8, 8), torch.randn(2, 8, 6, 6)),
        (ShakeBlock(8, 16, stride=2), torch.randn(2, 8, 6, 6)),
    ]:
        randomize_bn(block)
        block.eval()
        seen = _record_branches(block)
        with torch.no_grad():
            y = block(x)
            skip = block.shortcut(x) if block.shortcut is not None else x
            assert torch.allclose(y, 0.5 * (seen["b1"] + seen["b2"]) + skip, atol=1e-6)
            assert torch.equal(block(x), y)


def test_training_forwards_depend_on_the_seed():
    model = ShakeResNet(blocks_per_stage=1, base_width=8, num_classes=10).train()
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        outs.append(model(x))
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert torch.equal(outs[0], outs[2])


def test_downsampling_shortcut_samples_even_and_shifted_odd_pixels():
    torch.manual_seed(0)
    shortcut = ShakeShortcut(4, 8, stride=2).eval()  # fresh BN: y = x / sqrt(1 + eps)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = shortcut(x)
        scale = 1 / (1 + shortcut.bn_a.eps) ** 0.5
        flow_a = F.conv2d(x[:, :, ::2, ::2], shortcut.conv_a.weight) * scale
        # Shifted 1 px right and down, then subsampled: output pixel i reads input pixel 2i - 1.
        flow_b = F.conv2d(x[:, :, 1:-1:2, 1:-1:2], shortcut.conv_b.weight) * scale
    assert out.shape == (2, 8, 4, 4)
    assert torch.allclose(out[:, :4], flow_a, atol=1e-6)
    assert torch.allclose(out[:, 4:, 1:, 1:], flow_b, atol=1e-6)
    assert torch.count_nonzero(out[:, 4:, 0, :]) == 0 and torch.count_nonzero(out[:, 4:, :, 0]) == 0
    with pytest.raises(ValueError):
        ShakeShortcut(4, 7, stride=2)


def test_every_batchnorm_folds_into_a_conv():
    torch.manual_seed(0)
    model = ShakeResNet(blocks_per_stage=1, base_width=8, num_classes=10).eval()
    randomize_bn(model)
    gm = fold_bn(model)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, ChannelAffine)) for m in gm.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_fmnist_shape_one_channel_28px():
    model = create_model("shake_resnet26_2x32d", num_classes=10, in_chans=1).train()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_depth_is_rejected():
    from deploycraft.models.shakeshake import _shake_resnet

    with pytest.raises(ValueError, match="6n\\+2"):
        _shake_resnet(27, 32)
