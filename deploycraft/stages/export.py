"""Export stage: FP32 ONNX with BatchNorm folded into the convs, checked against the torch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from deploycraft.config import StageConfig
from deploycraft.deployables import build_deployable, onnx_metadata
from deploycraft.models.io import read_spec
from deploycraft.names import ModelName
from deploycraft.onnx_io import relative_error
from deploycraft.progress import log
from deploycraft.runtime.ort import OrtRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage


class ExportConfig(StageConfig):
    """FP32 ONNX with BatchNorm folded into the convs, checked against torch."""

    type: Literal["export"] = "export"
    format: Literal["onnx"] = Field("onnx", description="Export format.")
    opset: int = Field(17, ge=13, le=21, description="ONNX opset.")
    dynamic_batch: bool = Field(True, description="Make the batch dimension dynamic.")
    rtol: float = Field(1e-4, gt=0, description="Largest allowed max|onnx - torch| / max|torch| on a check batch.")


class ExportCheckError(RuntimeError):
    """The exported file does not meet its contract (outputs differ from torch)."""


@register_stage
class ExportStage(Stage):
    type = "export"
    Config = ExportConfig
    rank = 3
    report_order = 5
    config: ExportConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        model = ctx.load_model()
        spec = read_spec(ctx.model_dir)
        path = workdir / "model_fp32.onnx"
        built = build_deployable(
            model,
            "fp32",
            path,
            data.sample_input(2),
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            metadata=onnx_metadata(spec["arch"], "fp32", None, data.spec, data.class_names),
        )
        ops = built.ops
        check = data.sample_input(32)
        with torch.inference_mode():
            expected = model(check).numpy()
        actual = OrtRunner(path)(check.numpy())
        rel = relative_error(actual, expected)
        if rel > cfg.rtol:
            raise ExportCheckError(
                f"ONNX Runtime output differs from torch by {rel:.2e} (relative), above rtol {cfg.rtol}"
            )
        log(f"  {path.name}: {sum(ops.values())} nodes, 0 BatchNormalization, ONNX vs torch rel. error {rel:.1e}")
        return StageOutput(
            artifacts={
                ModelName.FP32_ONNX.value: {
                    "path": path.name,
                    "format": "onnx",
                    "precision": "fp32",
                    "backend": "onnxruntime",
                }
            },
            metrics={
                "onnx_ops": ops,
                "rel_error_vs_torch": rel,
                "rtol": cfg.rtol,
                "opset": cfg.opset,
                "dynamic_batch": cfg.dynamic_batch,
                "bytes": path.stat().st_size,
                "batchnorm_nodes": ops.get("BatchNormalization", 0),
            },
        )

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        lines: list[str] = []
        e = report["stages"].get("export")
        if e:
            lines += [
                "",
                "## Export",
                "",
                f"FP32 ONNX opset {e['opset']}: {e['batchnorm_nodes']} BatchNormalization nodes; ONNX Runtime vs "
                f"torch max relative error {e['rel_error_vs_torch']:.1e} (limit {e['rtol']}).",
            ]
        return lines
