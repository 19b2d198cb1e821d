"""OpenVINO on the CPU: compile an ONNX (or IR) file with a fixed thread count and precision, run it,
and read back what its CPU plugin actually executes (each layer's runtime precision).

OpenVINO's CPU plugin runs float models in bf16 by default where the CPU has bf16 units (AMX,
AVX-512 BF16): an "FP32" model is then not FP32. Every runner here says its precision explicitly:
``f32`` for the FP32 reference, ``bf16`` as a deployable of its own that verify measures for accuracy.
"""

from __future__ import annotations

import ctypes
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

INT8 = ("u8", "i8")


class _SignalStack(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


SS_DISABLE = 2  # Linux


@contextmanager
def own_signal_stack() -> Iterator[None]:
    """The calling thread keeps its own alternate signal stack across the block.

    OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack of its own and,
    when that model is released, puts back the one it found, last in first out: with two models released
    in the order they were made, the thread is left with a stack whose memory is already freed. Python's
    handlers run on that stack (SA_ONSTACK), so the next Ctrl-C or SIGTERM killed the process with SIGSEGV
    (exit 139, run.json left "running", nothing said) instead of raising KeyboardInterrupt. The stack the
    thread had before a compile is put back right after it: nothing of OpenVINO's is left to be freed."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    before = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        now = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(now))
        if (now.sp, now.flags, now.size) != (before.sp, before.flags, before.size):
            if before.flags & SS_DISABLE:
                before = _SignalStack(None, SS_DISABLE, 0)
            libc.sigaltstack(ctypes.byref(before), None)


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
    with own_signal_stack():
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


def runtime_ops(path: Path, precision: str = "f32") -> list[tuple[str, str, list[str]]]:
    """(layer type, runtime precision, original layers it fused, in order) of every layer the CPU plugin
    executes after its own fusions."""
    compiled = compile_model(path, threads=1, precision=precision)
    ops = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        fused = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        ops.append((kind, prec, fused))
    return ops


def runtime_layers(path: Path, precision: str = "f32", ops: list | None = None) -> Counter:
    """(layer type, runtime precision) of every layer the CPU plugin executes after its own fusions."""
    return Counter((kind, prec) for kind, prec, _ in (ops if ops is not None else runtime_ops(path, precision)))


def _quantizer_module(node_name: str) -> str | None:
    """Module path of the activation quantizer whose exported QuantizeLinear is ``node_name``
    (``/layer1/0/act_quant/QuantizeLinear_1`` -> ``layer1.0.act_quant``), else None."""
    head, sep, tail = node_name.rpartition("/QuantizeLinear")
    if not sep or not (tail == "" or tail.lstrip("_").isdigit()):
        return None
    return head.strip("/").replace("/", ".") or None


def clip_only_quantizers(path: Path, ops: list | None = None) -> set[str]:
    """Activation quantizers (module paths) that OpenVINO's CPU plugin applies without rounding: in a
    convolution that fused its output Q/DQ first, then a residual add ("sum"), then another Q/DQ, the first
    one is a clip only (its convolution node drops that rounding). Read from the runtime model, where each
    layer lists the original layers it fused, in order (``ops``: runtime_ops of ``path``, if at hand)."""
    found = set()
    for kind, _, names in ops if ops is not None else runtime_ops(path):
        if kind != "Convolution":
            continue
        quants = [i for i, name in enumerate(names) if _quantizer_module(name)]
        adds = [i for i, name in enumerate(names) if name.rsplit("/", 1)[-1].startswith("Add")]
        if quants and adds and quants[0] < adds[0] < quants[-1]:
            found.add(_quantizer_module(names[quants[0]]))
    return found


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
