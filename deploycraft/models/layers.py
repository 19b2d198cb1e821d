"""Building blocks shared by the model families.

`ResidualAdd` is the one place where a residual branch meets its shortcut. Quantization, export and
pruning find residual adds by this module type and know which input is the branch and which the
skip, so every family routes its adds through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CompositeLayer(nn.Module):
    """A layer that deployment sees as one node: graph capture (torch.fx) does not trace into it.

    Residual adds, shortcuts, SE gates and stochastic depth subclass it, so quantization and export find
    them by type with their arguments in a known order; a family adds its own composite layers the same
    way, without importing anything from quantization.
    """


class ResidualAdd(CompositeLayer):
    """``act(branch + skip)``. The argument order is part of the contract: (branch, skip)."""

    def __init__(self, act: bool = True):
        super().__init__()
        self.act = nn.ReLU(inplace=False) if act else None

    def forward(self, branch: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = branch + skip
        return self.act(out) if self.act is not None else out


class PadShortcut(CompositeLayer):
    """Option A shortcut (He et al. 2016, CIFAR): subsample by stride, zero-pad the new channels.

    Parameter-free, so nothing to prune or quantize on the shortcut itself.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        assert out_channels >= in_channels, "a zero-padding shortcut can only widen"
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        if extra > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x


class SqueezeExcite(CompositeLayer):
    """Squeeze-and-Excitation (Hu et al. 2018): GAP -> FC -> ReLU -> FC -> sigmoid, channel gate."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min_channels)
        # 1x1 convs on the pooled map are the FCs of the paper; they keep NCHW without reshapes.
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.gate(self.fc2(self.relu(self.fc1(s))))
        return x * s


class StochasticDepth(CompositeLayer):
    """Drop a whole residual branch in training (Huang et al. 2016).

    Training: the branch is kept with probability ``survival_prob`` for the whole mini-batch, as in
    the paper, and zeroed otherwise. Test: every branch is used, scaled by its survival probability,
    so the expected branch output matches training.
    """

    def __init__(self, survival_prob: float):
        super().__init__()
        if not 0.0 < survival_prob <= 1.0:
            raise ValueError(f"survival probability must be in (0, 1], got {survival_prob}")
        self.survival_prob = survival_prob
        self.last_kept: bool | None = None  # observed by tests and diagnostics

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.survival_prob >= 1.0:
            return branch
        if self.training:
            keep = bool(torch.rand(()) < self.survival_prob)
            self.last_kept = keep
            return branch if keep else branch * 0.0
        return branch * self.survival_prob

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.3f}"


def linear_survival_probs(n_blocks: int, final_survival: float) -> list[float]:
    """The paper's linear decay rule p_l = 1 - (l / L)(1 - p_L) for blocks l = 1..L."""
    if n_blocks <= 0:
        return []
    return [1.0 - (i / n_blocks) * (1.0 - final_survival) for i in range(1, n_blocks + 1)]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def resnet_stem(stem: str, in_chans: int, width: int) -> tuple[nn.Conv2d, nn.MaxPool2d | None]:
    """The stem conv and max-pool of ResNet-style nets: "imagenet" is a 7x7/2 conv then a 3x3/2
    max-pool (He et al. 2016), "cifar" a 3x3/1 conv and no pool."""
    if stem == "imagenet":
        return nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, stride=2, padding=1)
    if stem == "cifar":
        return conv3x3(in_chans, width), None
    raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")


def he_init(model: nn.Module) -> None:
    """He (Kaiming) normal init for convs, unit BN, default Linear init (He et al. 2015)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
