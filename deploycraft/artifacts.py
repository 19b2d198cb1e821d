"""Run folders: layout, atomic writes, content hashes, the manifest, and the machine it ran on.

```
artifacts/<recipe name>/<run id>/
  recipe.yaml            the resolved recipe (overrides applied)
  run.json               status: running | completed | failed, and the stage keys
  stages/NN-<type>-<key>/  one folder per stage; stage.json is written last and marks it complete
  deploy/                the deployables (hard links to the stage outputs)
  report.json  report.md  plots/
  manifest.json          every file with size and sha256, versions, hardware
```
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import deploycraft
from deploycraft.errors import UserError

HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in the same folder that replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fh = None

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage_dir(self, index: int, type_: str, key: str) -> Path:
        return self.stages / f"{index:02d}-{type_}-{key[:12]}"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """One run per folder at a time; the lock dies with the process, so a killed run can resume."""
        self._lock_fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another deploycraft run is using {self.root}",
                field="--output-dir",
                fix="wait for it to finish, or choose another --output-dir",
            ) from None

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def files(self) -> list[Path]:
        skip = {"manifest.json", ".lock"}
        return sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.name not in skip and not p.name.startswith(".")
        )


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


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags_line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
        flags = set(flags_line.split(":", 1)[1].split()) if ":" in flags_line else set()
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


def write_manifest(run: RunDir, extra: dict[str, Any]) -> dict[str, Any]:
    files = [
        {"path": str(p.relative_to(run.root)), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in run.files()
    ]
    manifest = {
        "deploycraft": deploycraft.__version__,
        **extra,
        "versions": versions(),
        "hardware": hardware(),
        "files": files,
    }
    write_json(run.root / "manifest.json", manifest)
    return manifest
