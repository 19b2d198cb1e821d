"""Export stage: FP32 ONNX with BatchNorm folded into the convs, checked against the torch model."""

from __future__ import annotations

from pathlib import Path

import torch

from deploycraft.models.io import read_spec
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.progress import log
from deploycraft.quant.graph import fold_bn
from deploycraft.recipe import ExportConfig
from deploycraft.runtime.ort import OrtRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage


class ExportCheckError(RuntimeError):
    """The exported file does not meet its contract (BN left, outputs differ from torch)."""


@register_stage
class ExportStage(Stage):
    type = "export"
    config: ExportConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        model = ctx.load_model()
        folded = fold_bn(model)
        spec = read_spec(ctx.model_dir)
        path = workdir / "model_fp32.onnx"
        metadata = {
            "deploycraft.arch": spec["arch"],
            "deploycraft.precision": "fp32",
            "deploycraft.input": data.spec.to_dict(),
            "deploycraft.classes": data.class_names,
        }
        proto = export_onnx(folded, data.sample_input(2), path, cfg.opset, cfg.dynamic_batch, metadata)
        ops = op_counts(proto)
        if ops.get("BatchNormalization"):
            raise ExportCheckError(f"{path.name} has {ops['BatchNormalization']} BatchNormalization nodes left")
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
                "fp32_onnx": {"path": path.name, "format": "onnx", "precision": "fp32", "backend": "onnxruntime"}
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
