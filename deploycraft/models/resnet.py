"""ResNet and the variants that share its post-activation block (He et al. 2016).

One `ResNet` class builds ResNet-18..152 (ImageNet layout), the CIFAR ResNets (6n+2 layers),
ResNeXt (grouped 3x3, Xie et al. 2017), Wide ResNet-50-2 (wider bottleneck, Zagoruyko &
Komodakis 2016), SE-ResNet/SE-ResNeXt (Hu et al. 2018), stochastic depth (Huang et al. 2016) and
the plain networks of He et al. 2016 (the same layers without shortcuts): the variants are
constructor arguments. State-dict keys follow torchvision (conv1, bn1,
layer1.0.conv1, layer1.0.downsample.0, fc), so torchvision checkpoints load with strict=True.

Registered entrypoints only fill in arguments:
- ImageNet layout, torchvision names: resnet18..152, wide_resnet50_2/101_2, resnext50_32x4d,
  resnext101_32x8d, resnext101_64x4d; SE-ResNet-50 and SE-ResNeXt-50 (32x4d).
- CIFAR layout: resnet20..110 (He et al. 2016, section 4.2), se_resnet20/56/110, ResNeXt-29
  (Xie et al. 2017, section 5.3) and resnet110_sd (stochastic depth, Huang et al. 2016).
- Plain CIFAR nets (family "plain"): plain20..110, resnet20..110 with ``shortcut="none"``, the
  baselines of He et al. 2016 (Fig. 6 and 7) for the degradation problem.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import (
    PadShortcut,
    ResidualAdd,
    SqueezeExcite,
    StochasticDepth,
    conv1x1,
    conv3x3,
    linear_survival_probs,
    resnet_stem,
)
from deploycraft.models.registry import register_model

Shortcut = Literal["A", "B", "C", "none"]
SHORTCUTS = ("A", "B", "C", "none")


def make_shortcut(cin: int, cout: int, stride: int, option: Shortcut) -> nn.Module | None:
    """Shortcut options of He et al. 2016: A zero-pad, B project where the shape changes, C always project.

    "none" has no shortcut at all (a plain network); the block then has no residual add either.
    """
    changes_shape = stride != 1 or cin != cout
    if option == "none":
        return None
    if option == "A":
        return PadShortcut(cin, cout, stride) if changes_shape else None
    if option == "B" and not changes_shape:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# Hidden width of the SE gate. Hu et al. 2018 use C/r with r = 16. At ImageNet widths (C >= 256) that is
# exactly what SqueezeExcite builds, so SE-ResNet-50 / SE-ResNeXt-50 match the paper's 28.1 M / 27.6 M.
# The CIFAR stages (16/32/64 channels) would get 1/2/4 hidden units: a one-unit gate makes every channel's
# scale a function of one scalar, and a dead ReLU there freezes the gate. We keep SqueezeExcite's floor of
# 8 hidden units instead; the paper gives no CIFAR parameter counts, and the floor adds 20 k parameters to
# SE-ResNet-110 (1.2 %).
SE_MIN_HIDDEN = 8


def make_se(channels: int, reduction: int | None) -> SqueezeExcite | None:
    """The SE gate on a block's residual branch (before the add), or None without SE."""
    return SqueezeExcite(channels, reduction, min_channels=SE_MIN_HIDDEN) if reduction else None


def _drop_path(survival_prob: float, shortcut: Shortcut) -> StochasticDepth | None:
    """Stochastic depth on the residual branch; a plain block has no branch to drop (its output is the net's path)."""
    if survival_prob >= 1.0:
        return None
    if shortcut == "none":
        raise ValueError("stochastic depth needs a shortcut: a plain network (shortcut='none') cannot drop blocks")
    return StochasticDepth(survival_prob)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut = "B",
        groups: int = 1,
        base_width: int = 64,
        se_reduction: int | None = None,
        survival_prob: float = 1.0,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64 (use Bottleneck for ResNeXt/WRN)")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = make_se(planes, se_reduction)
        self.downsample = make_shortcut(inplanes, planes, stride, shortcut)
        self.drop_path = _drop_path(survival_prob, shortcut)
        self.add = ResidualAdd(act=True) if shortcut != "none" else None

    def zero_init_last(self) -> None:
        # A plain block whose last BN starts at zero would output zeros: every layer after it sees a constant.
        if self.add is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        if self.add is None:  # plain: the ReLU follows the BN directly (He et al. 2016, Fig. 3 middle)
            return self.relu(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        skip = self.downsample(x) if self.downsample is not None else x
        return self.add(out, skip)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt) -> 1x1 expand; stride on the 3x3 (torchvision's "v1.5")."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut = "B",
        groups: int = 1,
        base_width: int = 64,
        se_reduction: int | None = None,
        survival_prob: float = 1.0,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        outplanes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=False)
        self.se = make_se(outplanes, se_reduction)
        self.downsample = make_shortcut(inplanes, outplanes, stride, shortcut)
        self.drop_path = _drop_path(survival_prob, shortcut)
        self.add = ResidualAdd(act=True) if shortcut != "none" else None

    def zero_init_last(self) -> None:
        if self.add is not None:  # see BasicBlock.zero_init_last
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.add is None:
            return self.relu(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        skip = self.downsample(x) if self.downsample is not None else x
        return self.add(out, skip)


class ResNet(ClassifierNet):
    """Post-activation ResNet.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage.
        widths: base widths per stage (64,128,256,512 ImageNet; 16,32,64 CIFAR).
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
        shortcut: "A" zero-pad, "B" projection where the shape changes (default), "C" projection always,
            "none" no shortcut and no residual add: the plain network of He et al. 2016.
        groups, base_width: ResNeXt cardinality and width per group; WRN-50-2 is base_width=128.
        se_reduction: add an SE gate to every block with this reduction (16 in the paper).
        final_survival_prob: stochastic depth p_L; survival decays linearly over blocks to it.
        zero_init_residual: zero the last BN of each residual branch so every block starts as the
            identity ("improves the model by 0.2~0.3%", Goyal et al. 2017, torchvision).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        shortcut: Shortcut = "B",
        groups: int = 1,
        base_width: int = 64,
        se_reduction: int | None = None,
        final_survival_prob: float = 1.0,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"{len(layers)} stages need {len(layers)} widths, got {widths}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(map(repr, SHORTCUTS))}, got {shortcut!r}")
        self.num_classes = num_classes
        stem_width = widths[0]
        self.conv1, self.maxpool = resnet_stem(stem, in_chans, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=False)

        survival = linear_survival_probs(sum(layers), final_survival_prob)
        inplanes, block_idx = stem_width, 0
        for i, (n, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 1 if i == 0 or j > 0 else 2
                blocks.append(
                    block(
                        inplanes,
                        planes,
                        stride,
                        shortcut=shortcut,
                        groups=groups,
                        base_width=base_width,
                        se_reduction=se_reduction,
                        survival_prob=survival[block_idx],
                    )
                )
                inplanes = planes * block.expansion
                block_idx += 1
            name = f"layer{i + 1}"
            self.add_stage(name, blocks)
        self.build_head(inplanes, num_classes)

        self.initialize(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.run_stages(x)
        return x


def _imagenet(block, layers, **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


def _cifar_resnext(cardinality: int, width: int, **kwargs) -> ResNet:
    """ResNeXt-29 for CIFAR (Xie et al. 2017, section 5.3): a 3x3 conv with 64 channels, 3 stages of 3
    bottleneck blocks with outputs 256/512/1024, grouped 3x3 of cardinality x width channels in the first
    stage (doubling per stage), global pooling and the classifier: 1 + 9 * 3 + 1 = 29 layers."""
    # Bottleneck's grouped width is int(planes * base_width / 64) * groups: planes 64/128/256 (x4 = the
    # paper's output widths) with base_width = d give C*d, 2*C*d, 4*C*d, as in the paper's template.
    return ResNet(
        Bottleneck, (3, 3, 3), widths=(64, 128, 256), stem="cifar", groups=cardinality, base_width=width, **kwargs
    )


def _cifar(depth: int, **kwargs) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("widths", (16, 32, 64))
    return ResNet(BasicBlock, (n, n, n), stem="cifar", **kwargs)


# ImageNet layout (torchvision names and key format) -------------------------------------------


@register_model("resnet")
def resnet18(**kwargs) -> ResNet:
    return _imagenet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("resnet")
def resnet34(**kwargs) -> ResNet:
    return _imagenet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model("resnet")
def resnet50(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model("resnet")
def resnet101(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model("resnet")
def resnet152(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 8, 36, 3), **kwargs)


# Wide ResNet-50-2 / 101-2 (Zagoruyko & Komodakis 2016, torchvision's ImageNet version): the bottleneck's
# inner width is doubled (base_width 128), its input and output widths are those of ResNet-50/101.


@register_model("resnet")
def wide_resnet50_2(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 6, 3), base_width=128, **kwargs)


@register_model("resnet")
def wide_resnet101_2(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 23, 3), base_width=128, **kwargs)


# ResNeXt (Xie et al. 2017): "CxWd" = cardinality C, W channels per group in the first stage's 3x3.


@register_model("resnet")
def resnext50_32x4d(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 6, 3), groups=32, base_width=4, **kwargs)


@register_model("resnet")
def resnext101_32x8d(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 23, 3), groups=32, base_width=8, **kwargs)


@register_model("resnet")
def resnext101_64x4d(**kwargs) -> ResNet:
    return _imagenet(Bottleneck, (3, 4, 23, 3), groups=64, base_width=4, **kwargs)


# SE-ResNet / SE-ResNeXt (Hu et al. 2018): an SE gate (r = 16) on every residual branch, before
# the add. Keys are torchvision's plus layerX.Y.se.fc1/fc2.


@register_model("resnet")
def se_resnet50(**kwargs) -> ResNet:
    kwargs.setdefault("se_reduction", 16)
    return _imagenet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model("resnet")
def se_resnext50_32x4d(**kwargs) -> ResNet:
    kwargs.setdefault("se_reduction", 16)
    return _imagenet(Bottleneck, (3, 4, 6, 3), groups=32, base_width=4, **kwargs)


# CIFAR layout (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, depth 6n+2 ---------


@register_model("resnet", input_style="cifar")
def resnet20(**kwargs) -> ResNet:
    return _cifar(20, **kwargs)


@register_model("resnet", input_style="cifar")
def resnet32(**kwargs) -> ResNet:
    return _cifar(32, **kwargs)


@register_model("resnet", input_style="cifar")
def resnet44(**kwargs) -> ResNet:
    return _cifar(44, **kwargs)


@register_model("resnet", input_style="cifar")
def resnet56(**kwargs) -> ResNet:
    return _cifar(56, **kwargs)


@register_model("resnet", input_style="cifar")
def resnet110(**kwargs) -> ResNet:
    return _cifar(110, **kwargs)


# SE-ResNets on CIFAR (Hu et al. 2018 report SE-ResNet-110 on CIFAR-10/100): the CIFAR ResNets with an
# SE gate (r = 16, hidden width floored at SE_MIN_HIDDEN) on every basic block.


@register_model("resnet", input_style="cifar")
def se_resnet20(**kwargs) -> ResNet:
    kwargs.setdefault("se_reduction", 16)
    return _cifar(20, **kwargs)


@register_model("resnet", input_style="cifar")
def se_resnet56(**kwargs) -> ResNet:
    kwargs.setdefault("se_reduction", 16)
    return _cifar(56, **kwargs)


@register_model("resnet", input_style="cifar")
def se_resnet110(**kwargs) -> ResNet:
    kwargs.setdefault("se_reduction", 16)
    return _cifar(110, **kwargs)


# ResNeXt-29 on CIFAR (Xie et al. 2017, section 5.3 and Table 7) ------------------------------------


@register_model("resnet", input_style="cifar")
def resnext29_8x64d(**kwargs) -> ResNet:
    """ResNeXt-29, 8x64d: 34.4 M parameters (Xie et al. 2017, Table 7)."""
    return _cifar_resnext(8, 64, **kwargs)


@register_model("resnet", input_style="cifar")
def resnext29_16x64d(**kwargs) -> ResNet:
    """ResNeXt-29, 16x64d: 68.1 M parameters (Xie et al. 2017, Table 7)."""
    return _cifar_resnext(16, 64, **kwargs)


@register_model("resnet", input_style="cifar")
def resnext29_4x16d(**kwargs) -> ResNet:
    """ResNeXt-29, 4x16d: a scaled-down configuration for quick training, not from the paper.

    Same template as resnext29_8x64d (stem 64, outputs 256/512/1024) with cardinality 4 and 16 channels
    per group, so the grouped 3x3s have 64/128/256 channels.
    """
    return _cifar_resnext(4, 16, **kwargs)


# Stochastic depth (Huang et al. 2016) -----------------------------------------------------------------


@register_model("resnet", input_style="cifar")
def resnet110_sd(**kwargs) -> ResNet:
    """CIFAR ResNet-110 trained with stochastic depth, p_L = 0.5 with the linear decay rule (Huang et al.
    2016, section 4). Any CIFAR ResNet takes ``final_survival_prob`` the same way."""
    kwargs.setdefault("final_survival_prob", 0.5)
    # Huang et al. replace the identity of the two transitional blocks by a stride-2 1x1 average pool
    # (a subsampling) plus zero-padded channels: He et al.'s option A, parameter-free.
    kwargs.setdefault("shortcut", "A")
    return _cifar(110, **kwargs)


# Plain networks (He et al. 2016, section 4.2 and Fig. 6): the CIFAR ResNets without their shortcuts. The stage
# openers' stride-2 3x3 convs change the width themselves, so nothing else changes; at 56 layers and more
# they train to a higher training error than their 20-layer version (the degradation problem).


def _cifar_plain(depth: int, **kwargs) -> ResNet:
    if "shortcut" in kwargs:
        raise TypeError("plain networks have no shortcut argument (use resnet* for shortcut options)")
    return _cifar(depth, shortcut="none", **kwargs)


@register_model("plain", input_style="cifar")
def plain20(**kwargs) -> ResNet:
    return _cifar_plain(20, **kwargs)


@register_model("plain", input_style="cifar")
def plain32(**kwargs) -> ResNet:
    return _cifar_plain(32, **kwargs)


@register_model("plain", input_style="cifar")
def plain44(**kwargs) -> ResNet:
    return _cifar_plain(44, **kwargs)


@register_model("plain", input_style="cifar")
def plain56(**kwargs) -> ResNet:
    return _cifar_plain(56, **kwargs)


@register_model("plain", input_style="cifar")
def plain110(**kwargs) -> ResNet:
    return _cifar_plain(110, **kwargs)
