"""AOTInductor packages (``.pt2``): load one with torch alone and run it, on the CPU or a GPU.

The package carries its own kernels and weights, so this runner needs nothing of deploycraft's model
code; ``load_package`` refuses, with one line, a package compiled for a device this process lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deploycraft.errors import UserError


def load_package(path: Path) -> Any:
    """The compiled model in ``path``, after checking that this process has the device it was built for."""
    import torch._inductor

    device = package_device(path)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"{Path(path).name} was compiled for {device}, and torch sees no GPU here",
            fix="run it on a machine with a CUDA GPU, or build a CPU package (export aoti_device: cpu)",
        )
    return torch._inductor.aoti_load_package(str(path))


def package_device(path: Path) -> str:
    """The device a package was compiled for, read from the archive's metadata without loading kernels."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith("_metadata.json") and "/aotinductor/" in name:
                meta = json.loads(zf.read(name))
                return meta.get("deploycraft.device") or meta.get("AOTI_DEVICE_KEY", "cpu")
    return "cpu"


class AotiRunner:
    """Runs an AOTInductor package; on CUDA the call waits for the GPU so that wall-clock timing is true.

    Not replayed as a CUDA graph: capturing a package's call fails with torch 2.11 on an H200 ("operation not
    permitted when stream is capturing"), and the failed capture breaks later Inductor compiles in the process."""

    backend = "torch-aoti"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.device = package_device(self.path)
        self.model = load_package(self.path)
        self.cuda_events = self.device.startswith("cuda")  # bench times GPU packages with CUDA events

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(x)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
