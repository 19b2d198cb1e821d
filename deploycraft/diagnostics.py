"""Diagnostics of skip-connection networks: gradient flow, layer responses, skip usage and lesions.

Each measurement reproduces a published one, on any model of the zoo:

- **Gradient flow**: the norm of the loss gradient of every conv and linear layer's weights (and of its
  output), in forward order, with BatchNorm using batch statistics as in training. Deep plain nets
  with BN have exploding gradients towards the input at initialisation (Yang et al. 2019, "A mean
  field theory of batch normalization"); the identity shortcuts keep the norms within a narrow range.
- **Layer responses**: the standard deviation of each 3x3 layer's response after its BN, before the
  addition and the non-linearity, on held-out data (He et al. 2016, Fig. 7: ResNets' responses are
  generally smaller than their plain counterparts').
- **Skip usage**: per residual block, the norm of the residual branch relative to the skip input of
  the add; for Highway layers, the statistics of the transform gate T per layer (Srivastava et al.
  2015, Fig. 2).
- **Lesions**: top-1 on held-out data after deleting each residual block alone at test time, its skip
  kept (Veit et al. 2016, Fig. 3 and 5); for networks without residual adds, after deleting each
  3x3 layer (conv and its BN) alone.

Everything returns plain JSON-ready dicts; the plots are drawn from those dicts alone.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.models.layers import ResidualAdd
from deploycraft.progress import bar

Batches = list[tuple[torch.Tensor, torch.Tensor]]
ANALYSES = ("gradients", "responses", "skip", "lesion")


# --------------------------------------------------------------------------------------------
# data and evaluation
# --------------------------------------------------------------------------------------------


def take_images(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int) -> Batches:
    """The first ``n`` images of a batch iterator, as a list of batches (the last one cut to fit)."""
    out: Batches = []
    seen = 0
    for x, y in batches:
        if seen >= n:
            break
        keep = min(len(y), n - seen)
        out.append((x[:keep], y[:keep]))
        seen += keep
    return out


def evaluate(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Top-1 and mean cross-entropy of an eval-mode model over ``batches``."""
    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return {"top1": correct / max(total, 1), "loss": loss / max(total, 1), "images": total}


def _forward_order(model: nn.Module, x: torch.Tensor, types: tuple[type, ...]) -> list[str]:
    """Names of the modules of ``types`` in the order a forward pass runs them (each once)."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name) if name not in order else None)
        for name, m in model.named_modules()
        if isinstance(m, types)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


# --------------------------------------------------------------------------------------------
# gradient flow
# --------------------------------------------------------------------------------------------


def _layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    k = m.kernel_size
    return f"conv{k[0]}x{k[1]}"


def gradient_flow(model: nn.Module, batches: Batches, label: str = "model") -> dict[str, Any]:
    """Per-layer gradient norms of the cross-entropy on ``batches``, averaged over the batches.

    Measured on a copy whose BatchNorms use batch statistics, as in training (at initialisation the
    running statistics are 0 and 1 and say nothing), while dropout, stochastic depth and shake-shake
    stay in their deterministic eval form so that only the weights decide the numbers.
    ``weight_grad`` is ||dL/dW|| of each conv and linear layer, ``output_grad`` ||dL/dy|| of its output
    (defined even where a zero-initialised BN makes the weight gradients of a branch exactly 0).
    """
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    layers = _forward_order(model, batches[0][0][:2], (nn.Conv2d, nn.Linear))
    modules = dict(net.named_modules())
    weight = {n: 0.0 for n in layers}
    output = {n: 0.0 for n in layers}

    def hook(name: str):
        def fwd(_m, _args, out):
            if out.requires_grad:
                out.register_hook(lambda g: output.__setitem__(name, output[name] + float(g.norm())))

        return fwd

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        for x, y in batches:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            for n in layers:
                g = modules[n].weight.grad
                weight[n] += float(g.norm()) if g is not None else 0.0
    finally:
        for h in handles:
            h.remove()
    k = len(batches)
    rows = [
        {
            "name": n,
            "kind": _layer_kind(modules[n]),
            "weight_grad": weight[n] / k,
            "weight_norm": float(modules[n].weight.detach().norm()),
            "output_grad": output[n] / k,
        }
        for n in layers
    ]
    return {"label": label, "batches": k, "images": sum(len(y) for _, y in batches), "layers": rows, **_spans(rows)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _spans(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """First-layer / last-layer ratios and the max/min span of both gradient norms; zero norms are counted,
    not divided by (a zero-initialised BN zeroes the weight gradients of its branch at init)."""
    out: dict[str, Any] = {}
    for key in ("weight_grad", "output_grad"):
        values = [r[key] for r in rows]
        nonzero = [v for v in values if v > 0]
        out[key] = {
            "first_last_ratio": _ratio(values[0], values[-1]) if values else None,
            "span": _ratio(max(nonzero), min(nonzero)) if nonzero else None,
            "log10_span": math.log10(max(nonzero) / min(nonzero)) if nonzero else None,
            "zero_layers": len(values) - len(nonzero),
        }
    return out


# --------------------------------------------------------------------------------------------
# layer responses (He et al. 2016, Fig. 7)
# --------------------------------------------------------------------------------------------


def layer_responses(model: nn.Module, batches: Batches) -> list[dict[str, Any]]:
    """Std of each 3x3 conv's response after the BN that reads it, over every element of ``batches``.

    A 3x3 conv whose output goes to a BN (post-activation nets: ResNet, plain, Highway, PyramidNet) is
    measured at that BN's output, before the residual add and the ReLU. A 3x3 conv followed by
    anything else (the last conv of a pre-activation unit feeds the add directly) has no such response
    and is not listed.
    """
    model.eval()
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}
    outputs: dict[int, str] = {}  # id of a 3x3 conv's output tensor -> conv name (this batch)
    sums: dict[str, list] = {}  # conv name -> [bn name, n, sum, sum of squares]
    order: list[str] = []

    def conv_hook(m, _args, out):
        outputs[id(out)] = convs[m]

    def bn_hook(name: str):
        def fwd(_m, args, out):
            conv = outputs.get(id(args[0]))
            if conv is None:
                return
            acc = sums.setdefault(conv, [name, 0, 0.0, 0.0])
            if conv not in order:
                order.append(conv)
            o = out.detach().double()
            acc[1] += o.numel()
            acc[2] += float(o.sum())
            acc[3] += float((o * o).sum())

        return fwd

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_hook(bn_hook(n)) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    _forward_hooked(model, batches, handles, before=outputs.clear)
    rows = []
    for conv in order:
        bn, n, s, ss = sums[conv]
        mean = s / n
        rows.append({"name": conv, "bn": bn, "std": math.sqrt(max(ss / n - mean * mean, 0.0))})
    return rows


# --------------------------------------------------------------------------------------------
# skip usage and Highway gates
# --------------------------------------------------------------------------------------------


def residual_adds(model: nn.Module) -> dict[str, str]:
    """Every residual add, by the name of the block that owns it: {block name: add module name}."""
    return {n.rpartition(".")[0]: n for n, m in model.named_modules() if isinstance(m, ResidualAdd)}


def skip_usage(model: nn.Module, batches: Batches) -> list[dict[str, Any]]:
    """Per residual block: the residual branch's norm relative to the skip input of its add.

    ``ratio`` is the mean over images of ||branch|| / ||skip|| (each image's tensors flattened);
    ``rms_ratio`` is sqrt(sum ||branch||^2 / sum ||skip||^2) over all images. A ratio near 0 means the
    block passes its input on almost unchanged (Veit et al. 2016; He et al. 2016, section 4.2).
    """
    model.eval()
    adds = residual_adds(model)
    modules = dict(model.named_modules())
    acc = {b: [0, 0.0, 0.0, 0.0] for b in adds}  # images, sum of ratios, sum ||branch||^2, sum ||skip||^2

    def hook(block: str):
        def pre(_m, args):
            branch, skip = args[0].detach().flatten(1).double(), args[1].detach().flatten(1).double()
            nb, ns = branch.norm(dim=1), skip.norm(dim=1)
            a = acc[block]
            a[0] += len(nb)
            a[1] += float((nb / ns.clamp_min(1e-12)).sum())
            a[2] += float((nb * nb).sum())
            a[3] += float((ns * ns).sum())

        return pre

    handles = [modules[add].register_forward_pre_hook(hook(block)) for block, add in adds.items()]
    _forward_hooked(model, batches, handles)
    order = _forward_order(model, batches[0][0][:2], (ResidualAdd,))
    by_add = {add: block for block, add in adds.items()}
    rows = []
    for add in order:
        n, ratio_sum, b2, s2 = acc[by_add[add]]
        if n:
            rows.append(
                {"name": by_add[add], "ratio": ratio_sum / n, "rms_ratio": math.sqrt(b2 / s2) if s2 > 0 else None}
            )
    return rows


def _forward_hooked(model: nn.Module, batches: Batches, handles: list, before=None) -> None:
    """Every batch through ``model`` without gradients, then the hooks removed (also on failure)."""
    try:
        with torch.no_grad():
            for x, _ in batches:
                if before is not None:
                    before()
                model(x)
    finally:
        for h in handles:
            h.remove()


def highway_gates(model: nn.Module, batches: Batches) -> list[dict[str, Any]]:
    """Transform-gate statistics of every Highway layer (a module with ``transform_gate`` and a ``gate``).

    ``mean``/``std`` over every gate value (units, positions, images); ``unit_mean_min``/``max`` over the
    per-unit means; ``units_open`` the fraction of units whose mean T is above 0.5 (mostly transforming
    rather than carrying); ``units_closed`` below 0.1 (Srivastava et al. 2015, Fig. 2).
    """
    model.eval()
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "transform_gate") and hasattr(m, "gate")}
    stats: dict[str, dict[str, Any]] = {
        n: {"n": 0, "sum": 0.0, "sq": 0.0, "unit_sum": 0.0, "per_unit": 0} for n in layers
    }

    def hook(name: str):
        def fwd(_m, _args, out):
            t = out.detach().double()
            per_unit = t.transpose(0, 1).flatten(1)  # (units, images x positions)
            s = stats[name]
            s["n"] += t.numel()
            s["sum"] += float(t.sum())
            s["sq"] += float((t * t).sum())
            s["unit_sum"] = s["unit_sum"] + per_unit.sum(1)
            s["per_unit"] += per_unit.shape[1]

        return fwd

    handles = [m.gate.register_forward_hook(hook(n)) for n, m in layers.items()]
    _forward_hooked(model, batches, handles)
    rows = []
    order = _forward_order(model, batches[0][0][:2], tuple({type(m) for m in layers.values()})) if layers else []
    for name in order:
        s = stats[name]
        mean = s["sum"] / s["n"]
        unit_mean = s["unit_sum"] / s["per_unit"]
        rows.append(
            {
                "name": name,
                "mean": mean,
                "std": math.sqrt(max(s["sq"] / s["n"] - mean * mean, 0.0)),
                "unit_mean_min": float(unit_mean.min()),
                "unit_mean_max": float(unit_mean.max()),
                "units_open": float((unit_mean > 0.5).double().mean()),
                "units_closed": float((unit_mean < 0.1).double().mean()),
                "units": len(unit_mean),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# lesions (Veit et al. 2016)
# --------------------------------------------------------------------------------------------


@dataclass
class LesionUnit:
    """What one lesion deletes: a residual block's branch, or a plain 3x3 layer (conv and its BN)."""

    name: str
    kind: str  # "block" or "layer"
    downsampling: bool  # the unit changes the spatial resolution
    identity_skip: bool  # block: the skip is the block's input itself; layer: in and out shapes match
    add: str | None = None  # block: its ResidualAdd
    bn: str | None = None  # layer: the BN that reads the conv's output


def lesion_units(model: nn.Module, x: torch.Tensor) -> list[LesionUnit]:
    """The units a lesion study deletes one at a time, in forward order.

    With residual adds: every block that owns one. Without (plain nets, DenseNet): every 3x3 conv but the
    network's first (the stem reads the image; deleting it leaves nothing of the learned input features).
    """
    model.eval()
    modules = dict(model.named_modules())
    adds = residual_adds(model)
    seen: dict[str, dict[str, Any]] = {}
    handles = []
    if adds:
        for block, add in adds.items():
            state = seen.setdefault(block, {})
            owner = modules[block] if block else model

            def pre(_m, args, state=state):
                state["input"] = args[0]

            def add_pre(_m, args, state=state):
                state["identity"] = args[1] is state.get("input")

            def post(_m, args, out, state=state):
                state["down"] = tuple(out.shape[2:]) != tuple(args[0].shape[2:])
                state.pop("input", None)

            handles += [
                owner.register_forward_pre_hook(pre),
                modules[add].register_forward_pre_hook(add_pre),
                owner.register_forward_hook(post),
            ]
        kinds: tuple[type, ...] = (ResidualAdd,)
    else:
        convs = {n for n, m in modules.items() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)}
        outputs: dict[int, str] = {}
        name_of = {m: n for n, m in modules.items()}

        def conv_post(m, args, out):
            name = name_of[m]
            outputs[id(out)] = name
            seen[name] = {
                "down": tuple(out.shape[2:]) != tuple(args[0].shape[2:]),
                "identity": tuple(out.shape) == tuple(args[0].shape),
            }

        def bn_post(m, args, _out):
            conv = outputs.get(id(args[0]))
            if conv is not None:
                seen[conv]["bn"] = name_of[m]

        handles += [modules[n].register_forward_hook(conv_post) for n in convs]
        handles += [m.register_forward_hook(bn_post) for m in modules.values() if isinstance(m, nn.BatchNorm2d)]
        kinds = (nn.Conv2d,)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if adds:
        by_add = {add: block for block, add in adds.items()}
        order = [by_add[a] for a in _forward_order(model, x, kinds)]
        return [
            LesionUnit(b, "block", seen[b].get("down", False), seen[b].get("identity", False), add=adds[b])
            for b in order
        ]
    order = [n for n in _forward_order(model, x, kinds) if n in seen][1:]
    return [LesionUnit(n, "layer", seen[n]["down"], seen[n]["identity"], bn=seen[n].get("bn")) for n in order]


def _substitute(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """What a deleted layer passes on: its input, subsampled by the stride and with channels zero-padded or
    dropped to the conv's width (He et al.'s option A where the shape changes; the identity elsewhere)."""
    s = conv.stride[0]
    if s > 1:
        x = x[:, :, ::s, ::s]
    extra = conv.out_channels - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    elif extra < 0:
        x = x[:, : conv.out_channels]
    return x


@contextmanager
def lesioned(model: nn.Module, unit: LesionUnit) -> Iterator[nn.Module]:
    """``model`` with ``unit`` deleted for the duration of the block (hooks; no weights change).

    A block keeps only its skip: the branch input of its add is zero, so a post-activation block with an
    identity skip computes relu(x) = x, a Highway layer carries its input (T = 0). A layer is replaced by
    its input (see ``_substitute``) and its BN by the identity.
    """
    modules = dict(model.named_modules())
    handles = []
    if unit.kind == "block":
        handles.append(
            modules[unit.add].register_forward_pre_hook(lambda _m, args: (torch.zeros_like(args[0]), *args[1:]))
        )
    else:
        conv = modules[unit.name]
        handles.append(conv.register_forward_hook(lambda m, args, _out: _substitute(args[0], m)))
        if unit.bn is not None:
            handles.append(modules[unit.bn].register_forward_hook(lambda _m, args, _out: args[0]))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recalibrated_bn(model: nn.Module, batches: Batches) -> Iterator[nn.Module]:
    """``model`` with every BatchNorm's running statistics re-estimated on ``batches`` (with whatever hooks
    are active), restored when the block ends.

    Each batch's statistics count by its number of images (a short last batch counts less); the variance
    is, as in training, the average of the batches' unbiased variances. Only the BN layers run in training
    mode while they are re-estimated: dropout, stochastic depth and shake-shake stay in eval mode, and no
    weight changes. A batch of one image cannot be normalised by batch statistics: give at least two.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, copy.deepcopy(m.state_dict()), m.momentum) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.train()
        seen = 0
        with torch.no_grad():
            for x, _ in batches:
                seen += len(x)
                for m in bns:  # running = running + (batch - running) * n / seen: the mean over images so far
                    m.momentum = len(x) / seen
                model(x)
        model.eval()
        yield model
    finally:
        for m, state, momentum in saved:
            m.load_state_dict(state)
            m.momentum = momentum
        for m, training in modes:
            m.training = training


def lesion_study(
    model: nn.Module,
    batches: Batches,
    units: list[LesionUnit] | None = None,
    show: bool = True,
    recalibrate: Batches | None = None,
) -> dict[str, Any]:
    """Top-1 and loss on ``batches`` with each unit deleted alone; the intact model's as the baseline.

    ``recalibrate``: training batches on which the BN statistics are re-estimated after each deletion (and
    for the intact model, the baseline of ``drop_recalibrated``): what a deletion costs once the layers
    behind it normalise what they now receive, apart from what it costs in features.
    """
    units = lesion_units(model, batches[0][0][:2]) if units is None else units
    base = evaluate(model, batches)
    out: dict[str, Any] = {"base_top1": base["top1"], "base_loss": base["loss"], "images": base["images"]}
    if recalibrate:
        with recalibrated_bn(model, recalibrate):
            out["base_top1_recalibrated"] = evaluate(model, batches)["top1"]
        out["recalibration_images"] = sum(len(y) for _, y in recalibrate)
    rows = []
    with bar("lesion study", len(units) if show else 0) as b:
        for u in units:
            with lesioned(model, u):
                r = evaluate(model, batches)
                row = {
                    "name": u.name,
                    "kind": u.kind,
                    "downsampling": u.downsampling,
                    "identity_skip": u.identity_skip,
                    "top1": r["top1"],
                    "drop": base["top1"] - r["top1"],
                    "loss": r["loss"],
                }
                if recalibrate:
                    with recalibrated_bn(model, recalibrate):
                        top1 = evaluate(model, batches)["top1"]
                    row["top1_recalibrated"] = top1
                    row["drop_recalibrated"] = out["base_top1_recalibrated"] - top1
            rows.append(row)
            b.advance(top1=r["top1"])
    out["units"] = rows
    return out


def lesion_summary(lesion: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Median and worst top-1 drop of deleting a unit, for downsampling and other units apart."""
    out: dict[str, Any] = {"chance": 1.0 / num_classes, "base_top1": lesion["base_top1"]}
    if "base_top1_recalibrated" in lesion:
        out["base_top1_recalibrated"] = lesion["base_top1_recalibrated"]
    for key, down in (("non_downsampling", False), ("downsampling", True)):
        rows = [r for r in lesion["units"] if r["downsampling"] == down]
        out[key] = _drops(rows, "drop", "top1") if rows else {"units": 0}
        if rows and "drop_recalibrated" in rows[0]:
            out[key]["recalibrated"] = _drops(rows, "drop_recalibrated", "top1_recalibrated")
    return out


def _drops(rows: list[dict[str, Any]], drop: str, top1: str) -> dict[str, Any]:
    drops = sorted(r[drop] for r in rows)
    worst = max(rows, key=lambda r: r[drop])
    return {
        "units": len(drops),
        "median_drop": _median(drops),
        "max_drop": drops[-1],
        "worst": worst["name"],
        "min_top1": min(r[top1] for r in rows),
        "median_top1": _median(sorted(r[top1] for r in rows)),
    }


def _median(values: list[float]) -> float:
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


# --------------------------------------------------------------------------------------------
# the whole diagnosis
# --------------------------------------------------------------------------------------------


def diagnose(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    *,
    num_classes: int,
    gradient_batches: int = 4,
    snapshots: dict[str, nn.Module] | None = None,
    analyses: tuple[str, ...] | list[str] = ANALYSES,
    show: bool = True,
    recalibration_batches: Batches | None = None,
    recalibration_skipped: str | None = None,
) -> dict[str, Any]:
    """Every measurement on one model, as one JSON-ready dict.

    ``snapshots``: other states of the same network whose gradient flow is measured too, by label
    (``init`` for the initialisation, epochs from checkpoints); the model itself is ``final``.
    ``train_batches``: training images without augmentation (the training error and the gradient
    batches); ``val_batches``: held-out images (responses, skip usage, lesions). ``recalibration_batches``:
    training images the lesion study re-estimates the BN statistics on, or ``recalibration_skipped``: why a
    re-estimation that was asked for is not measured (recorded in the result).
    """
    model.eval()
    out: dict[str, Any] = {
        "arch": type(model).__name__,
        "train": evaluate(model, train_batches),
        "held_out": evaluate(model, val_batches),
        "num_classes": num_classes,
    }
    if "gradients" in analyses:
        grad_batches = train_batches[:gradient_batches]
        states = {**(snapshots or {}), "final": model}
        out["gradient_flow"] = [gradient_flow(m, grad_batches, label) for label, m in states.items()]
    if "responses" in analyses:
        out["layer_responses"] = layer_responses(model, val_batches)
    if "skip" in analyses:
        out["skip_usage"] = skip_usage(model, val_batches)
        out["highway_gates"] = highway_gates(model, val_batches)
    if "lesion" in analyses:
        out["lesion"] = lesion_study(model, val_batches, show=show, recalibrate=recalibration_batches)
        out["lesion_summary"] = lesion_summary(out["lesion"], num_classes)
        if recalibration_skipped:
            out["lesion_recalibration_skipped"] = recalibration_skipped
    return out


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparisons the papers make between networks diagnosed alike (by label, in order).

    For every pair (a, b) with the same number of 3x3 responses: the fraction of layers, position by
    position, where a's response std is smaller than b's (He et al. 2016, Fig. 7).
    """
    labels = list(results)
    out: dict[str, Any] = {
        "training_error": {k: 1 - r["train"]["top1"] for k, r in results.items()},
        "training_loss": {k: r["train"]["loss"] for k, r in results.items()},
        "held_out_top1": {k: r["held_out"]["top1"] for k, r in results.items()},
        "gradient_span_at_init": {},
        "responses_smaller": [],
    }
    for k, r in results.items():
        for g in r.get("gradient_flow", []):
            if g["label"] == "init":
                out["gradient_span_at_init"][k] = {
                    "weight_grad": g["weight_grad"]["span"],
                    "weight_grad_first_last": g["weight_grad"]["first_last_ratio"],
                    "output_grad": g["output_grad"]["span"],
                    "output_grad_first_last": g["output_grad"]["first_last_ratio"],
                }
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            ra, rb = results[a].get("layer_responses"), results[b].get("layer_responses")
            if not ra or not rb or len(ra) != len(rb):
                continue
            smaller = sum(x["std"] < y["std"] for x, y in zip(ra, rb, strict=True))
            out["responses_smaller"].append(
                {"a": a, "b": b, "layers": len(ra), "a_smaller": smaller, "fraction": smaller / len(ra)}
            )
    return out


# --------------------------------------------------------------------------------------------
# plots (drawn from the dicts above alone)
# --------------------------------------------------------------------------------------------

_LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from deploycraft.artifacts import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def plot_gradient_flow(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Per-layer weight and output gradient norms (log scale) for every network and state: one line style per
    network, one colour per state (init, epochs, final)."""
    curves = [(k, g) for k, r in results.items() for g in r.get("gradient_flow", [])]
    if not curves:
        return None
    states = list(dict.fromkeys(g["label"] for _, g in curves))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, key, title in (
        (axes[0], "weight_grad", "||dL/dW|| per layer"),
        (axes[1], "output_grad", "||dL/dy|| per layer output"),
    ):
        for label, g in curves:
            ys = [r[key] for r in g["layers"]]
            xs = [j + 1 for j, v in enumerate(ys) if v > 0]
            style = _LINE_STYLES[list(results).index(label) % len(_LINE_STYLES)]
            color = f"C{states.index(g['label']) % 10}"
            ax.plot(
                xs, [v for v in ys if v > 0], style, color=color, marker=".", ms=3, lw=1, label=f"{label}: {g['label']}"
            )
        ax.set_yscale("log")
        ax.set_xlabel("layer (forward order; convs and the classifier)")
        ax.set_ylabel("gradient norm (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_layer_responses(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """He et al. 2016, Fig. 7: std of each 3x3 layer's response, in layer order and sorted."""
    curves = {k: [r["std"] for r in res.get("layer_responses", [])] for k, res in results.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for label, std in curves.items():
        axes[0].plot(range(1, len(std) + 1), std, marker=".", ms=3, lw=1, label=label)
        axes[1].plot(range(1, len(std) + 1), sorted(std, reverse=True), lw=1.2, label=label)
    for ax, xlabel in ((axes[0], "3x3 layer index (original order)"), (axes[1], "rank (sorted by magnitude)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("std of the response after BN")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("layer responses (before add and ReLU)")
    axes[1].set_title("sorted")
    return _save(fig, path)


def plot_skip_usage(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """||branch|| / ||skip|| per residual block; the mean transform gate (with its std) per Highway layer."""
    skip = {k: r.get("skip_usage") or [] for k, r in results.items()}
    gates = {k: r.get("highway_gates") or [] for k, r in results.items()}
    has_skip, has_gates = any(skip.values()), any(gates.values())
    if not has_skip and not has_gates:
        return None
    plt = _pyplot()
    panels = int(has_skip) + int(has_gates)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), dpi=110, squeeze=False)
    col = 0
    if has_skip:
        ax = axes[0][col]
        for label, rows in skip.items():
            if rows:
                ax.plot(range(1, len(rows) + 1), [r["ratio"] for r in rows], marker="o", ms=3, lw=1, label=label)
        ax.set_xlabel("residual block (forward order)")
        ax.set_ylabel("mean ||branch|| / ||skip||")
        ax.set_ylim(bottom=0)
        ax.set_title("skip usage on held-out images")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        col += 1
    if has_gates:
        ax = axes[0][col]
        for label, rows in gates.items():
            if rows:
                xs = range(1, len(rows) + 1)
                ax.errorbar(
                    xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", capsize=3, label=label
                )
        ax.set_xlabel("Highway layer (forward order)")
        ax.set_ylabel("transform gate T: mean ± std")
        ax.set_ylim(0, 1)
        ax.set_title("Highway transform gates")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_lesion(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Veit et al. 2016, Fig. 3: top-1 after deleting each unit alone; downsampling units marked."""
    studies = {k: r["lesion"] for k, r in results.items() if r.get("lesion") and r["lesion"]["units"]}
    if not studies:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    chance = None
    for label, les in studies.items():
        units = les["units"]
        xs = list(range(1, len(units) + 1))
        kind = units[0]["kind"]
        line = ax.plot(xs, [u["top1"] * 100 for u in units], marker=".", ms=4, lw=1, label=f"{label} ({kind}s)")[0]
        down = [(x, u["top1"] * 100) for x, u in zip(xs, units, strict=True) if u["downsampling"]]
        if down:
            xs_down, ys_down = zip(*down, strict=True)
            ax.scatter(xs_down, ys_down, marker="s", s=40, facecolors="none", edgecolors=line.get_color(), zorder=3)
        ax.axhline(les["base_top1"] * 100, color=line.get_color(), ls="--", lw=0.8)
        if all("top1_recalibrated" in u for u in units):
            ax.plot(
                xs,
                [u["top1_recalibrated"] * 100 for u in units],
                ls=":",
                marker="x",
                ms=4,
                lw=1,
                color=line.get_color(),
                label=f"{label}, BN re-estimated",
            )
        chance = 100 / results[label]["num_classes"]
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.scatter([], [], marker="s", s=40, facecolors="none", edgecolors="black", label="downsampling unit")
    ax.plot([], [], "k--", lw=0.8, label="intact model")
    ax.set_ylim(0, 100)
    ax.set_xlabel("deleted unit (forward order)")
    ax.set_ylabel("held-out top-1 after the deletion, %")
    ax.set_title("lesion study: one unit deleted at a time")
    ax.grid(True, alpha=0.3)
    # Below the axes: the points fill the whole 0-100 % range, so no corner of the frame is free.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return _save(fig, path)


PLOTS = {
    "gradient_flow": plot_gradient_flow,
    "layer_responses": plot_layer_responses,
    "skip_usage": plot_skip_usage,
    "lesion": plot_lesion,
}


def write_plots(results: dict[str, dict[str, Any]], folder: Path) -> dict[str, str]:
    """Every plot that has data, as ``folder/<name>.png``; returns {name: file name}."""
    written = {}
    for name, fn in PLOTS.items():
        p = fn(results, folder / f"{name}.png")
        if p is not None:
            written[name] = p.name
    return written
