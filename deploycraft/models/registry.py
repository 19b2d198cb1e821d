"""Model registry: every architecture deploycraft can build, by name.

Entrypoints are small functions that fill in constructor arguments and hand off to the family's
builder (timm's pattern). They take keyword arguments only; a duplicate name is an error.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from deploycraft.errors import UserError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    fn: Callable[..., nn.Module]
    # Input the entrypoint was designed for: "imagenet" (224 px stem with stride 4) or "cifar" (32 px).
    input_style: str = "imagenet"


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(family: str, input_style: str = "imagenet") -> Callable:
    """Decorator: register an entrypoint under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name=name, family=family, fn=fn, input_style=input_style)
        return fn

    return wrap


def _ensure_loaded() -> None:
    # Importing the family modules registers their entrypoints.
    import deploycraft.models.zoo  # noqa: F401


def list_models(family: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(n for n, i in _REGISTRY.items() if family is None or i.family == family)


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown model {name!r}{hint}",
            field="model.arch",
            fix="run `deploycraft models` to list the registered architectures",
        )
    return _REGISTRY[name]


def is_registered(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet50", num_classes=10, in_chans=1)``."""
    return model_info(name).fn(**kwargs)
