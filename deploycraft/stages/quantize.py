"""Quantize stage (PTQ): calibrate the Q/DQ simulation in torch, write the QDQ ONNX for the target.

The torch simulation and the deployed file are the same arithmetic: quantizers are placed for the
recipe's target (quant/placement.py), calibrated on images outside the held-out split, and exported
as QuantizeLinear/DequantizeLinear by the one deployable builder (deployables.py), which also checks
the file: Q/DQ pairs present, no BatchNormalization, the activation integer type the target needs.
The stage then proves what ONNX Runtime does with it: how many convs its optimizer actually turned
into QLinearConv, and how closely the file agrees with the simulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from deploycraft.artifacts import write_json
from deploycraft.config import FieldError, StageConfig
from deploycraft.deployables import (
    TARGET_RUNTIME,
    DeployableCheckError,
    QuantSettings,
    build_deployable,
    build_targets,
    check_int8_execution,
    onnx_metadata,
    quantized_module,
)
from deploycraft.models.io import read_spec
from deploycraft.names import ARTIFACT_FILE, INT8_NAME
from deploycraft.onnx_io import quant_dtypes, relative_error
from deploycraft.progress import log
from deploycraft.quant.placement import act_quantizers
from deploycraft.runtime import onnx_runner
from deploycraft.stages.base import Stage, StageOutput, register_stage


class QuantizeConfig(StageConfig):
    """INT8 quantization: a calibrated Q/DQ simulation in torch, written as a QDQ ONNX for the recipe's
    `target` (onnxruntime-cpu: U8 activations, Q/DQ on conv outputs and both residual-add inputs, run as
    QLinearConv/QLinearAdd; tensorrt: S8 symmetric, Q/DQ on conv inputs and the residual skip input only)."""

    type: Literal["quantize"] = "quantize"
    method: Literal["ptq"] = Field("ptq", description="ptq: post-training quantization from calibration data.")
    calibrator: Literal["max", "percentile", "mse"] = Field(
        "percentile", description="Activation range: observed max, a percentile of |x|, or the MSE-optimal clip."
    )
    percentile: float = Field(99.99, gt=50, le=100, description="percentile calibrator: the percentile kept.")
    num_calibration: int = Field(512, ge=1, description="Calibration images used.")
    batch_size: int = Field(64, ge=1, description="Calibration batch size.")
    per_channel: bool = Field(True, description="Per-output-channel weight scales (else one per tensor).")
    reduce_range: bool = Field(
        False, description="7-bit weights, for x86 CPUs without VNNI where U8S8 products can saturate."
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset of the QDQ model (per-channel Q/DQ needs >= 13).")

    @model_validator(mode="before")
    @classmethod
    def _target_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target" in data:
            raise FieldError(
                "`target` is a top-level recipe field now (the deployment target), not a quantize setting",
                fix=f"move it to the top level of the recipe: target: {data['target']}",
                subfield="target",
            )
        return data

    @property
    def settings(self) -> QuantSettings:
        return QuantSettings(self.calibrator, self.percentile, self.per_channel, self.reduce_range, self.batch_size)


# quant_state.pt and quant.json of the recipe's target keep their names; auto adds the OpenVINO ones.
STATE_SUFFIX = {"onnxruntime-cpu": "", "tensorrt": "", "openvino-cpu": "_openvino"}


def load_quantized(float_model: torch.nn.Module, target: str, cfg: QuantizeConfig, state_path: Path):
    """Rebuild the calibrated simulation: same placement, then the saved scales and weights."""
    qmodel = quantized_module(float_model, target, cfg.settings)
    qmodel.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    for _, q in act_quantizers(qmodel):
        q.mode = "quantize"
    return qmodel.eval()


@register_stage
class QuantizeStage(Stage):
    type = "quantize"
    Config = QuantizeConfig
    rank = 3
    report_order = 4
    reads = ("target",)
    config: QuantizeConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        model = ctx.load_model()
        images, provenance = data.calibration_images(cfg.num_calibration)
        spec = read_spec(ctx.model_dir)
        check = data.sample_input(64)
        artifacts, per_target = {}, {}
        skipped = {}
        for target in build_targets(ctx.recipe.target):
            try:
                artifact, metrics = self._build(ctx, model, target, images, provenance, spec, check, workdir)
            except Exception as exc:
                if ctx.recipe.target != "auto":
                    raise
                # auto tries every CPU runtime; one that cannot take this network is left out, and said so
                skipped[target] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                log(f"  [yellow]{target}: left out of auto ({skipped[target]})[/]")
                continue
            artifacts[INT8_NAME[target].value] = artifact
            per_target[target] = metrics
        if not per_target:
            raise DeployableCheckError(f"no INT8 file could be built for any CPU runtime: {skipped}")
        first = next(iter(per_target.values()))
        metrics = {
            **first,
            "method": cfg.method,
            "calibrator": cfg.calibrator,
            "percentile": cfg.percentile if cfg.calibrator == "percentile" else None,
            "calibration": provenance,
            "calibration_images": len(images),
            "targets": per_target,
            "skipped_targets": skipped,
        }
        return StageOutput(artifacts=artifacts, metrics=metrics)

    def _build(self, ctx, model, target: str, images, provenance: str, spec: dict, check, workdir: Path):
        """One target's INT8 file, checked against its simulation and its runtime's INT8 execution."""
        cfg, data = self.config, ctx.data
        name = INT8_NAME[target]
        path = workdir / ARTIFACT_FILE[name]
        log(f"  {target}: calibrating ({cfg.calibrator}) on {len(images)} images: {provenance}")
        built = build_deployable(
            model,
            "int8",
            path,
            data.sample_input(2),
            target=target,
            settings=cfg.settings,
            calibration=(images, data.spec),
            opset=cfg.opset,
            metadata=onnx_metadata(spec["arch"], "int8", target, data.spec, data.class_names),
        )
        qmodel = built.module
        torch.save(qmodel.state_dict(), workdir / f"quant_state{STATE_SUFFIX[target]}.pt")
        # The deployed file computes what the simulation computes (up to rounding of requantization).
        with torch.no_grad():
            sim = qmodel(check).numpy()
        runtime = TARGET_RUNTIME[target]
        out = onnx_runner(runtime, path, threads=None)(check.numpy())
        metrics = {
            "target": target,
            "runtime": runtime,
            "activation_dtype": "/".join(sorted(set(quant_dtypes(built.proto)))),
            "activation_quantizers": len(built.ranges),
            "weight_quantizers": sum(1 for m in qmodel.modules() if hasattr(m, "weight_scale")),
            "onnx_ops": built.ops,
            "bytes": path.stat().st_size,
            "sim_vs_onnx_rel_error": relative_error(out, sim),
            "sim_vs_onnx_top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean()),
        }
        proof = check_int8_execution(path, target, qmodel, workdir)
        if proof is not None:
            metrics["int8_execution"] = proof
            metrics["int8_conv_fraction"] = proof["int8_convs"] / proof["convs"] if proof["convs"] else None
            log(
                f"  {proof['runtime']} runs {proof['int8_convs']}/{proof['convs']} convs in INT8 "
                f"(the placement quantizes {proof['expected_int8_convs']})"
            )
        log(f"  sim vs {runtime}: top-1 agreement {metrics['sim_vs_onnx_top1_agreement']:.3f} on 64 images")
        write_json(
            workdir / f"quant{STATE_SUFFIX[target]}.json",
            {"config": cfg.model_dump(mode="json"), "ranges": built.ranges},
        )
        artifact = {"path": path.name, "format": "onnx", "precision": "int8", "backend": runtime, "target": target}
        return artifact, metrics

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        q = report["stages"].get("quantize")
        if not q:
            return []
        lines = ["", "## Quantization", ""]
        pct = f", {q['percentile']} %" if q.get("percentile") else ""
        lines.append(
            f"PTQ ({q['calibrator']} calibrator{pct}), S8 per-channel weights; calibration: {q['calibration']}."
        )
        for target, t in q.get("targets", {q["target"]: q}).items():
            line = (
                f"For {target}: {t['activation_dtype']} activations, {t['activation_quantizers']} activation and "
                f"{t['weight_quantizers']} weight quantizers"
            )
            proof = t.get("int8_execution")
            if proof:
                adds = f", {proof['int8_adds']} QLinearAdd" if "int8_adds" in proof else ""
                line += (
                    f"; {proof['runtime']}'s own graph runs {proof['int8_convs']} of {proof['convs']} convs in INT8"
                    f"{adds} (the placement quantizes {proof['expected_int8_convs']})"
                )
            line += f"; simulation vs deployed file: top-1 agreement {t['sim_vs_onnx_top1_agreement'] * 100:.1f} %."
            lines.append(line)
        for target, why in (q.get("skipped_targets") or {}).items():
            lines.append(f"For {target}: left out of auto — {why}.")
        return lines
