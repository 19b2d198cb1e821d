"""Distill stage: recover a pruned (or any) student's accuracy from a teacher's soft targets.

The teacher is the model before pruning unless the recipe names one. With ``control: true`` a copy of
the student is also fine-tuned with plain cross-entropy under the same schedule, so the report shows
what distillation adds over fine-tuning alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

from deploycraft.distill import Distiller
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models.io import load_checkpoint, load_model, read_spec, save_model
from deploycraft.models.registry import create_model
from deploycraft.progress import log
from deploycraft.recipe import DistillConfig
from deploycraft.stages.base import Stage, StageOutput, register_stage
from deploycraft.stages.train import train_epochs


def build_teacher(ctx, cfg: DistillConfig):
    if cfg.teacher is None:
        return ctx.load_model(ctx.reference_dir), "the model before pruning"
    t = cfg.teacher
    kwargs = {"num_classes": t.num_classes, "in_chans": t.in_chans or ctx.in_chans, **t.kwargs}
    teacher = create_model(t.arch, **kwargs)
    load_checkpoint(teacher, Path(t.weights), strict=t.strict, reset_classifier=False)
    return teacher.eval(), f"{t.arch} from {t.weights}"


@register_stage
class DistillStage(Stage):
    type = "distill"
    config: DistillConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        spec = read_spec(ctx.model_dir)
        student = ctx.load_model()
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
        metrics["top1_student_before"] = top1(torch_predictor(student), data, 256, "top-1 student before")
        metrics["top1_teacher"] = top1(torch_predictor(teacher), data, 256, "top-1 teacher")
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
            )
        finally:
            distiller.close()
            teacher.to("cpu")
        metrics["top1_kd"] = history[-1]["val_top1"]
        metrics["history"] = history
        save_model(student, workdir / "model", spec["arch"], spec["kwargs"])
        if cfg.control:
            control_dir = workdir / "control"
            if (control_dir / "model" / "spec.json").is_file():
                control = load_model(control_dir / "model")
                metrics["top1_control"] = top1(torch_predictor(control), data, 256, "top-1 control")
            else:
                control = initial
                ctrl = train_epochs(
                    control, data, cfg, control_dir, ctx.recipe.seed, label="control fine-tune", device=ctx.device
                )
                metrics["top1_control"] = ctrl[-1]["val_top1"]
                save_model(control, control_dir / "model", spec["arch"], spec["kwargs"])
            metrics["kd_minus_control"] = metrics["top1_kd"] - metrics["top1_control"]
            log(
                f"  KD top-1 {metrics['top1_kd']:.4f} vs plain fine-tuning {metrics['top1_control']:.4f} "
                f"({metrics['kd_minus_control'] * 100:+.2f} points)"
            )
        return StageOutput(model="model", metrics=metrics)
