"""Train stage: SGD with momentum, warm-up then cosine or step decay, crop/flip augmentation.

Resumable: after every epoch the model, optimizer and history go to ``checkpoint.pt`` in the
stage folder. Batch order and augmentation of epoch e come from a generator seeded by (seed, e), and
torch's global RNG (stochastic depth, shake-shake) is reseeded per epoch, so a run resumed after a
kill ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.artifacts import atomic_path
from deploycraft.data.transforms import Augment
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models.io import read_spec, save_model
from deploycraft.progress import bar, log
from deploycraft.recipe import OptimConfig, TrainConfig
from deploycraft.stages.base import Stage, StageOutput, register_stage


def lr_at(step: int, total: int, warmup: int, cfg: OptimConfig) -> float:
    """Learning rate at a global step: linear warm-up, then the chosen decay."""
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    return cfg.lr * cfg.gamma ** sum(progress >= m for m in cfg.milestones)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters and biases (1-D tensors), as is standard for ResNets."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_epochs(
    model: nn.Module,
    data,
    cfg: OptimConfig,
    workdir: Path,
    seed: int,
    loss_fn=None,
    label: str = "train",
    extra: nn.Module | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Train ``model`` in place for cfg.epochs, resuming from ``workdir/checkpoint.pt``; returns the history.

    ``loss_fn(model, x, y) -> (loss, logits)`` replaces plain cross-entropy (distillation uses it);
    ``extra`` holds trainable helpers of the loss (distillation adapters), optimized and checkpointed
    with the model.
    """
    model.to(device)
    if extra is not None:
        extra.to(device)
    groups = param_groups(model, cfg.weight_decay)
    if extra is not None:
        extra_groups = param_groups(extra, cfg.weight_decay)
        groups = [{**g, "params": g["params"] + e["params"]} for g, e in zip(groups, extra_groups, strict=True)]
    optimizer = torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    ckpt_path = workdir / "checkpoint.pt"
    history: list[dict] = []
    start = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        log(f"  resuming {label} after epoch {start}/{cfg.epochs}")
    steps = data.steps_per_epoch(cfg.batch_size)
    total, warmup = cfg.epochs * steps, int(round(cfg.warmup_epochs * steps))
    augment = Augment(cfg.crop_padding, cfg.hflip) if (cfg.crop_padding or cfg.hflip) else None
    if loss_fn is None:

        def loss_fn(m, x, y):
            logits = m(x)
            return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits

    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 7919 + epoch)
        model.train()
        started = time.time()
        seen = correct = 0
        loss_sum = 0.0
        with bar(f"{label} epoch {epoch + 1}/{cfg.epochs}", steps) as b:
            for i, (x, y) in enumerate(data.train_epoch(cfg.batch_size, epoch, augment)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lr = lr_at(epoch * steps + i, total, warmup, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss, logits = loss_fn(model, x, y)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"{label}: the loss became {loss_value} in epoch {epoch + 1}; lower the lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(y)
                loss_sum += loss_value * len(y)
                correct += int((logits.argmax(1) == y).sum())
                b.advance(loss=loss_sum / seen, acc=correct / seen, lr=lr)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "seconds": round(time.time() - started, 1),
        }
        if cfg.eval_each_epoch or epoch + 1 == cfg.epochs:
            record["val_top1"] = top1(torch_predictor(model, device), data, 256, f"{label} eval")
        history.append(record)
        log(
            f"  {label} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
            f"train top-1 {record['train_top1']:.4f}"
            + (f", val top-1 {record['val_top1']:.4f}" if "val_top1" in record else "")
            + f" ({record['seconds']:.0f} s)"
        )
        with atomic_path(ckpt_path) as tmp:
            torch.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "extra": extra.state_dict() if extra is not None else {},
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                },
                tmp,
            )
    model.to("cpu")  # pruning, export and saving work on CPU copies
    if extra is not None:
        extra.to("cpu")
    return history


@register_stage
class TrainStage(Stage):
    type = "train"
    config: TrainConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        if cfg.epochs == 0:
            return StageOutput(metrics={"epochs": 0, "note": "epochs: 0 keeps the loaded weights"})
        model = ctx.load_model()
        data = ctx.data
        history = train_epochs(model, data, cfg, workdir, ctx.recipe.seed, device=ctx.device)
        spec = read_spec(ctx.model_dir)
        save_model(model, workdir / "model", spec["arch"], spec["kwargs"])
        last = history[-1]
        metrics = {
            "arch": spec["arch"],
            "epochs": cfg.epochs,
            "train_images": data.num_train,
            "image_size": data.spec.image_size,
            "channels": data.spec.channels,
            "batch_size": cfg.batch_size,
            "schedule": f"SGD lr {cfg.lr} momentum {cfg.momentum}, {cfg.warmup_epochs} warm-up epochs, {cfg.schedule}",
            "final_train_loss": last["train_loss"],
            "val_top1": last.get("val_top1"),
            "seconds": round(sum(h["seconds"] for h in history), 1),
            "history": history,
        }
        return StageOutput(model="model", metrics=metrics)
