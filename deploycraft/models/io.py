"""Saving and rebuilding models without pickled modules.

A saved model is ``spec.json`` (architecture name, constructor arguments, and the shapes of any
layer whose width differs from the architecture's default, as after pruning) plus ``weights.pt``
(a plain state dict). Rebuilding creates the registered architecture, resizes the recorded layers
and loads the state dict with ``torch.load(weights_only=True)``: no code from a file is executed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploycraft.artifacts import atomic_path, read_json, write_json
from deploycraft.errors import UserError
from deploycraft.models.layers import PadShortcut
from deploycraft.models.registry import create_model

SPEC_FORMAT = "deploycraft.model/1"


def layer_shape(m: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments that define a layer's width, for the layer types pruning changes."""
    if isinstance(m, nn.Conv2d):
        return {
            "type": "Conv2d",
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    if isinstance(m, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum}
    if isinstance(m, nn.Linear):
        return {
            "type": "Linear",
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
    if isinstance(m, PadShortcut):
        return {"type": "PadShortcut", "in_channels": m.in_channels, "out_channels": m.out_channels, "stride": m.stride}
    if isinstance(m, nn.Identity):  # a residual block removed by depth pruning
        return {"type": "Identity"}
    return None


def build_layer(shape: dict[str, Any]) -> nn.Module:
    kind = shape["type"]
    args = {k: v for k, v in shape.items() if k != "type"}
    if kind == "Conv2d":
        return nn.Conv2d(**args)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(**args)
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "PadShortcut":
        return PadShortcut(**args)
    if kind == "Identity":
        return nn.Identity()
    raise ValueError(f"unknown layer type {kind!r} in model spec")


def width_diff(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """Layers of ``model`` whose shape differs from ``reference`` (the unpruned architecture)."""
    ref = dict(reference.named_modules())
    diff = {}
    for name, m in model.named_modules():
        shape = layer_shape(m)
        if shape is None:
            continue
        ref_shape = layer_shape(ref[name]) if name in ref else None
        if shape != ref_shape:
            diff[name] = shape
    return diff


def apply_widths(model: nn.Module, widths: dict[str, dict[str, Any]]) -> nn.Module:
    for name, shape in widths.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_layer(shape))
    _sync_attributes(model)
    return model


def _sync_attributes(model: nn.Module) -> None:
    """Keep derived attributes (num_features of the classifier input) in step with resized layers."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if isinstance(head, nn.Linear) and hasattr(model, "num_features"):
        model.num_features = head.in_features


def make_spec(arch: str, kwargs: dict[str, Any], widths: dict | None = None, extra: dict | None = None) -> dict:
    return {"format": SPEC_FORMAT, "arch": arch, "kwargs": kwargs, "widths": widths or {}, **(extra or {})}


def build_from_spec(spec: dict) -> nn.Module:
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a deploycraft model spec: format {spec.get('format')!r}")
    model = create_model(spec["arch"], **spec["kwargs"])
    if spec.get("widths"):
        apply_widths(model, spec["widths"])
    return model


def save_model(model: nn.Module, folder: Path, arch: str, kwargs: dict[str, Any], extra: dict | None = None) -> Path:
    """Write spec.json and weights.pt into ``folder``; the widths are diffed against a fresh build."""
    folder.mkdir(parents=True, exist_ok=True)
    reference = create_model(arch, **kwargs)
    spec = make_spec(arch, kwargs, width_diff(model, reference), extra)
    with atomic_path(folder / "weights.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(folder / "spec.json", spec)
    return folder


def load_model(folder: Path) -> nn.Module:
    spec = read_json(Path(folder) / "spec.json")
    model = build_from_spec(spec)
    state = torch.load(Path(folder) / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_spec(folder: Path) -> dict:
    return read_json(Path(folder) / "spec.json")


# --------------------------------------------------------------------------------------------
# user checkpoints (torchvision format, or a deploycraft weights file)
# --------------------------------------------------------------------------------------------


def _unwrap(obj: Any, field: str = "model.weights") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "weights"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            "the checkpoint holds no state dict of tensors",
            field=field,
            fix="save it with torch.save(model.state_dict(), path)",
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _adapt_first_conv(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Sum RGB filters to one grey channel, or spread a grey filter over RGB (timm's adapt_input_conv)."""
    for name, p in model.state_dict().items():
        w = state.get(name)
        if w is None or w.ndim != 4 or p.ndim != 4 or w.shape == p.shape:
            continue
        if w.shape[0] == p.shape[0] and w.shape[2:] == p.shape[2:] and w.shape[1] != p.shape[1]:
            if p.shape[1] == 1:
                state[name] = w.sum(1, keepdim=True)
            elif w.shape[1] == 1:
                state[name] = w.repeat(1, p.shape[1], 1, 1) / p.shape[1]
        break  # only the first conv's input channels can legitimately differ


def read_checkpoint(path: Path, field: str = "model.weights") -> Any:
    """``torch.load(weights_only=True)`` of a user's file, every failure one UserError naming ``field``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory", field=field, fix="give the path of a .pt/.pth file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", field=field, fix="give the path of a .pt/.pth file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)", field=field, fix="save the state dict again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad user file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot load checkpoint {path} with weights_only=True ({exc.__class__.__name__}"
            f"{': ' + first if first else ''})",
            field=field,
            fix="save a plain state dict: torch.save(model.state_dict(), path)",
        ) from None


def _checkpoint_widths(obj: Any, path: Path, field: str) -> dict[str, dict[str, Any]]:
    """The layer widths recorded in a deploycraft-format checkpoint (a pruned model), checked."""
    spec = obj.get("spec")
    widths = spec.get("widths") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(widths or {}, dict):
        raise UserError(
            f"checkpoint {path} says it is a deploycraft model but its spec is not a mapping with widths",
            field=field,
            fix="save it again from a run folder (spec.json + weights.pt), or save a plain state dict",
        )
    for name, shape in (widths or {}).items():
        try:
            if not isinstance(shape, dict):
                raise ValueError("not a mapping")
            build_layer(shape)
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            raise UserError(
                f"checkpoint {path}: the recorded layer {name!r} cannot be built ({exc})",
                field=field,
                fix="save it again from a run folder (spec.json + weights.pt), or save a plain state dict",
            ) from None
    return widths or {}


def _check_bn_variances(state: dict[str, torch.Tensor], model: nn.Module, path: Path, field: str) -> None:
    """A BatchNorm running variance below zero (finite, so the NaN check passes) turns the layer's output into
    NaN at the first eval-mode forward pass: a damaged or edited file, refused where it is loaded."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        key = f"{name}.running_var" if name else "running_var"
        v = state.get(key)
        if v is not None and v.is_floating_point() and bool((v < 0).any()):
            raise UserError(
                f"checkpoint {path} holds a negative BatchNorm running variance in {key} (min {float(v.min()):.3g}, "
                f"{int((v < 0).sum())} of {v.numel()} values): a variance is never negative, the file is damaged",
                field=field,
                fix="use an intact checkpoint (e.g. of an earlier epoch), or save the state dict again from the "
                "trained model",
            )


def _spec_beside(path: Path) -> dict | None:
    """The deploycraft model spec in the folder of a plain weights file (a run folder's deploy/torch/ or a
    stage's model/), where it records resized or removed layers: the weights are a pruned model's."""
    try:
        spec = read_json(Path(path).parent / "spec.json")
    except (OSError, ValueError):
        return None
    ok = isinstance(spec, dict) and spec.get("format") == SPEC_FORMAT and isinstance(spec.get("widths"), dict)
    return spec if ok and spec["widths"] else None


def _pruned_error(path: Path, spec: dict, detail: str, field: str) -> UserError:
    """A pruned model's plain weights.pt loaded as model.weights: its shapes are not the architecture's; the
    supported way to load it is one deploycraft weights file holding the spec and the state dict."""
    folder = Path(path).parent.as_posix()
    pack = (
        f"python -c \"import json, torch; d = '{folder}'; s = json.load(open(d + '/spec.json')); "
        f"torch.save({{'format': s['format'], 'spec': s, 'model': torch.load(d + '/weights.pt', "
        f"weights_only=True)}}, 'pruned.pt')\""
    )
    return UserError(
        f"checkpoint {path} holds a pruned {spec.get('arch')} ({len(spec['widths'])} layer(s) resized or removed, "
        f"recorded in the spec.json beside it), not the architecture's own shapes: {detail}",
        field=field,
        fix=f"load it with its spec as one deploycraft weights file: {pack}, then set {field}: pruned.pt",
    )


def load_checkpoint(
    model: nn.Module, path: Path, strict: bool = True, reset_classifier: bool = False, field: str = "model.weights"
) -> nn.Module:
    obj = read_checkpoint(path, field)
    packed = isinstance(obj, dict) and obj.get("format") == SPEC_FORMAT and "spec" in obj
    if packed:
        widths = _checkpoint_widths(obj, path, field)
        if widths:
            try:
                apply_widths(model, copy.deepcopy(widths))
            except (AttributeError, TypeError, ValueError) as exc:
                raise UserError(
                    f"checkpoint {path}: its recorded widths do not fit {type(model).__name__} ({exc})",
                    field=field,
                    fix="choose the architecture the checkpoint was saved from (model.arch)",
                ) from None
    state = _unwrap(obj, field)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(
            f"checkpoint {path} holds NaN or infinite values in {bad}",
            field=field,
            fix="use the checkpoint of an epoch before training diverged",
        )
    _check_bn_variances(state, model, path, field)
    _adapt_first_conv(state, model)
    section = field.rpartition(".")[0] or "model"  # model, or stages.N.teacher
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys: set[str] = set()
    if head is not None:
        head_prefix = next((n for n, m in model.named_modules() if m is head), "")
        head_keys = {k for k in own if k.startswith(head_prefix + ".")}
    if reset_classifier:
        state = {k: v for k, v in state.items() if k not in head_keys}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        if k in head_keys:
            raise UserError(
                f"the checkpoint's classifier {k} has shape {tuple(state[k].shape)} but the model's "
                f"is {tuple(own[k].shape)}",
                field=f"{section}.num_classes",
                fix=f"set {section}.num_classes to the checkpoint's class count, or {section}.reset_classifier=true",
            )
        detail = f"{k} is {tuple(state[k].shape)}, the model has {tuple(own[k].shape)}"
        spec = None if packed else _spec_beside(path)
        if spec is not None:
            raise _pruned_error(path, spec, detail, field)
        raise UserError(
            f"checkpoint {path} does not fit the model: {detail}",
            field=f"{section}.arch",
            fix="choose the architecture the checkpoint was trained with",
        )
    # BatchNorm's batch counter (PyTorch >= 0.4.1) is absent from older files, torchvision's original
    # downloads among them: torch's strict loading accepts them and keeps the module's own counter (its
    # _load_from_state_dict fills the key in), so these keys alone may be missing here too.
    counters = {
        f"{n}.num_batches_tracked" if n else "num_batches_tracked"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }
    missing = [k for k in own if k not in state and not (reset_classifier and k in head_keys) and k not in counters]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])}"
                f"{', ...' if len(unexpected) > 3 else ''})"
            )
        spec = None if packed else _spec_beside(path)
        if spec is not None:
            raise _pruned_error(path, spec, "; ".join(parts), field)
        raise UserError(
            f"checkpoint {path} does not match {type(model).__name__}: {'; '.join(parts)}",
            field=field,
            fix=f"check {section}.arch, or set {section}.strict=false to load what matches",
        )
    model.load_state_dict(state, strict=False)
    return model
