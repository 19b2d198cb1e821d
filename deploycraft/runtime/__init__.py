"""One interface over the runtimes: load a model, run a batch, time it.

CPU runtimes for ONNX files are listed here by name; verify and `deploycraft bench` run a file on
every one of them that is installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

CPU_RUNTIMES = ("onnxruntime", "openvino")


def available(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def cpu_runtimes() -> list[str]:
    return [r for r in CPU_RUNTIMES if available(r)]


def onnx_runner(runtime: str, path: Path, threads: int | None, precision: str = "f32") -> Any:
    """A runner for an ONNX file on a CPU runtime; ``precision`` is OpenVINO's float precision hint."""
    if runtime == "onnxruntime":
        from deploycraft.runtime.ort import OrtRunner

        return OrtRunner(path, threads)
    if runtime == "openvino":
        from deploycraft.runtime.openvino import OvRunner

        return OvRunner(path, threads, precision)
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {CPU_RUNTIMES}")
