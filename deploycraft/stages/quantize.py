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
from deploycraft.deployables import ACTIVATION_DTYPE, QuantSettings, build_deployable, onnx_metadata, quantized_module
from deploycraft.models.io import read_spec
from deploycraft.names import ModelName
from deploycraft.onnx_io import relative_error
from deploycraft.progress import log
from deploycraft.quant.placement import act_quantizers
from deploycraft.runtime.ort import OrtRunner, optimized_op_counts
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
        target = ctx.recipe.target
        data = ctx.data
        model = ctx.load_model()
        images, provenance = data.calibration_images(cfg.num_calibration)
        spec = read_spec(ctx.model_dir)
        path = workdir / "model_int8.onnx"
        log(f"  calibrating activation quantizers ({cfg.calibrator}) on {len(images)} images: {provenance}")
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
        qmodel, ranges = built.module, built.ranges
        torch.save(qmodel.state_dict(), workdir / "quant_state.pt")

        # The deployed file computes what the simulation computes (up to rounding of requantization).
        check = data.sample_input(64)
        with torch.no_grad():
            sim = qmodel(check).numpy()
        ort_out = OrtRunner(path, threads=None)(check.numpy())
        metrics = {
            "target": target,
            "method": cfg.method,
            "calibrator": cfg.calibrator,
            "percentile": cfg.percentile if cfg.calibrator == "percentile" else None,
            "calibration": provenance,
            "calibration_images": len(images),
            "activation_quantizers": len(ranges),
            "weight_quantizers": sum(1 for m in qmodel.modules() if hasattr(m, "weight_scale")),
            "onnx_ops": built.ops,
            "activation_dtype": ACTIVATION_DTYPE[target],
            "bytes": path.stat().st_size,
            "sim_vs_onnx_rel_error": relative_error(ort_out, sim),
            "sim_vs_onnx_top1_agreement": float((ort_out.argmax(1) == sim.argmax(1)).mean()),
        }
        if target == "onnxruntime-cpu":
            opt = optimized_op_counts(path, workdir)
            convs = (
                opt.get("QLinearConv", 0) + opt.get("Conv", 0) + opt.get("FusedConv", 0) + opt.get("NhwcFusedConv", 0)
            )
            metrics["ort_optimized_ops"] = opt
            metrics["int8_conv_fraction"] = opt.get("QLinearConv", 0) / convs if convs else None
            log(
                f"  ONNX Runtime runs {opt.get('QLinearConv', 0)}/{convs} convs and "
                f"{opt.get('QLinearAdd', 0)} residual adds in INT8"
            )
        write_json(workdir / "quant.json", {"config": cfg.model_dump(mode="json"), "ranges": ranges})
        log(f"  sim vs ONNX: top-1 agreement {metrics['sim_vs_onnx_top1_agreement']:.3f} on 64 images")
        return StageOutput(
            artifacts={
                ModelName.INT8_ONNX.value: {
                    "path": path.name,
                    "format": "onnx",
                    "precision": "int8",
                    "backend": "onnxruntime",
                    "target": target,
                }
            },
            metrics=metrics,
        )

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        lines: list[str] = []
        q = report["stages"].get("quantize")
        if q:
            lines += [
                "",
                "## Quantization",
                "",
                f"PTQ for {q['target']}: {q['activation_dtype']} activations ({q['calibrator']} calibrator"
                f"{', ' + str(q['percentile']) + ' %' if q.get('percentile') else ''}), S8 per-channel weights; "
                f"{q['activation_quantizers']} activation and {q['weight_quantizers']} weight quantizers; "
                f"calibration: {q['calibration']}.",
            ]
            if q.get("int8_conv_fraction") is not None:
                opt = q["ort_optimized_ops"]
                lines.append(
                    f"ONNX Runtime's optimized graph: {opt.get('QLinearConv', 0)} QLinearConv, "
                    f"{opt.get('QLinearAdd', 0)} QLinearAdd; {q['int8_conv_fraction'] * 100:.0f} % of convs in INT8."
                )
            lines.append(
                f"Simulation vs deployed file: top-1 agreement {q['sim_vs_onnx_top1_agreement'] * 100:.1f} % "
                f"on a check batch."
            )
        return lines
