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
    if device.startswith("cuda"):
        check_loads(path)
    return torch._inductor.aoti_load_package(str(path))


# Loads a package in a fresh interpreter: a loader that crashes takes that process down, not the caller.
LOAD_CHECK = "import sys, torch._inductor; torch._inductor.aoti_load_package(sys.argv[1])"


_LOADED: set[tuple[str, int, int]] = set()  # packages (path, size, mtime) a child process loaded in this run


def check_loads(path: Path, timeout: float = 120.0) -> None:
    """Load ``path`` once in a child process and raise one UserError if that fails or crashes.

    Measured on an H200 with torch 2.11 (CUDA 13): CUDA packages this module built were refused by
    ``aoti_load_package`` with a segmentation fault in a new process, which would end a run with no message.
    Done for CUDA packages (a few seconds: one torch import); CPU packages loaded everywhere they were tried.
    Written after that machine was given back: the child-process load has run on the CPU only."""
    import signal
    import subprocess
    import sys

    st = Path(path).stat() if Path(path).is_file() else None
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns) if st else None
    if key in _LOADED:  # the export stage checked it; verify loads the same file again
        return
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_CHECK, str(path)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        why = f"loading it did not end within {timeout:.0f} s"
    else:
        if proc.returncode == 0:
            if key is not None:
                _LOADED.add(key)
            return
        if proc.returncode < 0:
            try:
                why = f"the loader crashed ({signal.Signals(-proc.returncode).name})"
            except ValueError:
                why = f"the loader was killed by signal {-proc.returncode}"
        else:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            why = f"the loader failed: {lines[-1][:200] if lines else f'exit code {proc.returncode}'}"
    raise UserError(
        f"{path} cannot be loaded by torch {torch.__version__} on this machine: {why}",
        fix="use the ONNX deployables or a CPU package (stages.export.aoti_device: cpu) here, "
        "or build and run the package with another torch version",
    )


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
