"""The machine's convolution ceiling: GMAC/s of one large conv in each runtime and precision.

A 3x3, 256 -> 256 channel convolution at 56x56 (1.85 GMAC, the shape that dominates ResNet-50 at
224 px) keeps every kernel busy with little overhead, so its throughput is the practical peak a
whole network can approach on this machine. Verify and `deploycraft bench --peak` measure it in the
same process as the models, and the report states each deployable's achieved GMAC/s against it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploycraft.data.transforms import InputSpec
from deploycraft.deployables import PROBE_SETTINGS, build_deployable
from deploycraft.runtime import onnx_runner
from deploycraft.runtime.bench import measure

CHANNELS, KERNEL, SIZE = 256, 3, 56
MACS = CHANNELS * CHANNELS * KERNEL * KERNEL * SIZE * SIZE
# (runtime, precision) -> (file to build, OpenVINO precision hint): INT8 placed for that runtime's rules.
VARIANTS = {
    ("onnxruntime", "fp32"): ("fp32", None, "f32"),
    ("onnxruntime", "int8"): ("int8", "onnxruntime-cpu", "f32"),
    ("openvino", "fp32"): ("fp32", None, "f32"),
    ("openvino", "bf16"): ("fp32", None, "bf16"),
    ("openvino", "int8"): ("int8", "openvino-cpu", "f32"),
}


def _conv() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(CHANNELS, CHANNELS, KERNEL, padding=KERNEL // 2)
    return nn.Sequential(conv, nn.ReLU()).eval()


def measure_ceiling(
    runtimes: list[str], threads: int, repeats: int = 30, show: bool = True
) -> dict[str, dict[str, Any]]:
    """{"<runtime>:<precision>": {"gmacs", "p50_ms", "shape"}} for every variant of the given runtimes."""
    model = _conv()
    spec = InputSpec(SIZE, CHANNELS, (0.5,) * CHANNELS, (0.25,) * CHANNELS)
    calib = torch.randint(
        0, 256, (8, CHANNELS, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[tuple[str, str | None], Path] = {}
        for (runtime, precision), (kind, target, hint) in VARIANTS.items():
            if runtime not in runtimes:
                continue
            if (kind, target) not in built:
                path = Path(tmp) / f"{kind}-{target}.onnx"
                build_deployable(
                    model,
                    kind,
                    path,
                    x,
                    target=target or "onnxruntime-cpu",
                    settings=PROBE_SETTINGS,
                    calibration=(calib, spec) if kind == "int8" else None,
                    dynamic_batch=False,
                    show=False,
                )
                built[(kind, target)] = path
            runners[f"{runtime}:{precision}"] = onnx_runner(runtime, built[(kind, target)], threads, hint)
        res = measure(runners, lambda bs: x, [1], warmup=5, repeats=repeats, show=show)
    shape = f"conv {KERNEL}x{KERNEL}, {CHANNELS}->{CHANNELS} channels, {SIZE}x{SIZE}, batch 1"
    return {
        name: {"gmacs": round(MACS / (r[1].p50 / 1e3) / 1e9, 1), "p50_ms": round(r[1].p50, 3), "shape": shape}
        for name, r in res.items()
    }
