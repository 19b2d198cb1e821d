"""The interface every deploycraft model shares (timm's): features, head, classifier access.

Pruning, distillation, quantization and export treat all models alike through it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierNet(nn.Module):
    """Base class: subclasses build ``self.fc`` (the classifier) and implement ``forward_features``."""

    num_classes: int
    num_features: int
    fc: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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
