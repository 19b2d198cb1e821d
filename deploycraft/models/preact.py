"""Pre-activation ResNet and Wide ResNet: the residual unit with BN -> ReLU -> conv ordering.

Papers:
- He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027).
  The unit computes ``x + F(x)`` with F = (BN -> ReLU -> conv) x 2 (basic) or x 3 (bottleneck): nothing
  follows the addition, so the shortcut is a pure identity from any unit to any later one, which is
  what lets the 1001-layer network train (their Eq. 4-5). A final BN -> ReLU precedes the pooling.
- Zagoruyko & Komodakis. "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146). WRN-d-k: the same
  pre-activation basic unit, stage widths 16k, 32k, 64k after a 16-channel stem, n = (d - 4) / 6 units
  per stage, and optional dropout between the two convs of a unit.
- Huang, Sun, Liu, Sedra, Weinberger. "Deep Networks with Stochastic Depth", ECCV 2016
  (arXiv:1603.09382): ``final_survival_prob`` drops whole branches with the linear decay rule.

One `PreActResNet` class builds all of them; the variants are constructor arguments. Key names follow
the torchvision ResNet where the layer has the same role (conv1, bn1, layer1.0.conv1, fc); the
projection shortcut is a bare 1x1 conv at ``downsample`` (no BN of its own, as in the authors' code:
it reads the unit's pre-activated input).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import (
    ResidualAdd,
    StochasticDepth,
    conv1x1,
    conv3x3,
    linear_survival_probs,
    resnet_stem,
)
from deploycraft.models.registry import register_model


def _projection(cin: int, cout: int, stride: int) -> nn.Conv2d | None:
    # He et al. 2016b use identity shortcuts everywhere except where the shape changes (1x1 conv there).
    return conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None


class PreActBasicBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3, plus the shortcut; no ReLU after the add.

    Args:
        preact: apply the unit's own BN -> ReLU to its input. False only for the first unit of the
            network, whose input is the stem's BN -> ReLU output already.
        dropout: dropout probability between the two convs (WRN); 0 builds no dropout layer.
        survival_prob: stochastic-depth survival probability of the branch; 1 builds no layer.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        preact: bool = True,
        dropout: float = 0.0,
        survival_prob: float = 1.0,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes) if preact else None
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = conv3x3(planes, planes)
        self.downsample = _projection(inplanes, planes, stride)
        self.drop_path = StochasticDepth(survival_prob) if survival_prob < 1.0 else None
        self.add = ResidualAdd(act=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x)) if self.bn1 is not None else x
        # The projection reads the pre-activated input (He et al. 2016b, fb.resnet.torch "both_preact");
        # an identity shortcut carries the raw sum, which keeps the path from unit to unit a pure identity.
        skip = self.downsample(act) if self.downsample is not None else x
        out = self.relu(self.bn2(self.conv1(act)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.add(out, skip)


class PreActBottleneck(nn.Module):
    """BN -> ReLU -> conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> [dropout] -> conv1x1 (x4)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        preact: bool = True,
        dropout: float = 0.0,
        survival_prob: float = 1.0,
    ):
        super().__init__()
        outplanes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes) if preact else None
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Stride on the 3x3 as in the authors' released code, not on the first 1x1.
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv3 = conv1x1(planes, outplanes)
        self.downsample = _projection(inplanes, outplanes, stride)
        self.drop_path = StochasticDepth(survival_prob) if survival_prob < 1.0 else None
        self.add = ResidualAdd(act=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x)) if self.bn1 is not None else x
        skip = self.downsample(act) if self.downsample is not None else x
        out = self.relu(self.bn2(self.conv1(act)))
        out = self.relu(self.bn3(self.conv2(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv3(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.add(out, skip)


class PreActResNet(ClassifierNet):
    """Pre-activation ResNet (He et al. 2016b); Wide ResNets (Zagoruyko & Komodakis 2016) are one layout of it.

    The stem is conv -> BN -> ReLU (+ 3x3/2 max-pool for ImageNet) and the first unit skips its own
    pre-activation: "for the first Residual Unit (that follows a stand-alone convolutional layer,
    conv1), we adopt the first activation right after conv1 and before splitting into two paths"
    (He et al. 2016b). Same parameter count as BN inside the first unit; the stem BN also
    folds into conv1 at export, which a BN inside the unit could not when the unit's shortcut is an
    identity (conv1's output would have two readers).

    Args:
        block: PreActBasicBlock or PreActBottleneck.
        layers: units per stage.
        widths: base widths per stage (outputs are ``width * block.expansion``).
        stem_width: channels of the stem conv; default widths[0] (WRN passes 16 whatever k is).
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
        dropout: dropout between the convs of every unit (WRN uses 0.3 on CIFAR); 0 disables it.
        final_survival_prob: stochastic depth p_L; survival decays linearly over the units to it.
        zero_init_residual: zero the last conv of every branch so each unit starts as the identity
            (default; False gives the papers' plain He init).
    """

    def __init__(
        self,
        block: type[PreActBasicBlock] | type[PreActBottleneck],
        layers: tuple[int, ...],
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem_width: int | None = None,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        dropout: float = 0.0,
        final_survival_prob: float = 1.0,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"{len(layers)} stages need {len(layers)} widths, got {widths}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        stem_width = stem_width or widths[0]
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
                        preact=block_idx > 0,
                        dropout=dropout,
                        survival_prob=survival[block_idx],
                    )
                )
                inplanes = planes * block.expansion
                block_idx += 1
            name = f"layer{i + 1}"
            self.add_stage(name, blocks)
        # Nothing follows the last addition inside the units, so the features get their BN -> ReLU here
        # ("an extra activation right after its element-wise addition", He et al. 2016b).
        self.final_bn = nn.BatchNorm2d(inplanes)
        self.build_head(inplanes, num_classes)

        # On by default, unlike the papers (plain He init). Without a BN at the end of the branch nothing
        # bounds a unit's output before the first training step: with BN running statistics at their
        # initial (0, 1), each unit adds a branch about as large as its input, so the residual stream grows
        # ~sqrt(2) per unit in eval mode (measured: logits ~1e6 for preact_resnet110; preact_resnet1001
        # overflows to inf/NaN in its third stage). Every fresh-model check (eval before training, export parity,
        # calibration) would see that. A zero last conv makes each unit the identity at init, the Fixup
        # (Zhang et al. 2019) / SkipInit (De & Smith 2020) practice for deep residual nets and the
        # counterpart of ResNet's zero last-BN gamma (Goyal et al. 2017); the conv still gets gradient
        # at the first step. In training mode BN normalises each branch input, so both inits train;
        # ``zero_init_residual=False`` reproduces the papers' init exactly.
        self.initialize(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.run_stages(x)
        return self.relu(self.final_bn(x))


def _cifar(depth: int, bottleneck: bool, **kwargs) -> PreActResNet:
    # Basic units have 2 convs (depth 6n+2), bottleneck units 3 (depth 9n+2); +2 = stem conv and fc.
    convs = 3 if bottleneck else 2
    if (depth - 2) % (3 * convs) != 0:
        raise ValueError(f"CIFAR pre-activation ResNet depth must be {3 * convs}n+2, got {depth}")
    n = (depth - 2) // (3 * convs)
    kwargs.setdefault("widths", (16, 32, 64))
    block = PreActBottleneck if bottleneck else PreActBasicBlock
    return PreActResNet(block, (n, n, n), stem="cifar", **kwargs)


def _wrn(depth: int, widen: int, **kwargs) -> PreActResNet:
    # The paper's depth convention (its code asserts depth = 6n + 4): n = (d - 4) / 6 units per stage.
    if (depth - 4) % 6 != 0:
        raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    return PreActResNet(PreActBasicBlock, (n, n, n), widths=widths, stem_width=16, stem="cifar", **kwargs)


# ImageNet layout: ResNet's stage widths and units, pre-activation units -------------------------


@register_model("preact")
def preact_resnet18(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("preact")
def preact_resnet34(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBasicBlock, (3, 4, 6, 3), **kwargs)


@register_model("preact")
def preact_resnet50(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBottleneck, (3, 4, 6, 3), **kwargs)


@register_model("preact")
def preact_resnet101(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBottleneck, (3, 4, 23, 3), **kwargs)


@register_model("preact")
def preact_resnet152(**kwargs) -> PreActResNet:
    return PreActResNet(PreActBottleneck, (3, 8, 36, 3), **kwargs)


# CIFAR layout (He et al. 2016b): 16/32/64 base widths, basic 6n+2 or bottleneck 9n+2 ---------------


@register_model("preact", input_style="cifar")
def preact_resnet20(**kwargs) -> PreActResNet:
    return _cifar(20, bottleneck=False, **kwargs)


@register_model("preact", input_style="cifar")
def preact_resnet56(**kwargs) -> PreActResNet:
    return _cifar(56, bottleneck=False, **kwargs)


@register_model("preact", input_style="cifar")
def preact_resnet110(**kwargs) -> PreActResNet:
    return _cifar(110, bottleneck=False, **kwargs)


@register_model("preact", input_style="cifar")
def preact_resnet164(**kwargs) -> PreActResNet:
    return _cifar(164, bottleneck=True, **kwargs)


@register_model("preact", input_style="cifar")
def preact_resnet1001(**kwargs) -> PreActResNet:
    return _cifar(1001, bottleneck=True, **kwargs)


# Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) ----------------------------------------------


@register_model("wrn", input_style="cifar")
def wrn_16_2(**kwargs) -> PreActResNet:
    return _wrn(16, 2, **kwargs)


@register_model("wrn", input_style="cifar")
def wrn_16_4(**kwargs) -> PreActResNet:
    return _wrn(16, 4, **kwargs)


@register_model("wrn", input_style="cifar")
def wrn_16_8(**kwargs) -> PreActResNet:
    return _wrn(16, 8, **kwargs)


@register_model("wrn", input_style="cifar")
def wrn_28_10(**kwargs) -> PreActResNet:
    return _wrn(28, 10, **kwargs)


@register_model("wrn", input_style="cifar")
def wrn_40_4(**kwargs) -> PreActResNet:
    return _wrn(40, 4, **kwargs)
