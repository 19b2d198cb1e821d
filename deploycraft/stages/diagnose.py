"""Diagnose stage: gradient flow, layer responses, skip usage and block lesions of the trained model.

It stands after train and before prune (rank 0.5): it reads the trained model and hands it on
unchanged. The measurements are those of `deploycraft.diagnostics` (He et al. 2016, Fig. 7; Veit et
al. 2016; Srivastava et al. 2015), on training images without augmentation (training error, gradient
flow) and on held-out images (responses, skip usage, lesions). Gradient flow is measured at the
architecture's random initialisation (the seed of the recipe) and on the trained model. Every figure
is in the stage's metrics (so in report.json) and drawn in its plots/ folder, which report.md shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from deploycraft.artifacts import write_json
from deploycraft.config import StageConfig
from deploycraft.diagnostics import ANALYSES, diagnose, take_images, write_plots
from deploycraft.models.io import read_spec
from deploycraft.models.registry import create_model
from deploycraft.progress import log
from deploycraft.stages.base import Stage, StageOutput, register_stage

Analysis = Literal["gradients", "responses", "skip", "lesion"]


class DiagnoseConfig(StageConfig):
    """Diagnose the trained model: per-layer gradient norms at initialisation and after training, the std of
    each 3x3 layer's response after BN (He et al. 2016, Fig. 7), the residual branch's norm relative to the
    skip per block and the Highway transform gates, and the held-out top-1 after deleting each residual block
    (or, without residual adds, each 3x3 layer) alone (Veit et al. 2016). The model passes on unchanged."""

    type: Literal["diagnose"] = "diagnose"
    analyses: list[Analysis] = Field(
        default_factory=lambda: list(ANALYSES),
        min_length=1,
        description="What to measure: gradients (gradient flow), responses (layer response std), skip (skip "
        "usage and Highway gates), lesion (one unit deleted at a time).",
    )
    images: int = Field(
        2000,
        ge=1,
        description="Held-out images for responses, skip usage and lesions (all of the held-out split if it is "
        "smaller). A lesion study evaluates them once per block or layer.",
    )
    train_images: int = Field(
        2000, ge=1, description="Training images (no augmentation, eval mode) for the training error."
    )
    gradient_batches: int = Field(
        4, ge=1, description="gradients: batches of training images the gradient norms are averaged over."
    )
    batch_size: int = Field(128, ge=1, description="Images per batch (gradient batches too).")
    lesion_recalibration_images: int = Field(
        0,
        ge=0,
        description="lesion: also measure each deletion with the BN statistics re-estimated on this many "
        "training images (no augmentation), as a second column beside the plain lesion: what a deletion costs "
        "once the layers behind it normalise what they now receive (0: off; needs a training split).",
    )

    @field_validator("lesion_recalibration_images")
    @classmethod
    def _recalibration_needs_lesion(cls, v: int, info: ValidationInfo) -> int:
        if v == 1:
            raise ValueError("BN statistics need at least 2 images (0 turns the re-estimation off)")
        if v and "lesion" not in info.data.get("analyses", ["lesion"]):
            raise ValueError("the BN re-estimation is part of the lesion study, which the analyses leave out")
        return v


def recalibration_batches(data, cfg: DiagnoseConfig) -> tuple[list | None, str | None]:
    """The training batches of the BN-recalibrated lesion study, or None and why there are none (logged)."""
    if "lesion" not in cfg.analyses or not cfg.lesion_recalibration_images:
        return None, None
    if not data.num_train:
        skipped = "no training split to re-estimate the BN statistics on"
        log(f"[yellow]  lesion with BN re-estimated: skipped ({skipped})[/]")
        return None, skipped
    batches = take_images(data.train_epoch(cfg.batch_size, epoch=20_000, augment=None), cfg.lesion_recalibration_images)
    if len(batches) > 1 and len(batches[-1][1]) < 2:  # one image has no batch statistics: join the one before
        (xa, ya), (xb, yb) = batches[-2], batches[-1]
        batches[-2:] = [(torch.cat([xa, xb]), torch.cat([ya, yb]))]
    return batches, None


def initial_model(spec: dict[str, Any], seed: int) -> torch.nn.Module | None:
    """The architecture at its random initialisation, as the init stage builds it from the same seed; None
    for a pruned model (its widths are not an architecture the zoo initialises)."""
    if spec.get("widths"):
        return None
    torch.manual_seed(seed)
    return create_model(spec["arch"], **spec["kwargs"]).eval()


@register_stage
class DiagnoseStage(Stage):
    type = "diagnose"
    Config = DiagnoseConfig
    rank = 0.5  # after train (0), before prune (1): it diagnoses the trained, unpruned model
    report_order = 6
    config: DiagnoseConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        spec = read_spec(ctx.model_dir)
        model = ctx.load_model()
        val = take_images(data.val_batches(cfg.batch_size), cfg.images)
        if data.num_train:
            train = take_images(data.train_epoch(cfg.batch_size, epoch=20_000, augment=None), cfg.train_images)
            train_source = "training split"
        else:  # an ImageFolder without a training split: the held-out images are all there is
            train, train_source = val, "held-out split (no training split)"
        recalibrate, skipped = recalibration_batches(data, cfg)
        snapshots = {}
        init = initial_model(spec, ctx.recipe.seed)
        if init is not None:
            snapshots["init"] = init
        result = diagnose(
            model,
            train,
            val,
            num_classes=ctx.recipe.model.num_classes,
            gradient_batches=cfg.gradient_batches,
            snapshots=snapshots,
            analyses=tuple(cfg.analyses),
            recalibration_batches=recalibrate,
            recalibration_skipped=skipped,
        )
        result["arch"] = spec["arch"]
        result["train_source"] = train_source
        write_json(workdir / "diagnose.json", result)
        plots = write_plots({spec["arch"]: result}, workdir / "plots")
        try:
            prefix = workdir.relative_to(ctx.run.root).as_posix() + "/plots/"
        except ValueError:
            prefix = (workdir / "plots").as_posix() + "/"
        result["plots"] = {name: prefix + f for name, f in plots.items()}
        _log_summary(result)
        return StageOutput(metrics=result)

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """The summary numbers, the tables of figures that fit one line each, and the plots."""
        d = report["stages"].get("diagnose")
        if not d:
            return []
        lines = [
            "",
            "## Diagnosis",
            "",
            f"{d['arch']}: training error {(1 - d['train']['top1']) * 100:.2f} % (loss {d['train']['loss']:.4f}) on "
            f"{d['train']['images']} images of the {d['train_source']}, held-out top-1 "
            f"{d['held_out']['top1'] * 100:.2f} % on {d['held_out']['images']} images.",
        ]
        flows = d.get("gradient_flow") or []
        if flows:
            lines += [
                "",
                f"Gradient flow ({flows[0]['batches']} batches, {flows[0]['images']} training images; BN on batch "
                "statistics): norms of each conv and linear layer's gradient, first layer over last and the span "
                "(largest over smallest non-zero).",
                "",
                "| state | ‖dL/dW‖ first/last | ‖dL/dW‖ span | ‖dL/dy‖ first/last | ‖dL/dy‖ span "
                "| layers with ‖dL/dW‖ = 0 |",
                "|---|---|---|---|---|---|",
            ]
            for g in flows:
                w, o = g["weight_grad"], g["output_grad"]
                lines.append(
                    f"| {g['label']} | {_num(w['first_last_ratio'])} | {_num(w['span'])} | "
                    f"{_num(o['first_last_ratio'])} | {_num(o['span'])} | {w['zero_layers']} of {len(g['layers'])} |"
                )
        responses = d.get("layer_responses")
        if responses:
            lines += [
                "",
                f"Layer responses (He et al. 2016, Fig. 7): std after BN of {len(responses)} 3x3 layers, "
                f"{_spread([r['std'] for r in responses])}.",
            ]
        skip = d.get("skip_usage")
        if skip:
            lines += [
                "",
                f"Skip usage: ‖branch‖ / ‖skip‖ over {len(skip)} residual blocks, "
                f"{_spread([r['ratio'] for r in skip])}.",
            ]
        gates = d.get("highway_gates")
        if gates:
            lines += [
                "",
                "| Highway layer | mean T | std T | unit means (min–max) | units open (T > 0.5) "
                "| units closed (T < 0.1) |",
                "|---|---|---|---|---|---|",
            ]
            for g in gates:
                lines.append(
                    f"| {g['name']} | {g['mean']:.3f} | {g['std']:.3f} | {g['unit_mean_min']:.3f}–"
                    f"{g['unit_mean_max']:.3f} | {g['units_open'] * 100:.0f} % | {g['units_closed'] * 100:.0f} % |"
                )
        summary = d.get("lesion_summary")
        if summary:
            kind = d["lesion"]["units"][0]["kind"] if d["lesion"]["units"] else "unit"
            lines += [
                "",
                f"Lesion study (Veit et al. 2016): one {kind} deleted at a time, held-out top-1 "
                f"{summary['base_top1'] * 100:.2f} % intact, chance {summary['chance'] * 100:.0f} %.",
            ]
            if "base_top1_recalibrated" in summary:
                lines[-1] += (
                    f' Rows marked "BN re-estimated": the same deletions with every BN\'s statistics re-estimated '
                    f"on {d['lesion']['recalibration_images']} training images, what a deletion costs once the layers "
                    "behind it normalise what they now receive; their drops are from the intact model re-estimated "
                    f"alike ({summary['base_top1_recalibrated'] * 100:.2f} %)."
                )
            if d.get("lesion_recalibration_skipped"):
                lines[-1] += " The lesion with BN re-estimated was asked for but not measured: " + (
                    f"{d['lesion_recalibration_skipped']}."
                )
            lines += [
                "",
                f"| {kind}s deleted | count | median drop | worst drop | lowest top-1 |",
                "|---|---|---|---|---|",
            ]
            for key, label in (("non_downsampling", "other"), ("downsampling", "downsampling")):
                s = summary[key]
                for row, suffix in ((s, ""), (s.get("recalibrated"), ", BN re-estimated")):
                    if row and row["units"]:
                        worst = f" ({row['worst']})" if row.get("worst") else ""
                        lines.append(
                            f"| {label}{suffix} | {row['units']} | {row['median_drop'] * 100:.2f} pt | "
                            f"{row['max_drop'] * 100:.2f} pt{worst} | {row['min_top1'] * 100:.2f} % |"
                        )
        for name, path in (d.get("plots") or {}).items():
            lines += ["", f"![{name.replace('_', ' ')}]({path})"]
        return lines


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _log_summary(d: dict[str, Any]) -> None:
    log(f"  training error {(1 - d['train']['top1']) * 100:.2f} %, held-out top-1 {d['held_out']['top1'] * 100:.2f} %")
    for g in d.get("gradient_flow") or []:
        span = g["weight_grad"]["span"]
        log(
            f"  gradient flow ({g['label']}): weight-gradient span {span:.3g}"
            if span
            else f"  {g['label']}: no gradient"
        )
    s = d.get("lesion_summary")
    if s and s["non_downsampling"]["units"]:
        n = s["non_downsampling"]
        log(f"  lesions: median drop {n['median_drop'] * 100:.2f} pt, worst {n['max_drop'] * 100:.2f} pt")


def _spread(values: list[float]) -> str:
    """ "median M, range A to B" of a list of figures, as the report states them."""
    v = sorted(values)
    return f"median {v[len(v) // 2]:.3f}, range {v[0]:.3f} to {v[-1]:.3f}"
