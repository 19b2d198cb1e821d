"""The run context: what a stage reads (the recipe, the data, the current model, the deployables so far)
and what the pipeline records after each stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deploycraft.distributed import World
from deploycraft.errors import UserError
from deploycraft.models.io import load_model

if TYPE_CHECKING:
    from deploycraft.artifacts import RunDir
    from deploycraft.data import DataModule
    from deploycraft.recipe import Recipe
    from deploycraft.stages.base import StageOutput


@dataclass
class Artifact:
    """A deployable file a stage produced."""

    path: str  # relative to the run folder
    format: str
    precision: str
    backend: str
    target: str | None = None
    deploy_path: str | None = None  # where _finish copied it, relative to the run folder
    companions: list[str] = field(default_factory=list)  # files shipped beside it (a TensorRT engine's manifest)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "backend": self.backend, "target": self.target}


def resolve_device(wanted: str) -> str:
    """The torch device for training: auto is cuda when a GPU is visible."""
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device is cuda but torch sees no GPU",
            field="device",
            fix="set device: cpu (or auto), or install a CUDA build of torch on a GPU machine",
        )
    return wanted


@dataclass
class RunContext:
    recipe: Recipe
    run: RunDir
    model_dir: Path | None = None  # the current float model (spec.json + weights.pt)
    reference_dir: Path | None = None  # the FP32 model before pruning: the accuracy reference
    # Deployables by model name (names.ModelName values; plain strings keep names.py out of every stage).
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # metrics by stage type
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    world: World = field(default_factory=World)  # the processes of a data-parallel run (one by default)

    @cached_property
    def data(self) -> DataModule:
        from deploycraft.data import build_data

        return build_data(self.recipe.data, self.recipe.seed)

    @property
    def device(self) -> str:
        return resolve_device(self.recipe.device)

    @property
    def in_chans(self) -> int:
        return self.recipe.model.in_chans or self.recipe.data.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.recipe.data.image_size, self.recipe.data.image_size)

    def load_model(self, folder: Path | None = None) -> torch.nn.Module:
        return load_model(folder or self.model_dir)

    def load_shared_model(self, folder: Path | None = None) -> torch.nn.Module:
        """The model on every rank of a data-parallel stage, read by rank 0 (other machines may not see the
        run folder); the same as ``load_model`` in a single process."""
        return self.world.load_model(folder or self.model_dir)

    def artifact_path(self, name: str) -> Path:
        return self.run.root / self.artifacts[name].path

    def apply(self, type_: str, stage_dir: Path, out: StageOutput) -> None:
        """Take a stage's output as the current state: its model, its deployables, its metrics."""
        if out.model is not None:
            self.model_dir = stage_dir / out.model
            if type_ in ("init", "train"):
                self.reference_dir = self.model_dir
        for name, art in out.artifacts.items():
            rel = str((stage_dir / art["path"]).relative_to(self.run.root))
            self.artifacts[str(name)] = Artifact(**{**art, "path": rel})
        self.results[type_] = out.metrics
        self.stage_dirs[type_] = stage_dir
