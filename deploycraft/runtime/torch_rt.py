"""The FP32 reference: the torch model in eager mode, as users run it before deploying."""

from __future__ import annotations

import torch


class TorchRunner:
    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device
        self.cuda_events = device != "cpu"  # bench times GPU runs with CUDA events

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(x)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return out
