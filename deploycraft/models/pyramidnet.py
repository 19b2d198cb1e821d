"""PyramidNet: residual units whose width grows a little at every unit (Han, Kim & Kim 2017).

D. Han, J. Kim, J. Kim, "Deep Pyramidal Residual Networks", CVPR 2017 (arXiv:1610.02915).

Instead of doubling the width at the few units that downsample, the additive PyramidNet widens
every unit by alpha / N channels, so the width goes linearly from d0 = 16 to d0 + alpha over the N
units. The unit (the paper's Fig. 6(d)) is BN -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN, with no ReLU
after the addition; the bottleneck unit is BN -> 1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN
with 4x expansion. Shortcuts are identities with zero-padded channels (the paper's Sec. 3.2: no
projections), plus 2x2 average pooling where the spatial size halves. One `PyramidNet` class builds
the basic and bottleneck variants; stochastic depth (Huang et al. 2016) is a constructor argument.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import (
    CompositeLayer,
    ResidualAdd,
    StochasticDepth,
    conv1x1,
    conv3x3,
    linear_survival_probs,
)
from deploycraft.models.registry import register_model

D0 = 16  # width of the stem and the starting width of the pyramid (the paper's d_0 for CIFAR)


def pyramid_widths(n_units: int, alpha: float, d0: int = D0) -> list[int]:
    """Widths d_1..d_N of the additive pyramid: d_k = floor(d0 + alpha * k / N) (the paper's Eq. 2).

    The paper floors a running width that grows by alpha / N per unit. Done in floating point, that
    sum drifts just below integers (alpha=48, N=54 reaches 63.99999999999989 at k=54, so the last
    unit would get 63 channels instead of 64), so the running width is kept as an exact fraction.
    """
    if n_units <= 0:
        raise ValueError(f"a pyramid needs at least one residual unit, got {n_units}")
    if alpha < 0:
        raise ValueError(f"the widening factor alpha must be >= 0, got {alpha}")
    step = Fraction(alpha) / n_units
    width, widths = Fraction(d0), []
    for _ in range(n_units):
        width += step
        widths.append(math.floor(width))
    return widths


class PyramidShortcut(CompositeLayer):
    """Zero-padded identity shortcut: 2x2 average pooling where the unit downsamples, then zero channels.

    The channel counts are ints fixed at construction (no shape arithmetic in forward). It is an fx
    leaf like `PadShortcut`, so quantization and export see one shortcut node feeding the add.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"a zero-padding shortcut can only widen ({in_channels} -> {out_channels} channels)")
        if stride not in (1, 2):
            raise ValueError(f"PyramidNet units use stride 1 or 2, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        # ceil_mode keeps odd sizes aligned with the stride-2 3x3 conv of the branch (7 px -> 4 px);
        # a partial edge window then averages its real pixels (count_include_pad=False says so; with
        # no padding torch and ONNX Runtime compute that either way, checked at 9 px).
        self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        extra = self.out_channels - self.in_channels
        if extra > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


class PyramidBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN, added to the zero-padded shortcut without a ReLU.

    The paper (Sec. 3.3, Fig. 6) finds that removing the first ReLU and the ReLU after the addition,
    and adding a BN after the last conv, works best for this unit.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, survival_prob: float = 1.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = PyramidShortcut(inplanes, planes, stride)
        self.drop_path = StochasticDepth(survival_prob) if survival_prob < 1.0 else None
        self.add = ResidualAdd(act=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.bn3(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.add(out, self.shortcut(x))


class PyramidBottleneck(nn.Module):
    """BN -> 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN; no ReLU after the add."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, survival_prob: float = 1.0):
        super().__init__()
        outplanes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn4 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = PyramidShortcut(inplanes, outplanes, stride)
        self.drop_path = StochasticDepth(survival_prob) if survival_prob < 1.0 else None
        self.add = ResidualAdd(act=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn4.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        out = self.bn4(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.add(out, self.shortcut(x))


class PyramidNet(ClassifierNet):
    """Additive PyramidNet, CIFAR layout: 3x3 stem conv (16) -> BN, 3 stages of units, BN -> ReLU -> pool -> FC.

    Args:
        block: PyramidBasicBlock (depth 6n+2) or PyramidBottleneck (depth 9n+2).
        units_per_stage: n, the number of units in each of the 3 stages (N = 3n units in all).
        alpha: the widening factor; the last unit is d0 + alpha wide (times 4 for bottlenecks).
        final_survival_prob: stochastic depth p_L; survival decays linearly over the N units to it.
        zero_init_residual: zero the last BN of every unit. Off by default, as in the paper: with
            zero-padded shortcuts the new channels would then be exactly zero at init, and the next
            unit's first BN divides them by sqrt(eps), amplifying their gradient ~300x in step one.
    """

    def __init__(
        self,
        block: type[PyramidBasicBlock] | type[PyramidBottleneck],
        units_per_stage: int,
        alpha: float,
        num_classes: int = 10,
        in_chans: int = 3,
        final_survival_prob: float = 1.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        n_units = 3 * units_per_stage
        self.widths = pyramid_widths(n_units, alpha)
        self.survival_probs = linear_survival_probs(n_units, final_survival_prob)

        # The paper's CIFAR stem is conv -> BN without a ReLU: every unit starts with its own BN.
        self.conv1 = conv3x3(in_chans, D0)
        self.bn1 = nn.BatchNorm2d(D0)
        inplanes, k = D0, 0
        for i in range(3):
            units = []
            for j in range(units_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                units.append(block(inplanes, self.widths[k], stride, survival_prob=self.survival_probs[k]))
                inplanes = self.widths[k] * block.expansion
                k += 1
            name = f"layer{i + 1}"
            self.add_stage(name, units)
        # The units end in BN without a ReLU, so the features get a final BN -> ReLU before pooling.
        self.bn_final = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=False)
        self.build_head(inplanes, num_classes)

        self.initialize(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.run_stages(x)
        return self.relu(self.bn_final(x))


def _pyramidnet(depth: int, alpha: float, bottleneck: bool = False, **kwargs) -> PyramidNet:
    # A basic unit has 2 weighted layers, a bottleneck unit 3; plus the stem conv and the FC.
    per_unit = 9 if bottleneck else 6
    if (depth - 2) % per_unit != 0:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"a {kind} PyramidNet has depth {per_unit}n+2, got {depth}")
    block = PyramidBottleneck if bottleneck else PyramidBasicBlock
    return PyramidNet(block, (depth - 2) // per_unit, alpha, **kwargs)


@register_model("pyramidnet", input_style="cifar")
def pyramidnet20_a48(**kwargs) -> PyramidNet:
    """Scaled-down PyramidNet-20 (alpha=48, 3 units per stage) for quick training; not from the paper."""
    return _pyramidnet(20, 48, **kwargs)


@register_model("pyramidnet", input_style="cifar")
def pyramidnet110_a48(**kwargs) -> PyramidNet:
    """PyramidNet-110, alpha=48 (1.7 M parameters in the paper)."""
    return _pyramidnet(110, 48, **kwargs)


@register_model("pyramidnet", input_style="cifar")
def pyramidnet110_a270(**kwargs) -> PyramidNet:
    """PyramidNet-110, alpha=270 (28.3 M parameters in the paper).

    This architecture counts 28.49 M (28,485,477 at 10 classes), 0.19 M above the paper's figure.
    The step alpha / N = 5 is an integer here, so no rounding rule changes a width, and an
    independent implementation (osmr/imgclsmob, pyramidnet110_a270_cifar10) asserts the same
    28,485,477; the paper's count apparently leaves out something that the others include.
    """
    return _pyramidnet(110, 270, **kwargs)


@register_model("pyramidnet", input_style="cifar")
def pyramidnet164_a48_bottleneck(**kwargs) -> PyramidNet:
    """PyramidNet-164 (bottleneck), alpha=48 (1.7 M parameters in the paper)."""
    return _pyramidnet(164, 48, bottleneck=True, **kwargs)


@register_model("pyramidnet", input_style="cifar")
def pyramidnet272_a200_bottleneck(**kwargs) -> PyramidNet:
    """PyramidNet-272 (bottleneck), alpha=200 (26.0 M parameters in the paper)."""
    return _pyramidnet(272, 200, bottleneck=True, **kwargs)
