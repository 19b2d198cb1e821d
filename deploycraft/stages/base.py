"""The stage contract: a typed config, `run(ctx, workdir) -> StageOutput`, registered by name.

A stage reads the current model and artifacts from the run context, never from CLI arguments or
environment variables, and writes only into its own work folder. What it returns is stored in
``stage.json`` so a later run can reuse the stage without running it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel


@dataclass
class StageOutput:
    # Folder (relative to the stage's work folder) of the model this stage hands on, if it changed it.
    model: str | None = None
    # Deployables by name: {"path": relative file, "format": "onnx", "precision": "int8", ...}.
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    type: ClassVar[str]

    def __init__(self, config: BaseModel):
        self.config = config

    def run(self, ctx, workdir: Path) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.type in STAGES:
        raise RuntimeError(f"stage {cls.type!r} is registered twice")
    STAGES[cls.type] = cls
    return cls
