"""Highway networks (Srivastava, Greff & Schmidhuber, "Training Very Deep Networks", NeurIPS 2015).

A highway layer mixes a transform of its input with the input itself, per unit:

    y = H(x) * T(x) + x * (1 - T(x)),    T(x) = sigmoid(W_T x + b_T)

T is the transform gate and 1 - T the carry gate. With b_T initialised negative (``gate_bias``,
-2 by default; the paper used -1 to -3 growing with depth) every layer starts close to the identity,
so signals and gradients pass through many layers at init; the net learns where to transform.

We compute the same value as ``x + T * (H - x)``: one multiply fewer, and the carry path reaches a
`ResidualAdd` as its skip input, so quantization and pruning treat the carry like a residual
shortcut (Q/DQ on the skip for TensorRT; x and H(x) must keep the same channels when pruning).

Two layers and two registered nets:
- `HighwayLinear` and `HighwayMLP` (``highway_fc``): the paper's fully connected highway nets on
  images pooled to a small grid.
- `HighwayConv2d` and `HighwayConvNet` (``highway_conv``): convolutional highway layers
  (H = ReLU(BN(conv3x3)), T from its own biased 3x3 conv) in a CIFAR-style three-stage net.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import ResidualAdd, he_init
from deploycraft.models.registry import register_model


def _init_gate(layer: nn.Linear | nn.Conv2d, gate_bias: float) -> None:
    """PyTorch's default fan-in init (uniform +-1/sqrt(fan_in), variance 1/(3 fan_in)) and b_T = gate_bias.

    Not He init: the gate is a sigmoid, and a small pre-activation spread keeps T(x) near
    sigmoid(b_T) for every input at init (mean about 0.13 for b_T = -2 on unit-variance inputs), which
    is what makes the layer start near the identity.
    """
    layer.reset_parameters()
    nn.init.constant_(layer.bias, gate_bias)


class HighwayLinear(nn.Module):
    """Fully connected highway layer: H = ReLU(W_H x + b_H), T = sigmoid(W_T x + b_T)."""

    def __init__(self, features: int, gate_bias: float = -2.0):
        super().__init__()
        self.gate_bias = gate_bias
        self.fc_h = nn.Linear(features, features)
        self.relu = nn.ReLU(inplace=False)
        self.fc_t = nn.Linear(features, features)
        self.gate = nn.Sigmoid()
        self.add = ResidualAdd(act=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_normal_(self.fc_h.weight, nonlinearity="relu")
        nn.init.zeros_(self.fc_h.bias)
        _init_gate(self.fc_t, self.gate_bias)

    def transform_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc_t(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc_h(x))
        t = self.transform_gate(x)
        return self.add(t * (h - x), x)  # = h * t + x * (1 - t)


class HighwayConv2d(nn.Module):
    """Convolutional highway layer: H = ReLU(BN(conv3x3(x))), T = sigmoid(conv_T(x) + b_T).

    T comes from its own biased conv with the same 3x3 receptive field as H by default, as in the
    paper's convolutional highway nets: the gate then decides from the same neighbourhood H sees.
    ``gate_kernel=1`` makes the gate a per-pixel mix of channels and nearly halves the layer's
    parameters. The gate conv has no BN: a BN would renormalise W_T x and its shift would stand in
    for b_T, and the gate bias is the paper's one knob for how close to the identity a layer starts.
    """

    def __init__(self, channels: int, gate_bias: float = -2.0, gate_kernel: int = 3):
        super().__init__()
        if gate_kernel not in (1, 3):
            raise ValueError(f"gate_kernel must be 1 or 3, got {gate_kernel}")
        self.gate_bias = gate_bias
        self.conv_h = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_h = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv_t = nn.Conv2d(channels, channels, gate_kernel, padding=gate_kernel // 2, bias=True)
        self.gate = nn.Sigmoid()
        self.add = ResidualAdd(act=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_normal_(self.conv_h.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn_h.weight)
        nn.init.zeros_(self.bn_h.bias)
        _init_gate(self.conv_t, self.gate_bias)

    def transform_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv_t(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn_h(self.conv_h(x)))
        t = self.transform_gate(x)
        return self.add(t * (h - x), x)  # = h * t + x * (1 - t)


class HighwayMLP(ClassifierNet):
    """Fully connected highway net for images (the paper's MNIST/CIFAR highway MLPs).

    The image is average-pooled to a ``grid`` x ``grid`` map, flattened, projected to ``width`` by a
    plain ReLU layer (the carry needs equal widths), then ``depth`` highway layers and a classifier.

    Args:
        width: units per highway layer.
        depth: number of highway layers.
        grid: side of the pooled input. The default 4 divides 28, 32, 64 and 224 px inputs; the ONNX
            exporter can only export an adaptive average pool whose output size divides its input's.
        gate_bias: initial b_T of every layer.
    """

    def __init__(
        self,
        width: int = 256,
        depth: int = 10,
        grid: int = 4,
        gate_bias: float = -2.0,
        num_classes: int = 1000,
        in_chans: int = 3,
    ):
        super().__init__()
        if depth < 1 or width < 1 or grid < 1:
            raise ValueError(f"width, depth and grid must be positive, got {width}, {depth}, {grid}")
        self.num_classes = num_classes
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(in_chans * grid * grid, width)
        self.relu = nn.ReLU(inplace=False)
        self.layers = nn.Sequential(*(HighwayLinear(width, gate_bias) for _ in range(depth)))
        self.num_features = width
        self.global_pool = nn.Identity()  # features are already a vector per image
        self.fc = nn.Linear(width, num_classes)
        nn.init.kaiming_normal_(self.proj.weight, nonlinearity="relu")
        nn.init.zeros_(self.proj.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        x = self.relu(self.proj(x))
        return self.layers(x)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)
    )


class HighwayConvNet(ClassifierNet):
    """CIFAR-style convolutional highway net: 3x3 stem, stages of highway conv layers, global pool, classifier.

    A highway layer cannot change its width (the carry adds x to H(x)), so each later stage opens with a
    plain strided conv-BN-ReLU that halves the resolution and changes the width.

    Args:
        layers: highway layers per stage.
        widths: channels per stage.
        gate_bias: initial b_T of every layer.
        gate_kernel: 3 (the paper's choice, default) or 1 for the transform gate's conv.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2),
        widths: tuple[int, ...] = (32, 64, 128),
        gate_bias: float = -2.0,
        gate_kernel: int = 3,
        num_classes: int = 1000,
        in_chans: int = 3,
    ):
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"{len(layers)} stages need {len(layers)} widths, got {widths}")
        self.num_classes = num_classes
        self.stem = conv_bn_relu(in_chans, widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks: list[nn.Module] = [] if i == 0 else [conv_bn_relu(cin, w, stride=2)]
            blocks += [HighwayConv2d(w, gate_bias, gate_kernel) for _ in range(n)]
            name = f"stage{i + 1}"
            self.add_stage(name, blocks)
            cin = w
        self.build_head(cin, num_classes)
        he_init(self)
        for m in self.modules():  # he_init re-initialised the gate convs too
            if isinstance(m, HighwayConv2d):
                m.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.run_stages(x)
        return x


@register_model("highway", input_style="cifar")
def highway_fc(**kwargs) -> HighwayMLP:
    """Pool to 4x4, project to 256 units, 10 fully connected highway layers, classifier."""
    kwargs.setdefault("width", 256)
    kwargs.setdefault("depth", 10)
    return HighwayMLP(**kwargs)


@register_model("highway", input_style="cifar")
def highway_conv(**kwargs) -> HighwayConvNet:
    """3x3 stem, 3 stages of 2 highway conv layers at 32/64/128 channels; 0.87 M params at 10 classes."""
    kwargs.setdefault("layers", (2, 2, 2))
    kwargs.setdefault("widths", (32, 64, 128))
    return HighwayConvNet(**kwargs)
