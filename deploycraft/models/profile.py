"""Parameter and multiply-accumulate counts, measured by running the model once with hooks."""

from __future__ import annotations

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass on a single image of ``input_shape`` (C, H, W).

    Counts convolutions and fully connected layers (the standard convention of the papers); BN,
    activations, pooling and adds are not counted.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() // out.shape[0] * k

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model(torch.zeros(1, *input_shape, device=device))  # a model built on the meta device costs nothing
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)
