"""The builders of every deployable file: one builder per kind of deployable.

Every place that needs a deployable ONNX file (the quantize and export stages, verify's unpruned
comparison, the latency probe that pruning searches with) calls ``build_deployable``: the same BN
folding, the same quantizer placement for the target, the same calibration and export, the same
structural checks. Only the settings differ (the probe calibrates quickly with the max calibrator).
The other deployables are derived the same way for every caller: ``build_aoti_package`` (an
AOTInductor ``.pt2`` of the BN-folded model), ``build_fp16_onnx`` (the FP32 ONNX cast to FP16) and
``build_tensorrt_engine`` (runtime/tensorrt.py, from the QDQ or FP16 ONNX).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
import torch.nn as nn

from deploycraft.artifacts import atomic_path
from deploycraft.data.transforms import InputSpec, prepare_batch
from deploycraft.machine import u8s8_pairs_saturate
from deploycraft.onnx_io import export_onnx, op_counts, quant_dtypes
from deploycraft.progress import bar
from deploycraft.quant.bias_correction import correct_biases
from deploycraft.quant.graph import fold_bn
from deploycraft.quant.modules import QuantConv2d
from deploycraft.quant.placement import Target, act_quantizers, expected_int8_convs, insert_quantizers

# The runtime each target's files are built for (TensorRT's files run on ONNX Runtime here, for accuracy).
TARGET_RUNTIME = {"onnxruntime-cpu": "onnxruntime", "openvino-cpu": "openvino", "tensorrt": "onnxruntime"}
# The CPU target each CPU runtime's placement and rules belong to (the other way round).
RUNTIME_TARGET = {"onnxruntime": "onnxruntime-cpu", "openvino": "openvino-cpu"}
# The activation integer types each target's INT8 kernels take (docs/design.md, "placements by target").
ACTIVATION_DTYPES = {"onnxruntime-cpu": {"uint8"}, "openvino-cpu": {"uint8", "int8"}, "tensorrt": {"int8"}}


def build_targets(target: str) -> list[str]:
    """The INT8 placements a recipe's target builds: its own, or (auto) one per CPU runtime installed."""
    if target != "auto":
        return [target]
    from deploycraft.runtime import available

    return ["onnxruntime-cpu"] + (["openvino-cpu"] if available("openvino") else [])


@dataclass(frozen=True)
class QuantSettings:
    """How an INT8 deployable is calibrated; the quantize stage's config carries the user's choice."""

    calibrator: str = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    # 7-bit weights; by default where this CPU's INT8 kernels would saturate 8-bit ones (machine.py)
    reduce_range: bool = field(default_factory=u8s8_pairs_saturate)
    batch_size: int = 64
    weight_bits: int = 8  # every conv and linear layer's weights, 2-8 bits
    ends_bits: int | None = 8  # the first conv and the classifier (None: weight_bits like the rest)
    layer_bits: tuple[tuple[str, int], ...] = ()  # per module path, over both of the above
    bias_correction: bool = False  # after calibration, remove each layer's mean output shift (bias_correction.py)

    def bits_of(self, path: str, index: int, count: int) -> int:
        for name, bits in self.layer_bits:
            if name == path:
                return bits
        if self.ends_bits is not None and index in (0, count - 1):
            return self.ends_bits
        return self.weight_bits


# Pruning's latency probe: a quick calibration is enough to time the INT8 graph.
PROBE_SETTINGS = QuantSettings(calibrator="max", percentile=100.0)


class DeployableCheckError(RuntimeError):
    """A built file does not meet its contract (BN left, no Q/DQ, wrong activation type)."""


@dataclass
class Built:
    """A deployable written to ``path``, with the torch module whose export it is."""

    path: Path
    proto: onnx.ModelProto
    module: nn.Module  # BN-folded float model, or the calibrated Q/DQ simulation
    ops: dict[str, int]
    ranges: dict[str, list[float]] = field(default_factory=dict)  # calibrated activation ranges (int8)
    # conv output channels whose weight scale was raised so that their bias fits int32 ("layer3.0.conv2[5]")
    bias_fitted: list[str] = field(default_factory=list)


def onnx_metadata(arch: str, precision: str, target: str | None, spec: InputSpec, classes: list[str]) -> dict[str, Any]:
    """What a shipped ONNX file says about itself (metadata_props): enough to feed it and read its output."""
    meta: dict[str, Any] = {"deploycraft.arch": arch, "deploycraft.precision": precision}
    if precision == "int8":
        meta["deploycraft.target"] = target
    meta["deploycraft.input"] = spec.to_dict()
    meta["deploycraft.classes"] = classes
    return meta


def calibrate(
    qmodel: nn.Module, images: torch.Tensor, spec: InputSpec, settings: QuantSettings, show: bool = True
) -> dict[str, list[float]]:
    """Observe the activations of ``images`` (uint8 NCHW) and set every activation quantizer's range."""
    quantizers = act_quantizers(qmodel)
    for _, q in quantizers:
        q.start_calibration()
    qmodel.eval()
    steps = -(-len(images) // settings.batch_size)
    with torch.no_grad(), bar("calibrate", steps if show else 0) as b:
        for i in range(0, len(images), settings.batch_size):
            qmodel(prepare_batch(images[i : i + settings.batch_size], spec))
            b.advance()
    ranges = {name: list(q.finish_calibration(settings.calibrator, settings.percentile)) for name, q in quantizers}
    if settings.bias_correction:
        batches = [
            prepare_batch(images[i : i + settings.batch_size], spec) for i in range(0, len(images), settings.batch_size)
        ]
        correct_biases(qmodel, batches, show)
    return ranges


def quantized_module(float_model: nn.Module, target: Target, settings: QuantSettings) -> nn.Module:
    """The uncalibrated Q/DQ simulation of ``float_model`` placed for ``target`` (BN folded)."""
    return insert_quantizers(float_model, target, settings.per_channel, settings.reduce_range, settings.bits_of)


def build_deployable(
    model: nn.Module,
    precision: Literal["fp32", "int8"],
    path: Path,
    sample: torch.Tensor,
    *,
    target: Target = "onnxruntime-cpu",
    settings: QuantSettings | None = None,
    calibration: tuple[torch.Tensor, InputSpec] | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    metadata: dict[str, Any] | None = None,
    show: bool = True,
) -> Built:
    """Fold, (quantize and calibrate,) export and check one deployable ONNX file.

    fp32: BatchNorm folded into the convs. int8: Q/DQ placed for ``target``, calibrated on
    ``calibration`` (uint8 images and the input spec that prepares them), weights stored as INT8.
    """
    ranges: dict[str, list[float]] = {}
    if precision == "fp32":
        module = fold_bn(model)
    else:
        if calibration is None:
            raise ValueError("an int8 deployable needs calibration images")
        settings = settings or QuantSettings()
        module = quantized_module(model, target, settings)
        images, spec = calibration
        ranges = calibrate(module, images, spec, settings, show)
    return export_deployable(module, precision, path, sample, target, opset, dynamic_batch, metadata, ranges)


def export_deployable(
    module: nn.Module,
    precision: Literal["fp32", "int8"],
    path: Path,
    sample: torch.Tensor,
    target: Target = "onnxruntime-cpu",
    opset: int = 17,
    dynamic_batch: bool = True,
    metadata: dict[str, Any] | None = None,
    ranges: dict[str, list[float]] | None = None,
) -> Built:
    """Export and check a folded or quantized module: ``build_deployable``'s second half, which QAT calls
    again on the fine-tuned simulation, so its file has the PTQ file's graph.

    Weights below 8 bits export as their integers; those of 4 bits or fewer are stored as ONNX INT4
    (opset 21), wider ones as INT8 holding the narrower integers."""
    int4: list = []
    fitted: list[str] = []
    if precision == "int8":
        # biases on QLinearConv's int32 grid must fit it (near-dead channels); the simulation changes with the file
        for name, m in module.named_modules():
            if isinstance(m, QuantConv2d):
                fitted += [f"{name}[{c}]" if c >= 0 else name for c in m.fit_bias_to_int32()]
    exported = module
    if any(getattr(m, "bits", 8) < 8 for m in module.modules()):
        exported = copy.deepcopy(module)  # the caller keeps the simulation itself (QAT trains it further)
        for m in exported.modules():
            if getattr(m, "bits", 8) < 8:
                m.narrow_for_export()
                if m.bits <= 4:
                    int4.append(weight_integers(m))
    proto = export_onnx(exported, sample, path, opset, dynamic_batch, metadata, int4)
    ops = op_counts(proto)
    if ops.get("BatchNormalization"):
        raise DeployableCheckError(f"{path.name} has {ops['BatchNormalization']} BatchNormalization nodes left")
    if precision == "int8":
        if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
            raise DeployableCheckError(f"{path.name} has no QuantizeLinear/DequantizeLinear pairs: {ops}")
        allowed = ACTIVATION_DTYPES[target]
        dtypes = quant_dtypes(proto)
        if set(dtypes) - allowed:
            raise DeployableCheckError(
                f"{path.name}: activation zero points are {dtypes}, the {target} target takes {sorted(allowed)}"
            )
    return Built(path, proto, module, ops, ranges or {}, fitted)


def weight_integers(m: nn.Module):
    """A quantized layer's weight integers as numpy int8, as the exporter's INT8 quantizer computes them."""
    return m.integer_weight()[0].to(torch.int8).numpy()


def int8_execution(path: Path, target: Target, workdir: Path) -> dict[str, Any] | None:
    """What the target's runtime actually executes in INT8, read from its own optimized graph.

    ONNX Runtime: the graph after its optimizations (QLinearConv, QLinearAdd); OpenVINO: the CPU
    plugin's runtime model (each convolution's runtime precision). None for TensorRT (not here).
    """
    if target == "onnxruntime-cpu":
        from deploycraft.runtime.ort import optimized_op_counts

        opt = optimized_op_counts(path, workdir)
        convs = sum(opt.get(k, 0) for k in ("QLinearConv", "Conv", "FusedConv", "NhwcFusedConv"))
        return {
            "runtime": "onnxruntime",
            "int8_convs": opt.get("QLinearConv", 0),
            "convs": convs,
            "int8_adds": opt.get("QLinearAdd", 0),
            "ops": opt,
        }
    if target == "openvino-cpu":
        from deploycraft.runtime.openvino import INT8, clip_only_quantizers, runtime_layers, runtime_ops

        ops = runtime_ops(path)
        layers = runtime_layers(path, ops=ops)
        convs = {p: v for (kind, p), v in layers.items() if kind == "Convolution"}
        return {
            "runtime": "openvino",
            "int8_convs": sum(v for p, v in convs.items() if p in INT8),
            "convs": sum(convs.values()),
            "ops": {f"{kind}:{p}": v for (kind, p), v in sorted(layers.items())},
            "clip_only": sorted(clip_only_quantizers(path, ops)),
        }
    return None


def int8_execution_vs_placement(
    path: Path, target: Target, qmodel: nn.Module, workdir: Path, fused_only: bool = False
) -> dict[str, Any] | None:
    """``int8_execution`` beside what the simulation ``qmodel`` expects: the convs it quantizes
    (``expected_int8_convs``; ``fused_only``: only those the runtime fuses, for a file placed for another one)
    and, for OpenVINO, the quantizers applied without rounding as run and as simulated. Recorded, not judged."""
    proof = int8_execution(path, target, workdir)
    if proof is None:
        return None
    proof["expected_int8_convs"] = expected_int8_convs(qmodel, target, fused_only=fused_only)
    if "clip_only" in proof:  # the quantizers OpenVINO applies without rounding, as run and as simulated
        simulated = sorted(name for name, q in act_quantizers(qmodel) if q.mode == "quantize" and not q.rounds)
        proof["clip_only"] = {"runtime": proof["clip_only"], "simulated": simulated}
    return proof


def check_int8_execution(path: Path, target: Target, qmodel: nn.Module, workdir: Path) -> dict[str, Any] | None:
    """``int8_execution`` held to the placement: fewer INT8 convs than it quantizes is an error."""
    proof = int8_execution_vs_placement(path, target, qmodel, workdir)
    if proof is not None and proof["int8_convs"] < proof["expected_int8_convs"]:
        raise DeployableCheckError(
            f"{proof['runtime']} would run only {proof['int8_convs']} of the {proof['expected_int8_convs']} convs "
            f"that {path.name} quantizes in INT8 ({proof['convs']} convs in all): the rest would run in float"
        )
    return proof


# --- AOTInductor package ---------------------------------------------------------------------------

AOTI_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _FloatIO(nn.Module):
    """FP32 in and out around a model that computes in ``dtype``: the package takes what the ONNX files
    take, and the casts are compiled into it (fused with the first and last kernels where Inductor can)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


@dataclass
class BuiltPackage:
    """An AOTInductor package written to ``path`` and what it says about itself."""

    path: Path
    precision: str
    device: str
    max_batch: int
    compile_seconds: float
    metadata: dict[str, str]


def build_aoti_package(
    model: nn.Module,
    path: Path,
    sample: torch.Tensor,
    *,
    precision: Literal["fp32", "fp16", "bf16"] = "fp32",
    device: str = "cpu",
    max_batch: int = 256,
    channels_last: bool = False,
    metadata: dict[str, Any] | None = None,
) -> BuiltPackage:
    """The BN-folded model exported with ``torch.export`` (dynamic batch 1..``max_batch``) and compiled
    ahead of time by Inductor into one ``.pt2`` file for ``device``.

    The package holds the generated kernels and the weights: ``torch._inductor.aoti_load_package``
    runs it with torch alone, without this package's model code. It takes and returns FP32 tensors;
    fp16/bf16 packages compute in that precision inside. ``channels_last`` lays the weights out NHWC
    (what cuDNN's tensor-core convolutions want); the input may come in either layout.
    """
    import time

    module = fold_bn(model).eval().to(device=device, dtype=AOTI_DTYPES[precision])
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    wrapped = _FloatIO(module, AOTI_DTYPES[precision]).eval()
    x = sample.to(device=device, dtype=torch.float32)
    if len(x) < 2:  # export specializes a dimension whose example size is 1
        x = x.repeat(2, 1, 1, 1)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(
        {"deploycraft.precision": precision, "deploycraft.device": device, "deploycraft.max_batch": str(max_batch)}
    )
    start = time.perf_counter()
    with torch.no_grad():
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        program = torch.export.export(wrapped, (x,), dynamic_shapes=({0: batch},), strict=False)
        # The archive's folder is named after the file: compile under the final name in a private folder.
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
            tmp = Path(folder) / path.name
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": meta}
            )
            os.replace(tmp, path)
    return BuiltPackage(path, precision, device, max_batch, time.perf_counter() - start, meta)


# --- FP16 ONNX ---------------------------------------------------------------------------------------

FP16_MAX = 65504.0
# Kept in FP32 beyond the converter's own list (ops without FP16 meaning: TopK, NMS, Range, ...):
# exponentials overflow FP16 long before FP32 does.
FP16_KEEP_FP32_OPS = ("Softmax", "LogSoftmax", "Exp")


@dataclass
class BuiltFp16:
    """An FP16 ONNX file and what stayed in FP32."""

    path: Path
    proto: onnx.ModelProto
    ops: dict[str, int]
    fp16_initializers: int
    fp32_nodes: list[str]  # nodes kept in FP32 (listed ops, or weights beyond FP16's range)


def build_fp16_onnx(fp32_path: Path, path: Path) -> BuiltFp16:
    """The FP32 ONNX file with weights and activations cast to FP16 and FP32 inputs/outputs kept.

    Nodes stay in FP32 where FP16 would change the result beyond rounding: the ops in
    ``FP16_KEEP_FP32_OPS`` and the converter's block list, and any node that reads a constant outside
    FP16's finite range (after BN folding a weight can grow; casting it would make it inf). TensorRT
    builds strongly typed networks from these tensor types (docs/design.md), so this file is also
    what its FP16 engine is built from.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from deploycraft.onnx_io import _constants

    proto = onnx.load(str(fp32_path))
    consts = _constants(proto)
    overflow = {n for n, v in consts.items() if v.dtype.kind == "f" and v.size and float(abs(v).max()) > FP16_MAX}
    keep = [n.name for n in proto.graph.node if n.name and (n.op_type in FP16_KEEP_FP32_OPS or overflow & set(n.input))]
    converted = convert_float_to_float16(
        proto,
        min_positive_val=float(torch.finfo(torch.float16).tiny),
        max_finite_val=FP16_MAX,
        keep_io_types=True,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS)),
        node_block_list=keep,
    )
    _topological_sort(converted.graph)
    for entry in converted.metadata_props:
        if entry.key == "deploycraft.precision":
            entry.value = "fp16"
    onnx.checker.check_model(converted, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(converted, str(tmp))
    fp16 = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    fp16 += sum(
        1
        for n in converted.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT16
    )
    if not fp16:
        raise DeployableCheckError(f"{path.name} has no FP16 weights: the conversion did nothing")
    return BuiltFp16(path, converted, op_counts(converted), fp16, keep)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs (the converter appends the
    casts it inserts at the end; the ONNX checker and TensorRT's parser want the graph sorted)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise DeployableCheckError(f"the FP16 graph has a cycle or a missing input at {pending[0].name}")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if n not in ready]
    copies = [onnx.NodeProto() for _ in ordered]
    for dup, node in zip(copies, ordered, strict=True):
        dup.CopyFrom(node)  # the originals belong to graph.node, which is cleared next
    del graph.node[:]
    graph.node.extend(copies)
