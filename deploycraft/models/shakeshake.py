"""Shake-Shake regularized ResNet-26 with two residual branches per block (Gastaldi 2017).

X. Gastaldi, "Shake-Shake regularization", arXiv:1705.07485 (2017); the CIFAR-10 models of its
Sec. 2.2 ("Shake-Shake-Image": forward Shake, backward Shake, one coefficient per image).

Each block has two residual branches, each ReLU -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN. In
training the forward pass mixes them as alpha * b1 + (1 - alpha) * b2 with alpha ~ U(0, 1) drawn per
image, and the backward pass sends beta * g and (1 - beta) * g to the branches with an independent
beta ~ U(0, 1) per image. At test time both are weighted by the expectation 0.5. The network is a
3x3 stem conv with 16 filters, three stages of 4 blocks whose width doubles at each downsampling
(d, 2d, 4d for "2 x d"), then global average pooling and a fully connected layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import ResidualAdd
from deploycraft.models.registry import register_model

STEM_WIDTH = 16  # the paper: "The first layer is a 3x3 Conv with 16 filters"


class _ShakeShakeFunction(torch.autograd.Function):
    """Forward mixes with alpha, backward with an independent beta: the gradient is not the
    derivative of the forward (that is the point of the method, the paper's Eq. 2 and Fig. 1)."""

    @staticmethod
    def forward(ctx, b1: torch.Tensor, b2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return alpha * b1 + (1.0 - alpha) * b2

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (beta,) = ctx.saved_tensors
        return beta * grad, (1.0 - beta) * grad, None, None


class ShakeShake(nn.Module):
    """Combine two branch outputs: random per-image affine mix in training, their mean in eval.

    The coefficients of the last training forward are kept in ``last_alpha`` and ``last_beta``
    (shape N x 1 x 1 x 1) for tests and diagnostics. The eval path is two plain tensor ops, so the
    deployed graph (fx, ONNX) sees an Add and a Mul and nothing custom.
    """

    def __init__(self):
        super().__init__()
        self.last_alpha: torch.Tensor | None = None
        self.last_beta: torch.Tensor | None = None

    def forward(self, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        if self.training:
            shape = (b1.shape[0], 1, 1, 1)  # "Image" level: one coefficient per image
            alpha = torch.rand(shape, device=b1.device, dtype=b1.dtype)
            beta = torch.rand(shape, device=b1.device, dtype=b1.dtype)
            self.last_alpha, self.last_beta = alpha, beta
            return _ShakeShakeFunction.apply(b1, b2, alpha, beta)
        return 0.5 * (b1 + b2)


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    # inplace=False: the block input is shared by both branches and the shortcut.
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
        nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(cout),
    )


class ShakeShortcut(nn.Module):
    """The paper's shortcut where the shape changes (Sec. 2.2): two flows, concatenated, then BN.

    What is implemented, read from the paper's text: each flow is "1x1 average pooling with step 2"
    (i.e. subsampling) followed by a 1x1 convolution with half of the output filters; the input of
    the second flow is shifted by 1 pixel right and 1 pixel down (zero row on top, zero column on
    the left, last row and column dropped) so that its subsampling reads the odd pixels the first
    flow skips. The concatenation of the flows is followed by batch normalization.

    Implementation choices that compute the same function:
    - the 1x1 pooling with step 2 followed by a 1x1 conv is a 1x1 conv with stride 2;
    - BN after the concatenation normalizes each channel on its own, so it is one BN per flow on
      that flow's half of the channels (same parameters, same statistics); each BN then follows a
      conv and folds into it for deployment, instead of staying as a Mul + Add after a Concat.
    The paper lists no ReLU on this path, so there is none (the branches start with their own).
    Where only the width changes (stage 1: 16 -> d channels at stride 1) the same structure is used
    with stride 1, where the shift is a plain one-pixel translation of the second half.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"the two-flow shortcut splits the output in halves; got {out_channels} channels")
        half = out_channels // 2
        self.conv_a = nn.Conv2d(in_channels, half, 1, stride=stride, bias=False)
        self.bn_a = nn.BatchNorm2d(half)
        self.conv_b = nn.Conv2d(in_channels, half, 1, stride=stride, bias=False)
        self.bn_b = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_a(self.conv_a(x))
        shifted = F.pad(x[:, :, :-1, :-1], (1, 0, 1, 0))  # content moves 1 px right and 1 px down
        b = self.bn_b(self.conv_b(shifted))
        return torch.cat([a, b], dim=1)


class ShakeBlock(nn.Module):
    """x + ShakeShake(branch1(x), branch2(x)); no ReLU after the add (each branch starts with one)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.branch1 = _branch(inplanes, planes, stride)
        self.branch2 = _branch(inplanes, planes, stride)
        self.shake = ShakeShake()
        self.shortcut = ShakeShortcut(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
        self.add = ResidualAdd(act=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.branch1[-1].weight)
        nn.init.zeros_(self.branch2[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shake(self.branch1(x), self.branch2(x))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.add(out, skip)


class ShakeResNet(ClassifierNet):
    """ResNet with two Shake-Shake branches per block, CIFAR layout (the paper's Sec. 2.2).

    Args:
        blocks_per_stage: residual blocks in each of the 3 stages (4 for ResNet-26: 2 + 3 * 4 * 2).
        base_width: filters of each branch in the first stage (32 for "2x32d"); doubles per stage.
        zero_init_residual: zero the last BN of both branches so every block starts as the
            identity. Off by default: the paper uses the standard initialization.
    """

    def __init__(
        self,
        blocks_per_stage: int = 4,
        base_width: int = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, STEM_WIDTH, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        inplanes = STEM_WIDTH
        for i in range(3):
            planes = base_width * 2**i
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(ShakeBlock(inplanes, planes, stride))
                inplanes = planes
            name = f"layer{i + 1}"
            self.add_stage(name, blocks)
        # Blocks end with an add and no ReLU (the next block's branches start with one), so the
        # features are rectified once before pooling.
        self.relu = nn.ReLU(inplace=False)
        self.build_head(inplanes, num_classes)

        self.initialize(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.run_stages(x)
        return self.relu(x)


def _shake_resnet(depth: int, base_width: int, **kwargs) -> ShakeResNet:
    # Each block stacks 2 weighted layers per branch; plus the stem conv and the FC: depth 6n + 2.
    if (depth - 2) % 6 != 0:
        raise ValueError(f"a Shake-Shake ResNet has depth 6n+2, got {depth}")
    return ShakeResNet((depth - 2) // 6, base_width, **kwargs)


@register_model("shakeshake", input_style="cifar")
def shake_resnet26_2x32d(**kwargs) -> ShakeResNet:
    """Shake-Shake-Image ResNet-26 2x32d (2.9 M parameters in the paper)."""
    return _shake_resnet(26, 32, **kwargs)


@register_model("shakeshake", input_style="cifar")
def shake_resnet26_2x96d(**kwargs) -> ShakeResNet:
    """Shake-Shake-Image ResNet-26 2x96d (26.2 M parameters in the paper)."""
    return _shake_resnet(26, 96, **kwargs)
