"""The machine a run ran on: software versions and hardware, for the manifest and the report."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

import deploycraft

_CODE_VERSION: str | None = None


def code_version() -> str:
    """deploycraft's version plus a hash of its source: a code change invalidates cached stages."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        root = Path(deploycraft.__file__).parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _CODE_VERSION = f"{deploycraft.__version__}+{h.hexdigest()[:12]}"
    return _CODE_VERSION


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    out = {
        "python": platform.python_version(),
        "deploycraft": deploycraft.__version__,
        "deploycraft_code": code_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("torch_pruning", "tensorrt"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name.replace("_", "-")] = getattr(mod, "__version__", "unknown")
    return out


_INTERESTING_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
    "i8mm",
    "bf16",
)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux: /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def u8s8_pairs_saturate() -> bool:
    """Whether this CPU's INT8 conv kernels saturate: on x86-64 with AVX2 but without VNNI, ONNX Runtime
    (MLAS) and OpenVINO (oneDNN) multiply u8 activations by s8 weights with VPMADDUBSW, which adds each
    pair of products in int16 with saturation (255 * 127 * 2 > 32767), so a conv's sums are not the exact
    ones; 7-bit weights (reduce_range) keep every pair within int16. VNNI sums in int32."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags()
    return "avx2" in flags and not ({"avx512_vnni", "avx_vnni"} & flags)


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = cpu_flags()
        info["cpu_model"] = models[0] if models else platform.processor()
        info["cpu_flags"] = [f for f in _INTERESTING_FLAGS if f in flags]
        cores = {(line.split(":")[1].strip()) for line in text.splitlines() if line.startswith("core id")}
        info["physical_cores"] = len(cores) or os.cpu_count()
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [
                {
                    "name": torch.cuda.get_device_name(i),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                }
                for i in range(torch.cuda.device_count())
            ]
            info["cuda"] = torch.version.cuda
        else:
            info["gpus"] = []
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break the manifest
        info["gpus"] = []
    return info
