"""Train stage: SGD with momentum, warm-up then cosine or step decay, crop/flip augmentation.

Resumable: after every epoch the model, optimizer and history go to ``checkpoint.pt`` in the
stage folder. Batch order and augmentation of epoch e come from a generator seeded by (seed, e), and
torch's global RNG (stochastic depth, shake-shake) is reseeded per epoch, so a run resumed after a
kill ends with the same weights as an uninterrupted one.

Data-parallel under torchrun (``train_epochs`` with a world of several ranks, docs/design.md): DDP, the
global batch split over the ranks, rank 0 writing the checkpoint, which any world size resumes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.artifacts import atomic_write_bytes, read_json, write_json
from deploycraft.config import OptimConfig, ParallelOptimConfig, StageConfig
from deploycraft.data.transforms import Augment
from deploycraft.distributed import SINGLE, World, sync_batchnorm
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models.io import read_spec, save_model
from deploycraft.progress import bar, log
from deploycraft.stages.base import Stage, StageOutput, register_stage


class TrainConfig(StageConfig, ParallelOptimConfig):
    """Train from scratch, or fine-tune model.weights."""

    type: Literal["train"] = "train"


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


def save_epoch_checkpoint(path: Path, state: dict) -> None:
    """The state after an epoch, and beside it the sha256 it was written with (checked on resume)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    entry = atomic_write_bytes(path, buf.getvalue())
    write_json(path.with_suffix(".json"), {"epoch": state["epoch"], "sha256": entry["sha256"]})


def load_epoch_checkpoint(path: Path, label: str) -> dict | None:
    """The last epoch's state if it is intact (its sha256 matches), else None: start that training over."""
    if not path.is_file():
        return None
    from deploycraft.artifacts import sha256_file

    try:
        expected = read_json(path.with_suffix(".json"))["sha256"]
        if sha256_file(path) != expected:
            raise ValueError("sha256 mismatch")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged or foreign: never resume from it
        log(f"[yellow]  {label}: {path.name} is damaged ({exc.__class__.__name__}: {exc}); starting over[/]")
        path.unlink(missing_ok=True)
        return None


class Diverged(Exception):
    """The loss of one epoch ran away (see ``DivergenceWatch``); caught by ``train_epochs``. ``loss``: the median
    that tripped the watch, or the non-finite loss."""

    def __init__(self, step: int, lr: float, loss: float, floor: float):
        super().__init__(f"step {step} (lr {lr:.3g}): loss {loss:.4g}, lowest {floor:.4g}")
        self.step, self.lr, self.loss, self.floor = step, lr, loss, floor


class DivergenceWatch:
    """Divergence seen from the loss, long before it is non-finite: the median of the last ``WINDOW`` step
    losses rising to ``FACTOR`` times its lowest value so far in the run *and* ``RISE`` above it. One or two
    bad batches (a spike, a small last batch) do not move a median of five; three in a row do. From a
    converged model (QAT) a loss of 0.03 must pass 0.53; from scratch, 2.3 must pass 11.5. The lowest value
    carries over epochs (``state``, kept in the checkpoint), so a runaway that starts at the end of an epoch
    is still measured against the loss before it."""

    FACTOR, RISE, WINDOW = 5.0, 0.5, 5

    def __init__(self, state: dict | None = None) -> None:
        self.window: list[float] = list((state or {}).get("window", []))
        self.floor: float = (state or {}).get("floor", math.inf)
        self.median = math.nan

    def state(self) -> dict:
        return {"window": list(self.window), "floor": self.floor}

    def diverged(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        self.window = (self.window + [loss])[-self.WINDOW :]
        self.median = float(statistics.median(self.window))
        self.floor = min(self.floor, self.median)
        full = len(self.window) == self.WINDOW  # the first steps' medians set the floor, they never trip it
        return full and self.median > self.FACTOR * self.floor and self.median > self.floor + self.RISE


def where_words(events: list[tuple[int, dict]]) -> str:
    """(epoch, {"step", "lr"}) pairs of the divergence guard's history records, as report words."""
    return "; ".join(f"epoch {e}, step {r['step']} at lr {r['lr']:.3g}" for e, r in events)


def ran_away_words(history: list[dict] | None) -> str:
    """The epochs whose loss ran away without stopping the training (``DivergenceWatch``), for a report."""
    W = DivergenceWatch  # noqa: N806
    runs = [(h["epoch"], h["loss_ran_away"]) for h in history or [] if "loss_ran_away" in h]
    if not runs:
        return ""
    where = where_words(runs)
    return (
        f" The loss ran away ({where}: the median of {W.WINDOW} step losses at {W.FACTOR:g}x its lowest and "
        f"{W.RISE:g} above it) and "
        "training went on: check the result, or lower the learning rate."
    )


def _snapshot(model: nn.Module, optimizer, extra: nn.Module | None, scaler, watch: DivergenceWatch) -> dict:
    """Copies of everything an epoch changes, to start it again (on the CPU: the device keeps one model)."""

    def to_cpu(sd: dict) -> dict:
        return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in sd.items()}

    opt = optimizer.state_dict()
    return {
        "model": to_cpu(model.state_dict()),
        "optimizer": {
            **opt,
            "state": {k: to_cpu(v) for k, v in opt["state"].items()},
            "param_groups": copy.deepcopy(opt["param_groups"]),
        },
        "extra": to_cpu(extra.state_dict()) if extra is not None else None,
        "scaler": copy.deepcopy(scaler.state_dict()),
        "watch": watch.state(),
    }


def _restore(snap: dict, model: nn.Module, optimizer, extra: nn.Module | None, scaler) -> DivergenceWatch:
    """Back to the snapshot; returns the divergence watch as it was."""
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))  # moved to the parameters' device
    if extra is not None:
        extra.load_state_dict(snap["extra"])
    if snap["scaler"]:
        scaler.load_state_dict(snap["scaler"])
    return DivergenceWatch(snap["watch"])


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
    field: str = "stages.train",
    world: World | None = None,
) -> list[dict]:
    """Train ``model`` in place for cfg.epochs, resuming from ``workdir/checkpoint.pt``; returns the history.

    ``loss_fn(model, x, y) -> (loss, logits)`` replaces plain cross-entropy (distillation uses it);
    ``extra`` holds trainable helpers of the loss (distillation adapters), optimized and checkpointed
    with the model. ``field`` is the recipe path of ``cfg``, named when training diverges.

    With a ``world`` of several ranks every rank calls this with the same model and data: DDP averages the
    gradients; cfg.batch_size is the global batch, of which each rank takes its part
    (``DataModule.train_epoch``), and each part's loss is weighted by its share of the batch, so the
    gradient is the global batch's mean and lr and schedule mean what they mean in one process; held-out
    top-1 is sharded over the ranks; rank 0 alone writes the checkpoint, and a run of any world size
    resumes it (the state holds no per-rank parts).

    A non-finite loss ends the stage with a UserError naming ``field``.lr. A loss that runs away
    (``DivergenceWatch``, on the global batch's loss): with ``cfg.divergence_retries`` (QAT) the epoch starts
    again from its beginning at half the learning rate, up to that many times in the run, then the UserError;
    without it (train, distill, prune) a warning, recorded in the epoch's history, and training goes on.
    """
    world = world or SINGLE
    parallel = world.size > 1
    sync_bn = getattr(cfg, "sync_batchnorm", False) and parallel  # ParallelOptimConfig's field
    if sync_bn and not str(device).startswith("cuda"):
        raise UserError(
            "sync_batchnorm needs GPUs: torch's SyncBatchNorm synchronizes only CUDA tensors",
            field=f"{field}.sync_batchnorm",
            fix="set sync_batchnorm: false on CPU (each rank then normalizes over its part of the batch)",
        )
    amp = getattr(cfg, "amp", "off")  # ParallelOptimConfig's fields (train, distill)
    channels_last = getattr(cfg, "channels_last", False)
    for name, on in (("amp", amp != "off"), ("channels_last", channels_last)):
        if on and not str(device).startswith("cuda"):
            raise UserError(
                f"{name} is a GPU setting and this stage trains on {device}",
                field=f"{field}.{name}",
                fix=f"set device: cuda on a GPU machine, or remove {name}",
            )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    # A GPU prepares its own batches (resize, augmentation, normalization): only uint8 images cross the bus, and
    # at 224 px the CPU would otherwise set the pace. On the CPU nothing changes.
    batch_device = device if str(device).startswith("cuda") else None
    if extra is not None:
        extra.to(device)
    # FP16's narrow exponent needs loss scaling; BF16 has FP32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    autocast_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
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
    state = world.load_checkpoint(lambda: load_epoch_checkpoint(ckpt_path, label))
    if state is not None:
        model.load_state_dict(state["model"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start = state["history"], state["epoch"]
        written_by = state.get("world_size", 1)
        log(
            f"  resuming {label} after epoch {start}/{cfg.epochs}"
            + (f" (checkpoint of {written_by} process(es), now {world.size})" if written_by != world.size else "")
        )
    if extra is not None:
        world.sync_module(extra)  # each rank built its adapters from its own random state: take rank 0's
    steps = data.steps_per_epoch(cfg.batch_size)
    total, warmup = cfg.epochs * steps, int(round(cfg.warmup_epochs * steps))
    augment = Augment(cfg.crop_padding, cfg.hflip) if (cfg.crop_padding or cfg.hflip) else None
    if loss_fn is None:

        def loss_fn(m, x, y):
            logits = m(x)
            return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits

    def one_epoch(net: nn.Module, epoch: int, lr_scale: float, watch: DivergenceWatch, stop: bool) -> tuple:
        """One pass over the training split: the loss sum, correct and seen counts, and the step at which the
        loss ran away (None if it did not). ``stop``: raise Diverged there instead (always on a non-finite loss)."""
        torch.manual_seed(seed * 7919 + epoch)  # the same on every rank: stochastic depth drops a block for all
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        ran_away = None
        with bar(f"{label} epoch {epoch + 1}/{cfg.epochs}", steps) as b:
            for i, (x, y) in enumerate(data.train_epoch(cfg.batch_size, epoch, augment, world.shard, batch_device)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(epoch * steps + i, total, warmup, cfg) * lr_scale
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if len(y):
                    with torch.autocast("cuda", autocast_dtype) if amp != "off" else contextlib.nullcontext():
                        loss, logits = loss_fn(net, x, y)
                    loss_value = loss.item()
                else:  # this rank's empty part of a last, small batch: DDP still needs its (zero) gradients
                    loss, logits, loss_value = net(x).sum() * 0.0, None, 0.0
                # every rank decides on the global batch's loss, so all restart or stop together
                part_sum, part_n = world.all_reduce_sum([loss_value * len(y), float(len(y))])
                if watch.diverged(part_sum / max(part_n, 1.0)):
                    if not math.isfinite(part_sum):
                        raise Diverged(i + 1, lr, part_sum, watch.floor)
                    if stop:
                        raise Diverged(i + 1, lr, watch.median, watch.floor)
                    if ran_away is None:
                        ran_away = {"step": i + 1, "lr": lr, "loss": watch.median, "lowest": watch.floor}
                optimizer.zero_grad(set_to_none=True)
                if parallel:
                    # DDP averages the ranks' gradients; weighting each part by its share of the global
                    # batch makes that average the global batch's mean (parts differ in a last batch).
                    global_batch = min(cfg.batch_size, data.num_train - i * cfg.batch_size)
                    scaler.scale(loss * (len(y) * world.size / global_batch)).backward()
                    if extra is not None:
                        world.average_gradients(extra)
                else:
                    scaler.scale(loss).backward()
                scaler.step(optimizer)  # without fp16 the scaler is disabled: a plain optimizer.step()
                scaler.update()
                seen += len(y)
                loss_sum += loss_value * len(y)
                if logits is not None:
                    correct += int((logits.argmax(1) == y).sum())
                b.advance(loss=loss_sum / max(seen, 1), acc=correct / max(seen, 1), lr=lr)
        return loss_sum, correct, seen, ran_away

    # QAT (divergence_retries) restarts a runaway epoch; train, distill and prune fine-tuning warn and go on
    retries = getattr(cfg, "divergence_retries", None)
    lr_scale = state.get("lr_scale", 1.0) if state is not None else 1.0
    restarts_used = state.get("restarts_used", 0) if state is not None else 0
    watch = DivergenceWatch(state.get("watch") if state is not None else None)

    def checkpoint_state(epoch: int) -> dict:
        return {
            "epoch": epoch,
            "model": model.state_dict(),
            "extra": extra.state_dict() if extra is not None else {},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            "world_size": world.size,
            "lr_scale": lr_scale,
            "restarts_used": restarts_used,
            "watch": watch.state(),
        }

    def evaluated(epoch: int) -> bool:
        """Whether the history record of ``epoch`` (1-based) has a held-out top-1."""
        return cfg.eval_each_epoch or epoch == cfg.epochs

    def evaluate(record: dict) -> None:
        record["val_top1"] = top1(
            torch_predictor(model, device), data, 256, f"{label} eval", world, device=batch_device
        )

    with sync_batchnorm(model, sync_bn):
        if history and "val_top1" not in history[-1] and evaluated(start):
            # the checkpoint is written before the epoch's evaluation: one that failed or was cut short is done now
            evaluate(history[-1])
            log(
                f"  {label} epoch {start}/{cfg.epochs}: val top-1 {history[-1]['val_top1']:.4f} (evaluated on resuming)"
            )
        net = world.wrap(model, device)
        for epoch in range(start, cfg.epochs):
            restarts: list[dict] = []
            started = time.time()  # all attempts of the epoch
            # an epoch that diverges starts again from here at half the learning rate (the same batches, the same
            # random draws): a killed run re-run takes the same path and ends bit-identical
            can_restart = retries is not None and restarts_used < retries
            snapshot = _snapshot(model, optimizer, extra, scaler, watch) if can_restart else None
            while True:
                try:
                    loss_sum, correct, seen, ran_away = one_epoch(net, epoch, lr_scale, watch, retries is not None)
                    break
                except Diverged as d:
                    what = f"the loss became {d.loss}"
                    if math.isfinite(d.loss):
                        what = (
                            f"the median of the last {watch.WINDOW} step losses rose from {d.floor:.3g} to {d.loss:.3g}"
                        )
                    where = f"in epoch {epoch + 1}, step {d.step} (learning rate {d.lr:.3g})"
                    if snapshot is None:
                        tried = (
                            f" (after {restarts_used} restart(s) at half the learning rate in this run)"
                            if restarts_used
                            else ""
                        )
                        raise UserError(
                            f"{label} diverged: {what} {where}{tried}",
                            field=f"{field}.lr",
                            fix=f"lower the learning rate (below {cfg.lr * lr_scale:.3g}) or lengthen warmup_epochs, "
                            "then run again",
                        ) from None
                    watch = _restore(snapshot, model, optimizer, extra, scaler)
                    restarts_used += 1
                    lr_scale *= 0.5
                    restarts.append({"step": d.step, "lr": d.lr, "lr_scale": lr_scale})
                    log(
                        f"[yellow]  {label} diverged: {what} {where}; epoch {epoch + 1} starts again at half the "
                        f"learning rate (peak {cfg.lr * lr_scale:.3g}), restart {restarts_used} of {retries}[/]"
                    )
                    if restarts_used >= retries:
                        snapshot = None
            if ran_away is not None:
                log(
                    f"[yellow]  {label}: the loss ran away in epoch {epoch + 1} at step {ran_away['step']} (median "
                    f"{ran_away['loss']:.3g}, lowest {ran_away['lowest']:.3g}, learning rate {ran_away['lr']:.3g}); "
                    f"training went on — if the result is poor, lower {field}.lr[/]"
                )
            if parallel:
                loss_sum, correct, seen = world.all_reduce_sum([loss_sum, correct, seen])
                # BN statistics: each rank updated its own in the last step; rank 0's are the model's.
                world.sync_module(model, buffers_only=True)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_top1": correct / seen,
                "seconds": round(time.time() - started, 1),
                "world_size": world.size,
            }
            if lr_scale != 1.0:
                record["lr_scale"] = lr_scale
            if restarts:
                record["restarts"] = restarts
            if ran_away is not None:
                record["loss_ran_away"] = ran_away
            if amp != "off" or channels_last:
                record.update(amp=amp, channels_last=channels_last)
            history.append(record)
            if world.is_main:  # before the evaluation: one that fails (a broken held-out image) loses no training
                save_epoch_checkpoint(ckpt_path, checkpoint_state(epoch + 1))
            if evaluated(epoch + 1):
                evaluate(record)
            log(
                f"  {label} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
                f"train top-1 {record['train_top1']:.4f}"
                + (f", val top-1 {record['val_top1']:.4f}" if "val_top1" in record else "")
                + f" ({record['seconds']:.0f} s"
                + (f", {world.size} processes" if parallel else "")
                + (f", learning rate x{lr_scale:g}" if lr_scale != 1.0 else "")
                + ")"
            )
    model.to("cpu")  # pruning, export and saving work on CPU copies
    if extra is not None:
        extra.to("cpu")
    return history


def _processes(metrics: dict[str, Any]) -> str:
    """How a data-parallel training split its batches (nothing for one process)."""
    n = metrics.get("world_size", 1)
    return f" over {n} data-parallel processes ({metrics['batch_size'] / n:g} images each)" if n > 1 else ""


@register_stage
class TrainStage(Stage):
    type = "train"
    Config = TrainConfig
    rank = 0
    report_order = 0
    reads = ("device",)
    data_parallel = True
    config: TrainConfig

    @classmethod
    def check(cls, recipe, index: int) -> None:
        d = recipe.data
        if recipe.stages[index].enabled and d.dataset == "imagefolder":
            if not (Path(d.root) / d.train_split).is_dir():
                raise UserError(
                    f"the train stage needs {Path(d.root) / d.train_split}",
                    field="data.train_split",
                    fix="name the training sub-folder of data.root, or disable the train stage "
                    "(stages.train.enabled=false)",
                )

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        if cfg.epochs == 0:
            return StageOutput(metrics={"epochs": 0, "note": "epochs: 0 keeps the loaded weights"})
        model = ctx.load_shared_model()
        data = ctx.data
        # every held-out image decodes: a broken one is named now, not by the first evaluation after an epoch's work
        data.check_held_out(ctx.world.shard)
        history = train_epochs(model, data, cfg, workdir, ctx.recipe.seed, device=ctx.device, world=ctx.world)
        if not ctx.world.is_main:
            return StageOutput()  # rank 0 writes the stage; its output is the stage's
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
            "world_size": ctx.world.size,
            "schedule": f"SGD lr {cfg.lr} momentum {cfg.momentum}, {cfg.warmup_epochs} warm-up epochs, {cfg.schedule}",
            "final_train_loss": last["train_loss"],
            "val_top1": last.get("val_top1"),
            "seconds": round(sum(h["seconds"] for h in history), 1),
            "history": history,
        }
        return StageOutput(model="model", metrics=metrics)

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """What was trained, or the checkpoint the run started from."""
        lines: list[str] = []
        train = report["stages"].get("train")
        if train and train.get("epochs"):
            lines += [
                "## What was trained",
                "",
                f"{train['arch']} on {report['dataset']}: {train['epochs']} epoch(s) over {train['train_images']} "
                f"images at {train['image_size']} px ({train['channels']} channels), batch {train['batch_size']}"
                + _processes(train)
                + f", {train['schedule']}; {train['seconds']:.0f} s. Final train loss {train['final_train_loss']:.4f}."
                + ran_away_words(train.get("history")),
                "",
            ]
        init = report["stages"].get("init", {})
        if init.get("source", "").startswith("checkpoint"):
            lines += [f"Started from {init['source']}.", ""]
        return lines
