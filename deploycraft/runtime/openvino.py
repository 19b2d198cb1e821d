"""OpenVINO on the CPU: compile an ONNX (or IR) file with a fixed thread count and precision, run it,
and read back what its CPU plugin actually executes (each layer's runtime precision).

OpenVINO's CPU plugin runs float models in bf16 by default where the CPU has bf16 units (AMX,
AVX-512 BF16): an "FP32" model is then not FP32. Every runner here says its precision explicitly:
``f32`` for the FP32 reference, ``bf16`` as a deployable of its own that verify measures for accuracy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

INT8 = ("u8", "i8")


def core():
    import openvino as ov

    return ov.Core()


def compile_model(path: Path, threads: int | None = None, precision: str = "f32", pinning: bool | None = None):
    """A compiled model for latency: one stream, ``threads`` inference threads, the given float precision;
    ``pinning`` sets the CPU plugin's thread pinning (None: its default)."""
    config = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if pinning is not None:
        config["ENABLE_CPU_PINNING"] = pinning
    c = core()
    return c.compile_model(c.read_model(str(path)), "CPU", config)


class OvRunner:
    """Runs an ONNX (or OpenVINO IR) file on OpenVINO's CPU plugin."""

    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str = "f32"):
        self.path, self.precision = Path(path), precision
        self.compiled = compile_model(self.path, threads, precision)
        self.request = self.compiled.create_infer_request()

    def prepare(self, x) -> np.ndarray:
        return np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)
        return self.request.get_output_tensor(0).data.copy()


def runtime_layers(path: Path, precision: str = "f32") -> Counter:
    """(layer type, runtime precision) of every layer the CPU plugin executes after its own fusions."""
    compiled = compile_model(path, threads=1, precision=precision)
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(kind, prec)] += 1
    return counts


def int8_convolutions(path: Path) -> tuple[int, int]:
    """(convolutions executed in INT8, all convolutions) in OpenVINO's runtime model of ``path``."""
    layers = runtime_layers(path)
    convs = {k: v for k, v in layers.items() if k[0] == "Convolution"}
    return sum(v for (_, p), v in convs.items() if p in INT8), sum(convs.values())


def export_ir(onnx_path: Path, xml_path: Path) -> list[Path]:
    """The same model as OpenVINO IR (.xml + .bin), for deployments that load IR directly."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")]
