"""Knowledge distillation losses: Hinton's soft targets and feature matching on stage outputs.

Soft targets (Hinton, Vinyals & Dean 2015): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) plus
(1 - alpha) * cross-entropy on the labels; the T^2 keeps the soft gradients on the scale of the hard
ones. Feature distillation (FitNets, Romero et al. 2015) matches the student's stage outputs to the
teacher's through 1x1 adapters where the widths differ (as after pruning). The student may be a plain
model (forward hooks on its stage modules) or the quantized simulation, a torch.fx GraphModule in which the
stage modules are inlined (taps on the graph nodes that carry the stage outputs).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    ) * (t * t)
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return alpha * soft + (1 - alpha) * hard


def stage_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the model's stage features.

    Families declare ``stage_names`` (ResNet: layer1..layer4); otherwise the last module before the
    global pool is used, through ``forward_features``.
    """
    names = getattr(model, "stage_names", None)
    if names is None and isinstance(model, fx.GraphModule):
        names = model.meta.get("stage_names")  # a traced copy keeps its source's stages there
    return list(names) if names else []


def check_stages(student: nn.Module, teacher: nn.Module | None, arch: str, field: str, fix: str) -> list[str]:
    """The student's stage names for feature distillation, or one UserError naming ``field``: the student has no
    stages, or the teacher (when given) has other ones. ``fix`` says how to turn feature distillation off."""
    from deploycraft.errors import UserError

    stages = stage_modules(student)
    if not stages:
        raise UserError(
            f"feature distillation needs stage outputs, and {arch} has none "
            "(DenseNets and fully connected Highway nets do not declare stages)",
            field=field,
            fix=f"{fix}, or use a model with stages",
        )
    if teacher is not None and stage_modules(teacher) != stages:
        raise UserError(
            f"the teacher's stages {stage_modules(teacher)} do not match the student's {stages}",
            field=field,
            fix=f"{fix}, or distill from a teacher of the same family",
        )
    return stages


class FeatureTaps:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Tap(nn.Module):
    """A graph node that keeps its input in ``outputs[name]`` and changes nothing."""

    def __init__(self, outputs: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.outputs, self.name = outputs, name

    def forward(self, x: torch.Tensor) -> None:
        self.outputs[self.name] = x


class GraphFeatureTaps:
    """Stage outputs of a torch.fx GraphModule (the quantized simulation), where hooks on ``layer1`` never fire:
    fx inlined the stage modules. A tap node reads the node that carries each stage's output
    (``quant.graph.stage_outputs``); it has no users, so the computation is unchanged, and ``close`` removes
    it, so the module exports and saves as before.

    The tapped tensor is the one after the activation quantizer that reads the stage output, where one does:
    the student is matched to the FP32 teacher with the quantization error it deploys with, which is what
    the fine-tuning should shrink.
    """

    def __init__(self, gm: fx.GraphModule, names: list[str]):
        from deploycraft.quant.graph import stage_outputs

        self.gm = gm
        self.outputs: dict[str, torch.Tensor] = {}
        self.nodes: list[fx.Node] = []
        for name, source in stage_outputs(gm, names).items():
            target = "feature_tap_" + name.replace(".", "_")
            gm.add_module(target, _Tap(self.outputs, name))
            with gm.graph.inserting_after(source):
                self.nodes.append(gm.graph.call_module(target, (source,)))
        gm.recompile()

    def close(self) -> None:
        for node in self.nodes:
            target = node.target
            self.gm.graph.erase_node(node)
            self.gm.delete_submodule(target)
        self.nodes = []
        self.gm.recompile()


def feature_taps(model: nn.Module, names: list[str]) -> FeatureTaps | GraphFeatureTaps:
    return GraphFeatureTaps(model, names) if isinstance(model, fx.GraphModule) else FeatureTaps(model, names)


class FeatureAdapters(nn.Module):
    """1x1 conv per stage from the student's width to the teacher's (identity where they match)."""

    def __init__(self, student_widths: dict[str, int], teacher_widths: dict[str, int]):
        super().__init__()
        self.names = list(student_widths)
        self.adapters = nn.ModuleDict(
            {
                n.replace(".", "_"): (
                    nn.Conv2d(student_widths[n], teacher_widths[n], 1, bias=False)
                    if student_widths[n] != teacher_widths[n]
                    else nn.Identity()
                )
                for n in self.names
            }
        )

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[name.replace(".", "_")](x)


def feature_loss(adapters: FeatureAdapters, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]):
    losses = [F.mse_loss(adapters(n, student[n]), teacher[n]) for n in adapters.names]
    return torch.stack(losses).mean()


class Distiller:
    """Builds the loss function that `train_epochs` calls, with the teacher frozen in eval mode."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float,
        alpha: float,
        feature_weight: float,
        sample: torch.Tensor,
        label_smoothing: float = 0.0,
    ):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        self.label_smoothing = label_smoothing
        self.adapters: FeatureAdapters | None = None
        self.student_taps = self.teacher_taps = None
        if feature_weight > 0:
            names = stage_modules(student)
            if not names or names != stage_modules(teacher):
                raise ValueError("feature distillation needs student and teacher with the same stage_names")
            self.student_taps = feature_taps(student, names)
            try:
                self.teacher_taps = feature_taps(teacher, names)
                with torch.no_grad():
                    was = student.training
                    student.eval()
                    student(sample)
                    student.train(was)
                    teacher(sample)
            except BaseException:
                self.close()  # the student (a GraphModule) is left without tap nodes
                raise
            widths = lambda taps: {n: taps.outputs[n].shape[1] for n in names}  # noqa: E731
            self.adapters = FeatureAdapters(widths(self.student_taps), widths(self.teacher_taps))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = model(x)
        loss = kd_loss(s_logits, t_logits, y, self.temperature, self.alpha, self.label_smoothing)
        if self.adapters is not None:
            loss = loss + self.feature_weight * feature_loss(
                self.adapters, self.student_taps.outputs, self.teacher_taps.outputs
            )
        return loss, s_logits

    def close(self) -> None:
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.close()
