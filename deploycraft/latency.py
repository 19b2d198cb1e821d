"""Measured ONNX Runtime latency of a torch model, as it would be deployed (FP32 or INT8 QDQ).

Used where latency is a target (pruning) rather than a report: export to a temporary ONNX file
(the INT8 path calibrates quickly with the max calibrator), then time it on ONNX Runtime CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from deploycraft.data.transforms import prepare_batch
from deploycraft.onnx_io import export_onnx
from deploycraft.quant.graph import fold_bn
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.runtime.bench import measure
from deploycraft.runtime.ort import OrtRunner


def deployable(
    model: torch.nn.Module,
    precision: str,
    spec=None,
    calib_images: torch.Tensor | None = None,
    target: str = "onnxruntime-cpu",
) -> torch.nn.Module:
    """The torch module whose ONNX export is what would ship: BN folded, and quantized for int8."""
    if precision == "fp32":
        return fold_bn(model)
    q = insert_quantizers(model, target)
    for _, a in act_quantizers(q):
        a.start_calibration()
    with torch.no_grad():
        q(prepare_batch(calib_images, spec))
    for _, a in act_quantizers(q):
        a.finish_calibration("max", 100.0)
    return q


def onnx_latency_ms(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    spec,
    precision: str,
    batch_size: int,
    threads: int | None,
    calib_images: torch.Tensor | None,
    workdir: Path | None = None,
    repeats: int = 60,
) -> float:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "probe.onnx"
        sample = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        export_onnx(deployable(model, precision, spec, calib_images), sample, path)
        runner = OrtRunner(path, threads)
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(1))
        result = measure(
            {"probe": runner}, lambda bs: x, [batch_size], warmup=10, repeats=repeats, rounds=1, show=False
        )
        return result["probe"][batch_size].p50
