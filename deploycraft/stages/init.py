"""The starting model (internal, always first): seeded random init, or the user's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from deploycraft.errors import UserError
from deploycraft.models.io import load_checkpoint, save_model
from deploycraft.models.registry import create_model
from deploycraft.stages.base import Stage, StageOutput, register_stage


@register_stage
class InitStage(Stage):
    type = "init"
    rank = -1
    internal = True

    @classmethod
    def check(cls, recipe, index: int) -> None:
        trains = recipe.enabled("train") and recipe.stage("train").epochs > 0
        deploys = any(recipe.enabled(t) for t in ("quantize", "export", "verify"))
        if not trains and recipe.model.weights is None and deploys:
            raise UserError(
                "the model would be untrained: no enabled train stage with epochs > 0 and no checkpoint",
                field="model.weights",
                fix="add a train stage, or set model.weights to a trained checkpoint",
            )

    @classmethod
    def preflight(cls, pre, index: int) -> None:
        pre.model  # noqa: B018 - builds it: bad kwargs fail here, before any stage runs
        pre.check_checkpoint(pre.recipe.model, "model")
        pre.check_classes()

    def run(self, ctx, workdir: Path) -> StageOutput:
        m = ctx.recipe.model
        kwargs = {"num_classes": m.num_classes, "in_chans": ctx.in_chans, **m.kwargs}
        torch.manual_seed(ctx.recipe.seed)
        try:
            model = create_model(m.arch, **kwargs)
        except TypeError as exc:
            raise UserError(
                f"{m.arch} does not accept these arguments ({exc})",
                field="model.kwargs",
                fix="remove the arguments the architecture does not take",
            ) from None
        except ValueError as exc:
            raise UserError(str(exc), field="model.kwargs", fix="use values the architecture accepts") from None
        source = "random init (He et al.)"
        if m.weights is not None:
            load_checkpoint(model, Path(m.weights), strict=m.strict, reset_classifier=m.reset_classifier)
            source = f"checkpoint {m.weights}"
        save_model(model, workdir / "model", m.arch, kwargs)
        return StageOutput(model="model", metrics={"source": source, "arch": m.arch, **kwargs})
