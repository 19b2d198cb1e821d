"""The starting model (internal, always first): seeded random init, or the user's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from deploycraft.errors import UserError
from deploycraft.models.io import load_checkpoint, save_model
from deploycraft.models.registry import create_model
from deploycraft.stages.base import Stage, StageOutput, register_stage


def trains_model(recipe) -> bool:
    """Whether a stage of the recipe trains every weight of the starting model, its classifier included: an
    enabled train stage with epochs > 0 (epochs: 0 keeps the loaded weights), or an enabled distill stage with
    a teacher checkpoint of its own (without one the teacher is the starting model itself)."""
    train, distill = recipe.stage("train"), recipe.stage("distill")
    return (recipe.enabled("train") and train.epochs > 0) or (recipe.enabled("distill") and distill.teacher is not None)


@register_stage
class InitStage(Stage):
    type = "init"
    rank = -1
    internal = True

    @classmethod
    def check(cls, recipe, index: int) -> None:
        deploys = any(recipe.enabled(t) for t in ("quantize", "export", "verify"))
        if not deploys or trains_model(recipe):
            return
        if recipe.model.weights is None:
            raise UserError(
                "the model would be untrained: no enabled train stage with epochs > 0 (nor a distill stage with a "
                "teacher) and no checkpoint",
                field="model.weights",
                fix="add a train stage, or set model.weights to a trained checkpoint",
            )
        if recipe.model.reset_classifier:
            raise UserError(
                "starts a new, randomly initialised classifier, and no enabled train stage with epochs > 0 (nor a "
                "distill stage with a teacher) trains it: the model would be deployed with an untrained classifier",
                field="model.reset_classifier",
                fix="add a train stage with epochs >= 1 to fine-tune it, or remove model.reset_classifier to keep "
                "the checkpoint's classifier",
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
