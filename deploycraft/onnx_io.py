"""ONNX export shared by the export and quantize stages, and the checks every exported file passes.

Export uses torch's TorchScript-based exporter: it turns torch's fake-quant ops into
QuantizeLinear/DequantizeLinear directly and takes well under a second, where the dynamo exporter
has no fake-quant support in torch 2.13. Weight quantizers are then folded into INT8 initializers,
so a QDQ file stores INT8 weights (about a quarter of the FP32 size) as ONNX Runtime's own
quantizer writes them.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from deploycraft.artifacts import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    metadata: dict[str, Any] | None = None,
    int4_weights: list[np.ndarray] | None = None,
) -> onnx.ModelProto:
    model = model.eval()
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (sample,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            )
        proto = onnx.load(str(tmp))
        fold_weight_quantizers(proto)
        if int4_weights:
            narrow_to_int4(proto, int4_weights)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        proto.producer_name = "deploycraft"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return proto


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:  # topological order: Identity of a constant is a constant too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def fold_weight_quantizers(proto: onnx.ModelProto) -> int:
    """Replace QuantizeLinear(constant float weight) with the constant INT8 weight it computes."""
    graph = proto.graph
    consts = _constants(proto)
    folded = 0
    keep = []
    new_inits = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(i in consts for i in node.input):
            x = consts[node.input[0]].astype(np.float64)
            scale = consts[node.input[1]].astype(np.float64)
            zp = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zpv = scale.reshape(shape), zp.astype(np.int64).reshape(shape)
            else:
                zpv = zp.astype(np.int64)
            info = np.iinfo(zp.dtype)
            # ONNX QuantizeLinear rounds half to even, as numpy's rint does.
            q = np.clip(np.rint(x / scale) + zpv, info.min, info.max).astype(zp.dtype)
            new_inits.append(numpy_helper.from_array(q, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        _drop_unused(proto)
    return folded


def narrow_to_int4(proto: onnx.ModelProto, weights: list[np.ndarray]) -> int:
    """Store the INT8 weight initializers equal to one of ``weights`` (integers in [-8, 7]) as INT4, with
    INT4 zero points on the DequantizeLinear that reads them, and raise the opset to 21 (INT4 Q/DQ).

    Matched by content: an initializer whose integers fit in four bits is stored exactly either way.
    """
    wanted = {(w.shape, w.astype(np.int8).tobytes()) for w in weights}
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consts = _constants(proto)
    narrowed = set()
    for t in list(graph.initializer):
        if t.data_type != onnx.TensorProto.INT8:
            continue
        a = numpy_helper.to_array(t)
        if (a.shape, a.tobytes()) in wanted:
            if a.min() < -8 or a.max() > 7:
                raise ValueError(f"initializer {t.name} does not fit in INT4")
            t.CopyFrom(numpy_helper.from_array(a.astype(ml_dtypes.int4), t.name))  # two values a byte
            narrowed.add(t.name)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in narrowed and len(node.input) > 2:
            zp = consts[node.input[2]]
            name = f"{node.input[0]}_zero_point_int4"
            if name not in inits:
                zt = numpy_helper.from_array(zp.astype(np.int8).astype(ml_dtypes.int4), name)
                graph.initializer.append(zt)
                inits[name] = zt
            node.input[2] = name
    if narrowed:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, 21)
        proto.ir_version = max(proto.ir_version, 10)  # INT4 needs IR version 10
        _drop_unused(proto)
    return len(narrowed)


def _drop_unused(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    while True:  # constants and identities feeding nothing any more, until none is left
        alive = [n for n in graph.node if n.op_type not in ("Constant", "Identity") or n.output[0] in used]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def op_counts(path_or_proto: Path | onnx.ModelProto) -> dict[str, int]:
    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto))
    return dict(Counter(n.op_type for n in proto.graph.node))


def quant_dtypes(proto: onnx.ModelProto) -> dict[str, int]:
    """Element types of the zero points of the activation quantizers: uint8 (ORT CPU) or int8 (TensorRT)."""
    consts = _constants(proto)
    kinds: Counter = Counter()
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in consts:
            kinds[str(consts[n.input[2]].dtype)] += 1
    return dict(kinds)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the tolerance measure used for export parity."""
    denom = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual - expected).max()) / denom
