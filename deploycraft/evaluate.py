"""Top-1 accuracy over the held-out split, for any runtime that maps a batch to logits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from deploycraft.progress import bar

if TYPE_CHECKING:
    from deploycraft.distributed import World

Predict = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def top1(
    predict: Predict,
    data,
    batch_size: int = 256,
    description: str = "evaluate",
    world: World | None = None,
    predictions: list[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 on the held-out split. With a ``world`` of several ranks (all of them calling this with the same
    model) each rank evaluates every world_size-th batch and the counts are summed over the ranks.
    ``predictions``, when given, receives each batch's predicted classes (for agreement between models).
    ``device``: where the batches are prepared (see ``DataModule.val_batches``); default the CPU."""
    shard = world.shard if world is not None else None
    correct = total = 0
    with bar(description, data.num_val_batches(batch_size, shard)) as b:
        for x, y in data.val_batches(batch_size, shard, device):
            logits = predict(x)
            if isinstance(logits, torch.Tensor):
                pred = logits.argmax(1).cpu()
            else:
                pred = torch.from_numpy(np.asarray(logits).argmax(1))
            if predictions is not None:
                predictions.append(pred)
            correct += int((pred == y).sum())
            total += len(y)
            b.advance(acc=correct / total)
    if shard is not None:
        correct, total = world.all_reduce_sum([correct, total])
    return correct / max(total, 1)


def torch_predictor(model: torch.nn.Module, device: str | torch.device = "cpu") -> Predict:
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(device)).cpu()

    return predict
