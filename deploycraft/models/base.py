"""The interface every deploycraft model shares (timm's): features, head, classifier access.

Pruning, distillation, quantization and export treat all models alike through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deploycraft.models.layers import he_init


class ClassifierNet(nn.Module):
    """Base class: subclasses build ``self.fc`` (the classifier) and implement ``forward_features``."""

    num_classes: int
    num_features: int
    fc: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # Helpers for the stage-structured nets (ResNet, pre-activation, PyramidNet, Shake-Shake, Highway).

    def add_stage(self, name: str, blocks: list[nn.Module]) -> None:
        """Register a stage (an ``nn.Sequential`` of blocks) that ``run_stages`` applies in order."""
        if not hasattr(self, "stage_names"):
            self.stage_names: list[str] = []
        self.add_module(name, nn.Sequential(*blocks))
        self.stage_names.append(name)

    def run_stages(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def build_head(self, num_features: int, num_classes: int) -> None:
        """Global average pooling and a linear classifier on ``num_features`` channels."""
        self.num_features = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_features, num_classes)

    def initialize(self, zero_init_residual: bool) -> None:
        """He init, then (optionally) every residual block's ``zero_init_last``: each block starts
        as the identity (Goyal et al. 2017)."""
        he_init(self)
        if zero_init_residual:
            for m in self.modules():
                if m is not self and hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
