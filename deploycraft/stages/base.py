"""The stage contract: one module per stage owns its config, its run and its report section.

A stage is a class registered by ``@register_stage`` with

- ``Config``: its pydantic config (a ``StageConfig`` with a ``type`` literal); the recipe's stage list
  is the union of every registered stage's config, so a new stage needs no edit to the recipe code;
- ``rank``: where it may stand in the chain (stages of equal rank may come in either order);
- ``reads``: the top-level recipe fields its result depends on (they join its cache key);
- ``reads_calibration``: whether it reads the calibration images (the file's content joins its cache key);
- ``key_config(config)``: its settings as they join the cache key (less those its method ignores);
- ``derived(recipe, config)``: settings whose defaults it takes from elsewhere in the recipe (they join its
  cache key too; every file its config names joins it by content);
- ``check(recipe, index)``: rules about the recipe as a whole, run by ``validate`` and ``run`` alike;
- ``preflight(pre, index)``: checks that need files or the built model, also before anything runs;
- ``run(ctx, workdir) -> StageOutput``: the work, reading the current model and deployables from the
  run context and writing only into ``workdir``;
- ``data_parallel`` (or ``runs_data_parallel()``, for a stage that trains only in some configs): whether
  every rank of a torchrun launch runs it (training through ``train_epochs`` with ``ctx.world``, models
  through ``ctx.load_shared_model``; only rank 0 writes, and only rank 0's output counts) or rank 0 alone
  while the other ranks wait (the default);
- ``report_section(report)``: its lines of report.md, rendered from report.json alone.

Adding a stage is adding its module to this package (it is discovered), its tests and its docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from deploycraft.config import StageConfig

if TYPE_CHECKING:
    from deploycraft.context import RunContext
    from deploycraft.preflight import Preflight
    from deploycraft.recipe import Recipe


@dataclass
class StageOutput:
    # Folder (relative to the stage's work folder) of the model this stage hands on, if it changed it.
    model: str | None = None
    # Deployables by name: {"path": relative file, "format": "onnx", "precision": "int8", ...}.
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    type: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    rank: ClassVar[int]
    # report.md shows sections in this order (the result first, then how it was made).
    report_order: ClassVar[int] = 100
    # Top-level recipe fields the stage's result depends on; they join its cache key.
    reads: ClassVar[tuple[str, ...]] = ()
    # Reads the calibration images (data.calibration): the named file's content joins its cache key.
    reads_calibration: ClassVar[bool] = False
    # Internal stages (the starting model) are not recipe entries.
    internal: ClassVar[bool] = False
    # Run on every rank of a data-parallel launch (torchrun) rather than on rank 0 alone.
    data_parallel: ClassVar[bool] = False

    def __init__(self, config: StageConfig | None):
        self.config = config

    @classmethod
    def check(cls, recipe: Recipe, index: int) -> None:
        """Rules that involve the rest of the recipe; raise UserError naming stages.<index>.<field>."""

    @classmethod
    def preflight(cls, pre: Preflight, index: int) -> None:
        """Checks that need the file system or a built model, before any stage runs (validate runs them too)."""

    @classmethod
    def key_config(cls, config: StageConfig) -> dict[str, Any]:
        """The settings that join the stage's cache key: all of them, less those its chosen method ignores
        (changing an ignored setting must not re-run the stage)."""
        return config.model_dump(mode="json")

    @classmethod
    def derived(cls, recipe: Recipe, config: StageConfig | None) -> dict[str, Any]:
        """Settings whose defaults the stage takes from elsewhere in the recipe (a later stage, say): they join
        its cache key, so that a change there re-runs it. Empty for most stages."""
        return {}

    def runs_data_parallel(self) -> bool:
        """Whether every rank of a data-parallel launch runs this stage with this config."""
        return self.data_parallel

    def run(self, ctx: RunContext, workdir: Path) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        return []


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.type in STAGES:
        raise RuntimeError(f"stage {cls.type!r} is registered twice")
    if not cls.internal and cls.Config.model_fields["type"].default != cls.type:
        raise RuntimeError(f"stage {cls.type!r}: its Config's type literal must be {cls.type!r}")
    STAGES[cls.type] = cls
    return cls


def recipe_stages() -> list[type[Stage]]:
    """The stages a recipe can list, in chain order."""
    return sorted((s for s in STAGES.values() if not s.internal), key=lambda s: (s.rank, s.type))
