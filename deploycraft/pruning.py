"""Structured channel pruning on torch-pruning's dependency graph (Fang et al., DepGraph, CVPR 2023).

Three ideas in three places, as torch-pruning itself separates them: which channels are coupled (the
dependency graph: residual adds, concatenations, grouped convs and SE gates make groups that are
pruned together), how a channel is scored (one table of importance criteria below) and how much is
pruned (a ratio, or the smallest ratio that meets a MACs, parameter or measured-latency target).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.errors import UserError
from deploycraft.models.profile import count_macs, count_params


def _importance_table() -> dict[str, Callable[[], object]]:
    import torch_pruning as tp

    imp = tp.importance
    return {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),  # group L1 norm (Li et al. 2017, grouped)
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "bn_scale": imp.BNScaleImportance,  # network slimming (Liu et al. 2017)
        "taylor": imp.GroupTaylorImportance,  # first-order Taylor (Molchanov et al. 2019)
        "fpgm": imp.FPGMImportance,  # geometric median (He et al. 2019)
        "random": imp.RandomImportance,  # the baseline every criterion must beat
    }


IMPORTANCE_NAMES = ("l1", "l2", "bn_scale", "taylor", "fpgm", "random")
NEEDS_GRADIENTS = {"taylor"}


def importance(name: str):
    table = _importance_table()
    if name not in table:
        raise UserError(
            f"unknown importance {name!r}", field="stages.prune.importance", fix=f"use one of {', '.join(table)}"
        )
    return table[name]()


# --- depth: whole residual blocks ------------------------------------------------------------------


def removable_blocks(model: nn.Module, input_shape: tuple[int, ...], structural: bool = False) -> dict[str, int]:
    """Blocks that compute act(x + f(x)) with an identity skip and keep the shape, where dropping f is exact
    apart from f itself: the skip is the block's own input, and for a ReLU after the add the input is
    already non-negative (post-activation ResNets), so what remains of the block is the identity.
    Returns each block's input size (elements per image), the cost proxy for choosing among them.

    ``structural``: skip the non-negativity test, the one that needs values, so that a model on the meta
    device can be probed: the blocks returned are then a superset of the removable ones (preflight's bound)."""
    from deploycraft.models.layers import ResidualAdd

    owners = {
        name: m for name, m in model.named_modules() if name and any(isinstance(c, ResidualAdd) for c in m.children())
    }
    seen: dict[str, dict] = {}
    handles = []
    for name, block in owners.items():
        add = next(c for c in block.children() if isinstance(c, ResidualAdd))
        state = seen.setdefault(name, {})

        def pre(_m, args, state=state):
            state["input"] = args[0]

        def add_pre(mod, args, state=state):
            state["identity"] = args[1] is state.get("input")
            state["act"] = mod.act is not None

        def post(_m, args, out, state=state):
            x = args[0]
            state["same_shape"] = out.shape == x.shape
            state["nonneg"] = structural or bool((x >= 0).all())
            state["activations"] = x[0].numel()

        handles += [
            block.register_forward_pre_hook(pre),
            add.register_forward_pre_hook(add_pre),
            block.register_forward_hook(post),
        ]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            model(torch.rand(2, *input_shape, device=param.device if param is not None else None))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return {
        n: s["activations"]
        for n, s in seen.items()
        if s.get("identity") and s.get("same_shape") and (not s.get("act") or s.get("nonneg"))
    }


def block_scores(model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """How much the loss rises when each block's branch is skipped (Veit et al. 2016 show single blocks of
    a ResNet can go with little loss; this measures which)."""
    model.eval()

    def loss() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)

    base = loss()
    scores = {}
    for name in names:
        handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _out: args[0])
        try:
            scores[name] = loss() - base
        finally:
            handle.remove()
    return scores


def remove_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return model


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def ignored_layers(model: nn.Module, prune_stem: bool) -> list[nn.Module]:
    """The classifier always stays whole (its outputs are the classes); the stem by choice."""
    keep: list[nn.Module] = [model.get_classifier()] if hasattr(model, "get_classifier") else []
    if not prune_stem:
        stem = stem_conv(model)
        if stem is not None:
            keep.append(stem)
    return keep


@dataclass
class PruneSettings:
    importance: str = "l1"
    round_to: int | None = 8
    max_layer_ratio: float = 0.8
    global_pruning: bool = False
    prune_stem: bool = False


GradientFn = Callable[[nn.Module], None]  # fills .grad of the parameters (Taylor importance)


def prune_once(
    model: nn.Module,
    ratio: float,
    settings: PruneSettings,
    input_shape: tuple[int, ...],
    gradients: GradientFn | None = None,
    seed: int = 0,
    strict: bool = True,
) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable group of ``model``, in place.

    ``strict``: a ratio that removes nothing (every group coupled to a kept layer, or the ratio would
    take each group below its floor) is an error; a search passes False and sees an unchanged model.
    """
    import torch_pruning as tp

    if ratio <= 0:
        return model
    model.eval()
    torch.manual_seed(seed)  # the random criterion, and ties, are reproducible
    example = torch.zeros(1, *input_shape)
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=importance(settings.importance),
            pruning_ratio=ratio,
            max_pruning_ratio=settings.max_layer_ratio,
            global_pruning=settings.global_pruning,
            ignored_layers=ignored_layers(model, settings.prune_stem),
            round_to=settings.round_to,
        )
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises many kinds on graphs it cannot handle
        raise UserError(
            f"{type(model).__name__} cannot be pruned: torch-pruning could not build its dependency graph "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            field="stages.prune",
            fix="remove the prune stage for this architecture",
        ) from None
    if settings.importance in NEEDS_GRADIENTS:
        if gradients is None:
            raise ValueError("taylor importance needs a gradient function")
        model.zero_grad(set_to_none=True)
        gradients(model)
    before = count_params(model)
    pruner.step()
    model.zero_grad(set_to_none=True)
    if strict and count_params(model) == before:
        raise UserError(
            f"{type(model).__name__} has no prunable channels at ratio {ratio:.2f}: every channel group is "
            "coupled to a kept layer (stem or classifier) or would fall below its floor",
            field="stages.prune",
            fix="set prune_stem: true, lower round_to, or remove the prune stage",
        )
    return model


def taylor_gradients(data, batches: int, batch_size: int = 64) -> GradientFn:
    """Accumulate cross-entropy gradients over a few training batches (eval-mode BN, fixed order)."""

    def fill(model: nn.Module) -> None:
        model.eval()
        for i, (x, y) in enumerate(data.train_epoch(batch_size, epoch=10_000, augment=None)):
            if i >= batches:
                break
            F.cross_entropy(model(x), y).backward()

    return fill


def search_ratio(fits: Callable[[float], bool], hi: float, grid: int = 32, refine: int = 5) -> float | None:
    """The smallest ratio in (0, hi] for which ``fits(ratio)`` holds, or None if none does.

    Width rounding makes the pruned size a step function of the ratio, and a ratio that would take a
    group below its floor skips that group altogether, so the size is not monotone near ``hi``: scan a
    grid from small to large, then bisect between the last ratio that missed and the first that fits.
    """
    if fits(0.0):
        return 0.0
    previous = 0.0
    for i in range(1, grid + 1):
        r = hi * i / grid
        if fits(r):
            lo, up = previous, r
            for _ in range(refine):
                mid = (lo + up) / 2
                if fits(mid):
                    up = mid
                else:
                    lo = mid
            return up
        previous = r
    return None


def pruned_copy(
    model: nn.Module,
    ratio: float,
    settings: PruneSettings,
    input_shape,
    gradients=None,
    seed: int = 0,
    strict: bool = False,
) -> nn.Module:
    """A pruned deep copy, for searches: by default a ratio that prunes nothing returns the model unchanged."""
    return prune_once(copy.deepcopy(model), ratio, settings, input_shape, gradients, seed, strict)


def size_of(model: nn.Module, input_shape) -> dict[str, int]:
    return {"macs": count_macs(model, input_shape), "params": count_params(model)}


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def relative_step_ratio(cumulative: float, previous: float) -> float:
    """The ratio of the *current* channels to remove so that ``cumulative`` of the original ones are gone."""
    return 1.0 - (1.0 - cumulative) / (1.0 - previous)
