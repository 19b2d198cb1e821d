"""The one builder of every deployable file.

Every place that needs a deployable ONNX file (the quantize and export stages, verify's unpruned
comparison, the latency probe that pruning searches with) calls ``build_deployable``: the same BN
folding, the same quantizer placement for the target, the same calibration and export, the same
structural checks. Only the settings differ (the probe calibrates quickly with the max calibrator).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
import torch.nn as nn

from deploycraft.data.transforms import InputSpec, prepare_batch
from deploycraft.onnx_io import export_onnx, op_counts, quant_dtypes
from deploycraft.progress import bar
from deploycraft.quant.graph import fold_bn
from deploycraft.quant.placement import Target, act_quantizers, expected_int8_convs, insert_quantizers

# The runtime each target's files are built for (TensorRT's files run on ONNX Runtime here, for accuracy).
TARGET_RUNTIME = {"onnxruntime-cpu": "onnxruntime", "openvino-cpu": "openvino", "tensorrt": "onnxruntime"}
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
    reduce_range: bool = False
    batch_size: int = 64
    weight_bits: int = 8  # every conv and linear layer's weights, 2-8 bits
    ends_bits: int | None = 8  # the first conv and the classifier (None: weight_bits like the rest)
    layer_bits: tuple[tuple[str, int], ...] = ()  # per module path, over both of the above

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
    return {name: list(q.finish_calibration(settings.calibrator, settings.percentile)) for name, q in quantizers}


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
    return Built(path, proto, module, ops, ranges or {})


def weight_integers(m: nn.Module):
    """A quantized layer's weight integers as numpy int8, as the exporter's INT8 quantizer computes them."""
    w, s = m.weight.detach().double(), m.weight_scale.detach().double()
    if m.per_channel:
        s = s.view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), -128, 127).to(torch.int8).numpy()


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
        from deploycraft.runtime.openvino import INT8, runtime_layers

        layers = runtime_layers(path)
        convs = {p: v for (kind, p), v in layers.items() if kind == "Convolution"}
        return {
            "runtime": "openvino",
            "int8_convs": sum(v for p, v in convs.items() if p in INT8),
            "convs": sum(convs.values()),
            "ops": {f"{kind}:{p}": v for (kind, p), v in sorted(layers.items())},
        }
    return None


def check_int8_execution(path: Path, target: Target, qmodel: nn.Module, workdir: Path) -> dict[str, Any] | None:
    """``int8_execution`` held to the placement: fewer INT8 convs than it quantizes is an error."""
    proof = int8_execution(path, target, workdir)
    if proof is None:
        return None
    proof["expected_int8_convs"] = expected = expected_int8_convs(qmodel, target)
    if proof["int8_convs"] < expected:
        raise DeployableCheckError(
            f"{proof['runtime']} would run only {proof['int8_convs']} of the {expected} convs that {path.name} "
            f"quantizes in INT8 ({proof['convs']} convs in all): the rest would run in float"
        )
    return proof
