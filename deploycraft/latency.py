"""Measured ONNX Runtime latency of a torch model, as it would be deployed (FP32 or INT8 QDQ).

Used where latency is a target (pruning) rather than a report: the model goes through the one
deployable builder into a temporary ONNX file (INT8 calibrated quickly with the max calibrator),
then is timed on the target's runtime (ONNX Runtime or OpenVINO, on the CPU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from deploycraft.deployables import PROBE_SETTINGS, TARGET_RUNTIME, build_deployable
from deploycraft.runtime import onnx_runner
from deploycraft.runtime.bench import measure


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
    target: str = "onnxruntime-cpu",
) -> float:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "probe.onnx"
        sample = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        calibration = (calib_images, spec) if precision == "int8" else None
        build_deployable(
            model, precision, path, sample, target=target, settings=PROBE_SETTINGS, calibration=calibration, show=False
        )
        runner = onnx_runner(TARGET_RUNTIME[target], path, threads)
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(1))
        result = measure(
            {"probe": runner}, lambda bs: x, [batch_size], warmup=10, repeats=repeats, rounds=1, show=False
        )
        return result["probe"][batch_size].p50
