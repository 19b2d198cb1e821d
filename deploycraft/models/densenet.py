"""DenseNet (Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional Networks", CVPR 2017).

Every layer of a dense block reads the concatenation of all earlier feature maps of the block and
adds ``growth_rate`` (k) new channels to it. One `DenseNet` class builds

- the ImageNet layouts DenseNet-121/169/201/161 (Table 1 of the paper: 7x7/2 conv, 3x3/2 max-pool,
  four dense blocks of bottleneck layers, transitions with compression 0.5), with torchvision's
  state-dict keys (features.conv0, features.denseblock1.denselayer1.norm1, features.transition1.conv,
  features.norm5, classifier) so torchvision checkpoints load with strict=True;
- the CIFAR layouts of section 4 (a 3x3 stem conv, three dense blocks, no max-pool): DenseNet-BC
  (L=100 k=12, L=250 k=24, L=190 k=40) and the original DenseNet (L=40, k=12) without bottleneck
  or compression.

The layers are pre-activation (BN-ReLU-conv), so the BN that reads a concatenation has no conv in
front of it to fold into; `fold_bn` turns it into a per-channel affine (Mul + Add in ONNX).

``memory_efficient=True`` is the shared-memory idea of Pleiss et al. 2017 ("Memory-Efficient
Implementation of DenseNets") done with gradient checkpointing: in training, the concatenation,
BN, ReLU and first conv of every layer are recomputed in backward instead of being stored, so the
activation memory grows linearly rather than quadratically with depth.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from deploycraft.models.base import ClassifierNet
from deploycraft.models.layers import he_init
from deploycraft.models.registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (to ``bn_size * k``) - BN-ReLU-conv3x3 (to k), or BN-ReLU-conv3x3 without bottleneck.

    ``conv1`` is always the conv that reads the concatenated input: the 1x1 bottleneck in DenseNet-B/BC,
    the 3x3 conv in the original DenseNet (which then has no ``norm2``/``conv2``).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
    ):
        super().__init__()
        # Attribute order = torchvision's state-dict order (norm1, conv1, norm2, conv2).
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=False)
        if bottleneck:
            width = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU(inplace=False)
            self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
            self.norm2 = self.relu2 = self.conv2 = None
        # The paper uses dropout 0.2 after each conv only on C10/C100 without data augmentation.
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else None
        self.memory_efficient = memory_efficient

    def _concat_norm_conv(self, features: list[torch.Tensor], update_stats: bool = True) -> torch.Tensor:
        x = torch.cat(features, 1)
        if update_stats:
            x = self.norm1(x)
        else:
            # The recomputation in backward: same batch statistics, but the running averages (and
            # num_batches_tracked) were already updated by the forward pass and must not move twice.
            # Throw-away copies of the running stats (not None) keep the ops and the tensors they save
            # the same as in the forward pass, which non-reentrant checkpointing verifies.
            bn = self.norm1
            running_mean = bn.running_mean.clone() if bn.running_mean is not None else None
            running_var = bn.running_var.clone() if bn.running_var is not None else None
            momentum = bn.momentum if bn.momentum is not None else 0.0
            x = F.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        return self.conv1(self.relu1(x))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # `self.training` comes first: in eval (and so under fx tracing) the plain path runs.
        if self.training and self.memory_efficient and torch.is_grad_enabled():
            calls = 0

            def concat_norm_conv(*feats: torch.Tensor) -> torch.Tensor:
                nonlocal calls
                calls += 1
                return self._concat_norm_conv(list(feats), update_stats=calls == 1)

            out = checkpoint(concat_norm_conv, *features, use_reentrant=False)
        else:
            out = self._concat_norm_conv(features)
        if self.conv2 is not None:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        return out


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; the output is the input concatenated with every layer's k channels."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, **layer_kwargs):
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate, **layer_kwargs)
            )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool2x2 between dense blocks; the conv keeps ``floor(compression * C)`` channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                relu=nn.ReLU(inplace=False),
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                pool=nn.AvgPool2d(2, stride=2),
            )
        )


class DenseNet(ClassifierNet):
    """DenseNet / DenseNet-B / DenseNet-C / DenseNet-BC.

    Args:
        growth_rate: k, channels each dense layer adds.
        block_config: dense layers per block.
        num_init_features: channels of the stem conv (2k for DenseNet-BC, 16 for the original CIFAR net,
            64 for DenseNet-121/169/201, 96 for DenseNet-161).
        bottleneck: the "B" of DenseNet-BC: a 1x1 conv to ``bn_size * k`` channels before each 3x3 conv.
        bn_size: bottleneck width as a multiple of k (4 in the paper).
        compression: theta, the fraction of channels a transition keeps (0.5 for "C", 1.0 otherwise).
        stem: "imagenet" (7x7/2 conv-BN-ReLU + 3x3/2 max-pool) or "cifar" (a single 3x3 conv; the first
            dense layer's BN-ReLU follows it, as in the authors' CIFAR code).
        drop_rate: dropout after each dense layer's output.
        memory_efficient: recompute concat-BN-ReLU-conv1 in backward instead of storing it (training only).

    The classifier is ``self.classifier`` (torchvision's name), not ``self.fc``.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bottleneck: bool = True,
        bn_size: int = 4,
        compression: float = 0.5,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
    ):
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if not block_config:
            raise ValueError("block_config needs at least one dense block")
        self.num_classes = num_classes
        self.growth_rate = growth_rate
        if stem == "imagenet":
            layers = OrderedDict(
                conv0=nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(num_init_features),
                relu0=nn.ReLU(inplace=False),
                pool0=nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "cifar":
            layers = OrderedDict(conv0=nn.Conv2d(in_chans, num_init_features, 3, padding=1, bias=False))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.features = nn.Sequential(layers)

        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers,
                channels,
                growth_rate,
                bottleneck=bottleneck,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(block_config) - 1:
                out = int(channels * compression)  # floor, as in the paper's theta * m
                self.features.add_module(f"transition{i + 1}", Transition(channels, out))
                channels = out
        # The last block ends in BN-ReLU before global pooling. relu5 has no parameters, so the
        # state dict keeps torchvision's keys, whose forward applies this ReLU outside `features`.
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=False))

        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        he_init(self)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _cifar(depth: int, growth_rate: int, bc: bool = True, **kwargs) -> DenseNet:
    """CIFAR DenseNet of depth L: 3 blocks; (L - 4) / 3 conv layers per block, two per layer with bottleneck.

    L counts the stem conv, the two transition convs and the classifier besides the dense layers.
    """
    convs_per_layer = 2 if bc else 1
    if (depth - 4) % (3 * convs_per_layer) != 0:
        raise ValueError(f"CIFAR DenseNet{'-BC' if bc else ''} depth must be {3 * convs_per_layer}n+4, got {depth}")
    n = (depth - 4) // (3 * convs_per_layer)
    kwargs.setdefault("num_init_features", 2 * growth_rate if bc else 16)
    return DenseNet(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        bottleneck=bc,
        compression=0.5 if bc else 1.0,
        stem="cifar",
        **kwargs,
    )


# ImageNet layout (Table 1; torchvision names and key format) ------------------------------------


@register_model("densenet")
def densenet121(**kwargs) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, **kwargs)


@register_model("densenet")
def densenet169(**kwargs) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, **kwargs)


@register_model("densenet")
def densenet201(**kwargs) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, **kwargs)


@register_model("densenet")
def densenet161(**kwargs) -> DenseNet:
    return DenseNet(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, **kwargs)


# CIFAR layout (section 4.2 and Table 2) -----------------------------------------------------------


@register_model("densenet", input_style="cifar")
def densenet40_12(**kwargs) -> DenseNet:
    """The original DenseNet (L=40, k=12): 16-channel stem, no bottleneck, no compression; 1.0 M params."""
    return _cifar(40, 12, bc=False, **kwargs)


@register_model("densenet", input_style="cifar")
def densenet_bc_100_12(**kwargs) -> DenseNet:
    return _cifar(100, 12, **kwargs)


@register_model("densenet", input_style="cifar")
def densenet_bc_250_24(**kwargs) -> DenseNet:
    return _cifar(250, 24, **kwargs)


@register_model("densenet", input_style="cifar")
def densenet_bc_190_40(**kwargs) -> DenseNet:
    return _cifar(190, 40, **kwargs)
