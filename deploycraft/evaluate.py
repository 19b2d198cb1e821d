"""Top-1 accuracy over the held-out split, for any runtime that maps a batch to logits."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from deploycraft.progress import bar

Predict = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def top1(predict: Predict, data, batch_size: int = 256, description: str = "evaluate") -> float:
    correct = total = 0
    steps = -(-data.num_val // batch_size)
    with bar(description, steps) as b:
        for x, y in data.val_batches(batch_size):
            logits = predict(x)
            if isinstance(logits, torch.Tensor):
                pred = logits.argmax(1).cpu()
            else:
                pred = torch.from_numpy(np.asarray(logits).argmax(1))
            correct += int((pred == y).sum())
            total += len(y)
            b.advance(acc=correct / total)
    return correct / max(total, 1)


def torch_predictor(model: torch.nn.Module, device: str | torch.device = "cpu") -> Predict:
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(device)).cpu()

    return predict
