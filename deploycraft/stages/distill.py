"""Distill stage: recover a pruned (or any) student's accuracy from a teacher's soft targets.

The teacher is the model before pruning unless the recipe names one. With ``control: true`` a copy of
the student is also fine-tuned with plain cross-entropy under the same schedule, so the report shows
what distillation adds over fine-tuning alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from deploycraft.config import FilePath, ModelConfig, ParallelOptimConfig, StageConfig
from deploycraft.distill import Distiller, check_stages
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models.io import load_checkpoint, load_model, make_spec, read_spec, save_model, width_diff
from deploycraft.models.registry import create_model
from deploycraft.progress import log
from deploycraft.stages.base import Stage, StageOutput, register_stage
from deploycraft.stages.train import train_epochs


class TeacherConfig(ModelConfig):
    weights: FilePath = Field(description="The teacher's trained checkpoint (required).")


class DistillConfig(StageConfig, ParallelOptimConfig):
    """Knowledge distillation (Hinton et al. 2015): the student (the current model) learns from the teacher's
    softened outputs and, optionally, its stage features."""

    type: Literal["distill"] = "distill"
    epochs: int = Field(2, ge=1, description="Epochs of distillation.")
    lr: float = Field(
        0.02,
        gt=0,
        description="Peak learning rate of SGD (reached after the warm-up), for the global batch_size: not "
        "scaled with the number of processes.",
    )
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    teacher: TeacherConfig | None = Field(
        None, description="Teacher model; default: the model before pruning (the train stage's output)."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft (KD) loss; 1 - alpha weights the labels.")
    feature_weight: float = Field(
        0.0, ge=0, description="Weight of feature distillation on stage outputs (1x1 adapters where widths differ)."
    )
    control: bool = Field(
        False, description="Also fine-tune a copy with plain cross-entropy for the same epochs and report it."
    )


def build_teacher(ctx, cfg: DistillConfig):
    """The teacher on every rank (rank 0 reads its weights)."""
    if cfg.teacher is None:
        return ctx.load_shared_model(ctx.reference_dir), "the model before pruning"
    t = cfg.teacher
    kwargs = {"num_classes": t.num_classes, "in_chans": t.in_chans or ctx.in_chans, **t.kwargs}

    def make():
        teacher = create_model(t.arch, **kwargs)
        load_checkpoint(teacher, Path(t.weights), strict=t.strict, reset_classifier=False)
        return teacher

    def spec_of(teacher):
        with torch.device("meta"):  # the default widths, without drawing from the random generator
            default = create_model(t.arch, **kwargs)
        return make_spec(t.arch, kwargs, width_diff(teacher, default))

    return ctx.world.share_model(make, spec_of).eval(), f"{t.arch} from {t.weights}"


def _saved_control(folder: Path):
    """The control model a previous, interrupted run of this stage finished, if it loads."""
    if not (folder / "spec.json").is_file():
        return None
    try:
        return load_model(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged control model is trained again
        log(f"[yellow]  the control model is damaged ({exc.__class__.__name__}); training it again[/]")
        return None


@register_stage
class DistillStage(Stage):
    type = "distill"
    Config = DistillConfig
    rank = 2
    report_order = 3
    reads = ("device",)
    data_parallel = True
    config: DistillConfig

    @classmethod
    def check(cls, recipe, index: int) -> None:
        cfg = recipe.stages[index]
        if not cfg.enabled:
            return
        prune = recipe.stage("prune")
        if cfg.teacher is None and (prune is None or not prune.enabled):
            raise UserError(
                "distill has no teacher: without a prune stage before it the model before pruning is the "
                "student itself",
                field=f"stages.{index}.teacher",
                fix="add a prune stage before distill, or set stages.distill.teacher to a trained checkpoint",
            )
        if cfg.teacher is not None and cfg.teacher.reset_classifier:
            raise UserError(
                "a teacher with a new (random) classifier teaches nothing: its soft targets are its trained "
                "classifier's",
                field=f"stages.{index}.teacher.reset_classifier",
                fix="remove it, and give a teacher trained on the student's classes",
            )
        channels = recipe.data.channels
        if cfg.teacher is not None and cfg.teacher.in_chans not in (None, channels):
            raise UserError(
                f"is {cfg.teacher.in_chans} but data.channels is {channels}: the teacher is fed the same "
                f"{channels}-channel images as the student",
                field=f"stages.{index}.teacher.in_chans",
                fix="remove it (it follows data.channels; the checkpoint's first conv is adapted on loading)",
            )
        if cfg.teacher is not None and cfg.teacher.num_classes != recipe.model.num_classes:
            raise UserError(
                f"the teacher has {cfg.teacher.num_classes} classes, the student {recipe.model.num_classes}",
                field=f"stages.{index}.teacher.num_classes",
                fix="use a teacher trained on the same classes",
            )

    @classmethod
    def preflight(cls, pre, index: int) -> None:
        cfg = pre.recipe.stages[index]
        if not cfg.enabled:
            return
        teacher = None
        if cfg.teacher is not None:
            teacher = pre.build(cfg.teacher, f"stages.{index}.teacher")
            pre.check_checkpoint(cfg.teacher, f"stages.{index}.teacher")
        if cfg.feature_weight > 0:
            check_stages(
                pre.model, teacher, pre.recipe.model.arch, f"stages.{index}.feature_weight",
                "set feature_weight: 0 (logit distillation only)",
            )  # fmt: skip

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        world = ctx.world
        student = ctx.load_shared_model()
        teacher, teacher_desc = build_teacher(ctx, cfg)
        if teacher.get_classifier().out_features != student.get_classifier().out_features:
            raise UserError(
                "the teacher and the student have different numbers of classes",
                field="stages.distill.teacher.num_classes",
                fix="use a teacher trained on the same classes",
            )
        initial = copy.deepcopy(student)
        metrics = {
            "teacher": teacher_desc,
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "feature_weight": cfg.feature_weight,
            "epochs": cfg.epochs,
        }
        metrics["top1_student_before"] = top1(torch_predictor(student), data, 256, "top-1 student before", world)
        metrics["top1_teacher"] = top1(torch_predictor(teacher), data, 256, "top-1 teacher", world)
        log(
            f"  teacher ({teacher_desc}) top-1 {metrics['top1_teacher']:.4f}; student before "
            f"{metrics['top1_student_before']:.4f}"
        )
        distiller = Distiller(
            student, teacher, cfg.temperature, cfg.alpha, cfg.feature_weight, data.sample_input(2), cfg.label_smoothing
        )
        teacher.to(ctx.device)
        try:
            history = train_epochs(
                student,
                data,
                cfg,
                workdir / "kd",
                ctx.recipe.seed,
                distiller.loss,
                label="distill",
                extra=distiller.adapters,
                device=ctx.device,
                field="stages.distill",
                world=world,
            )
        finally:
            distiller.close()
            teacher.to("cpu")
        metrics["top1_kd"] = history[-1]["val_top1"]
        metrics["history"] = history
        spec = read_spec(ctx.model_dir) if world.is_main else None
        if world.is_main:
            save_model(student, workdir / "model", spec["arch"], spec["kwargs"])
        if cfg.control:
            control_dir = workdir / "control"
            control = world.share_model(
                lambda: _saved_control(control_dir / "model"), lambda _: read_spec(control_dir / "model")
            )
            if control is not None:
                metrics["top1_control"] = top1(torch_predictor(control), data, 256, "top-1 control", world)
            else:
                control = initial
                ctrl = train_epochs(
                    control,
                    data,
                    cfg,
                    control_dir,
                    ctx.recipe.seed,
                    label="control fine-tune",
                    device=ctx.device,
                    field="stages.distill",
                    world=world,
                )
                metrics["top1_control"] = ctrl[-1]["val_top1"]
                if world.is_main:
                    save_model(control, control_dir / "model", spec["arch"], spec["kwargs"])
            metrics["kd_minus_control"] = metrics["top1_kd"] - metrics["top1_control"]
            log(
                f"  KD top-1 {metrics['top1_kd']:.4f} vs plain fine-tuning {metrics['top1_control']:.4f} "
                f"({metrics['kd_minus_control'] * 100:+.2f} points)"
            )
        if not world.is_main:
            return StageOutput()  # rank 0 writes the stage; its output is the stage's
        return StageOutput(model="model", metrics=metrics)

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """Distillation without pruning (after pruning it is part of the pruning section)."""
        from deploycraft.formatting import fmt_pct
        from deploycraft.stages.train import ran_away_words

        lines: list[str] = []
        p = report["stages"].get("prune")
        d = report["stages"].get("distill")
        if d and not p:
            lines += [
                "",
                "## Distillation",
                "",
                f"Teacher {d['teacher']} (top-1 {fmt_pct(d['top1_teacher'])}): student "
                f"{fmt_pct(d['top1_student_before'])} → {fmt_pct(d['top1_kd'])}." + ran_away_words(d.get("history")),
            ]
        return lines
