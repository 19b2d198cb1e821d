"""TensorRT engines: build one from an ONNX file, prove the residual fusion, refuse a mismatched engine,
run it on torch's CUDA tensors.

Written against the documented Python API of TensorRT 10 and 11 (docs/design.md, "TensorRT"); it has
not been executed on a machine with TensorRT (the README says so). Both versions build *strongly
typed* networks: precision comes from the ONNX graph (Q/DQ nodes for INT8, FP16 tensors for FP16),
never from builder flags, which TensorRT 11 removed (and which 10 rejects next to strong typing).
So the code below never touches ``BuilderFlag.FP16/INT8``, calibrators or ``EXPLICIT_BATCH``.

Everything that talks to TensorRT takes the module as an argument (``trt``), so the build logic is
exercised in the default test run with a recording stand-in, up to the import boundary.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from deploycraft.artifacts import atomic_path
from deploycraft.errors import UserError

WORKSPACE_BYTES = 4 << 30


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build the network (the parser's errors are in the message)."""


def import_tensorrt() -> Any | None:
    """The tensorrt module, or None where it is not installed (the export stage then says "not built here")."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def missing_reason() -> str | None:
    """Why no engine can be built in this process, or None when one can."""
    if import_tensorrt() is None:
        return "tensorrt is not installed (pip install 'deploycraft[tensorrt]' on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return None


def cuda_device() -> dict[str, str]:
    """The GPU an engine is built on: its name and compute capability ("9.0")."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def companion_paths(engine: Path) -> tuple[Path, Path]:
    """The engine's manifest and the inspector's layer list, written beside it."""
    return engine.with_suffix(".engine.json"), engine.with_suffix(".layers.json")


def network_flags(trt: Any) -> int:
    # 11 ignores the flag (strong typing is always on) but still defines it; 10 needs it.
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def profile_shapes(batch_sizes: list[int], max_batch: int, chw: tuple[int, int, int]) -> list[tuple[tuple, ...]]:
    """One optimization profile per batch size: tuned for that batch (opt), valid from 1 to ``max_batch``."""
    top = max(max_batch, *batch_sizes)
    return [((1, *chw), (bs, *chw), (top, *chw)) for bs in sorted(set(batch_sizes))]


@dataclass
class BuiltEngine:
    path: Path
    manifest: dict[str, Any]
    layers: list[dict[str, Any]]
    fusion: dict[str, Any]
    build_seconds: float
    files: list[Path] = field(default_factory=list)


def build_engine(
    onnx_path: Path,
    path: Path,
    *,
    precision: str,
    batch_sizes: list[int],
    max_batch: int,
    timing_cache: Path,
    trt: Any,
    device: Callable[[], dict[str, str]] = cuda_device,
    workspace_bytes: int = WORKSPACE_BYTES,
    optimization_level: int = 3,
) -> BuiltEngine:
    """A serialized engine for ``onnx_path`` (INT8 from Q/DQ, FP16 from FP16 tensors), its manifest, the
    inspector's layer list beside it, and the residual-fusion check read from that list.

    The timing cache is read before and written after the build, so rebuilding (another batch size, the
    other precision) reuses the kernel timings measured for the same layers on the same GPU.
    """
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"{e.node_name()} ({e.node_operator()}): {e.desc()}")
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    inp, out = network.get_input(0), network.get_output(0)
    chw = tuple(int(d) for d in inp.shape[1:])
    shapes = profile_shapes(batch_sizes, max_batch, chw)
    for lo, opt, hi in shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    data = bytes(blob)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in info.get("Layers", [])]
    manifest_path, layers_path = companion_paths(path)
    with atomic_path(layers_path) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    fusion = check_fusion(layers, residual_blocks(onnx.load(str(onnx_path))), precision)
    manifest = {
        "format": "tensorrt",
        "precision": precision,
        "tensorrt": str(trt.__version__),
        **device(),
        "input": inp.name,
        "output": out.name,
        "profiles": [{"min": list(lo), "opt": list(opt), "max": list(hi)} for lo, opt, hi in shapes],
        "source": onnx_path.name,
        "source_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "fusion": fusion,
    }
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return BuiltEngine(path, manifest, layers, fusion, time.perf_counter() - start, [manifest_path, layers_path])


# --- the fusion we placed Q/DQ for ---------------------------------------------------------------------


def residual_blocks(proto: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(conv, add, relu) node names of every ``relu(conv(x) + skip)`` in the ONNX graph: the layers that
    TensorRT should run as one convolution with the add and the ReLU in its epilogue."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    blocks = []
    for add in (n for n in proto.graph.node if n.op_type == "Add"):
        after = consumers.get(add.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu":
            continue
        convs = [producer[i] for i in add.input if i in producer and producer[i].op_type == "Conv"]
        if convs:
            blocks.append((convs[0].name, add.name, after[0].name))
    return blocks


def _formats(tensor: Any) -> str:
    # 10 writes "Format/Datatype"; 11 splits it into separate fields (names read as documented, both kept).
    if not isinstance(tensor, dict):
        return str(tensor)
    return " ".join(str(tensor.get(k, "")) for k in ("Format/Datatype", "Format", "Datatype"))


def check_fusion(layers: list[dict[str, Any]], blocks: list[tuple[str, str, str]], precision: str) -> dict[str, Any]:
    """Which residual blocks the engine fused into one convolution layer, and (INT8) whether that layer
    reads and writes INT8. A fused name alone proves fusion, not INT8: a residual input left in FP16
    gives the same name with FP16 formats and a QDQ Reformat layer after it."""
    by_part = {}
    for layer in layers:
        for part in str(layer.get("Name", "")).split(" + "):
            by_part.setdefault(part.strip(), []).append(layer)
    fused, int8, missing = 0, 0, []
    for conv, add, relu in blocks:
        hits = [
            layer
            for layer in by_part.get(add, [])
            if {conv, add, relu} <= {p.strip() for p in str(layer.get("Name", "")).split(" + ")}
            and "conv" in str(layer.get("LayerType", "")).lower()
        ]
        if not hits:
            missing.append(add)
            continue
        fused += 1
        layer = hits[0]
        tensors = list(layer.get("Inputs", [])) + list(layer.get("Outputs", []))
        weights = str((layer.get("Weights") or {}).get("Type", "")) if isinstance(layer.get("Weights"), dict) else ""
        if tensors and all("int8" in _formats(t).lower() for t in tensors) and weights.lower() == "int8":
            int8 += 1
    standalone_adds = [
        layer["Name"]
        for layer in layers
        if " + " not in str(layer.get("Name", "")) and "elementwise" in str(layer.get("LayerType", "")).lower()
    ]
    qdq_reformats = [
        layer.get("Name") for layer in layers if layer.get("LayerType") == "Reformat" and layer.get("Origin") == "QDQ"
    ]
    passed = fused == len(blocks) and (precision != "int8" or (int8 == len(blocks) and not qdq_reformats))
    return {
        "blocks": len(blocks),
        "fused": fused,
        "int8_fused": int8 if precision == "int8" else None,
        "not_fused": missing,
        "standalone_elementwise": standalone_adds,
        "qdq_reformats": qdq_reformats,
        "passed": passed,
    }


# --- loading and running -----------------------------------------------------------------------------


def check_compatible(manifest: dict[str, Any], trt_version: str, here: dict[str, str], name: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture: a plan is
    tied to both (unless built version-compatible, which these are not)."""
    if manifest.get("tensorrt") != trt_version:
        raise UserError(
            f"{name} was built with TensorRT {manifest.get('tensorrt')}, this machine has {trt_version}",
            fix="rebuild the engine here (deploycraft run with export format tensorrt) or install that version",
        )
    if manifest.get("compute_capability") != here["compute_capability"]:
        raise UserError(
            f"{name} was built for compute capability {manifest.get('compute_capability')} "
            f"({manifest.get('gpu')}), this GPU is {here['compute_capability']} ({here['gpu']})",
            fix="rebuild the engine on this GPU's architecture",
        )


def load_engine(path: Path, trt: Any, device: Callable[[], dict[str, str]] = cuda_device) -> tuple[Any, dict]:
    """The deserialized engine and its manifest, after the compatibility check."""
    manifest_path, _ = companion_paths(path)
    if not manifest_path.is_file():
        raise UserError(f"{path.name} has no manifest beside it ({manifest_path.name})", fix="rebuild the engine")
    manifest = json.loads(manifest_path.read_text())
    check_compatible(manifest, str(trt.__version__), device(), path.name)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not deserialize {path.name}", fix="rebuild the engine on this machine")
    return engine, manifest


class TrtRunner:
    """Runs a TensorRT engine on torch CUDA tensors: FP32 in and out (the ONNX files' interface), the
    profile tuned for the batch size chosen per call, one CUDA stream."""

    backend = "tensorrt"
    cuda_events = True

    def __init__(self, path: Path, trt: Any | None = None):

        self.trt = trt or import_tensorrt()
        if self.trt is None:
            raise UserError(f"{Path(path).name} needs TensorRT", fix="pip install 'deploycraft[tensorrt]'")
        self.engine, self.manifest = load_engine(Path(path), self.trt)
        self.context = self.engine.create_execution_context()
        self.input, self.output = self.manifest["input"], self.manifest["output"]
        self.opt = [p["opt"][0] for p in self.manifest["profiles"]]
        self._profile = 0

    def prepare(self, x: Any) -> Any:
        import torch

        return x.to("cuda", dtype=torch.float32).contiguous()

    def __call__(self, x: Any) -> Any:
        import torch

        profile = min(range(len(self.opt)), key=lambda i: (self.opt[i] < len(x), abs(self.opt[i] - len(x))))
        # torch's current stream: the input's copy is ordered before the engine, and CUDA events recorded
        # on the same stream (bench.cuda_time) bracket exactly this call.
        stream = torch.cuda.current_stream()
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return out
