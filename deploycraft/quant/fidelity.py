"""Layer-by-layer fidelity of a deployed INT8 file against its torch simulation.

Every activation quantizer of the simulation (an ``ActQuantizer`` module) is a QuantizeLinear /
DequantizeLinear pair in the exported file whose scale initializer is named after the module
(``layer1.0.act_quant.scale``). The file is re-written with each such DequantizeLinear output as an extra
graph output, run on the deployed runtime, and compared call for call with the simulation's quantizer
outputs on the same images (a module called twice, e.g. before and after a pooling, is two taps).

Both sides sit on the same quantization grid, so the natural difference is rounding: the simulation runs
in float64 here (``modules.exact_simulation``: a conv's sum of integer products is exact, as in the
runtime's int32 accumulator), so most elements agree exactly and a few differ by one step where the
runtime's float32 requantization breaks a tie the other way, growing slowly with depth. For ONNX Runtime the
simulation computes that requantization as its kernels do (quant/mlas.py), and the two agree element for
element on the x86-64 CPUs measured. A wrong number in the file
(a scale, a zero point, a weight) shows as a jump at the first quantizer after it. Each tap is also
attributed to the layer that produced it: the nearest conv or linear upstream, named by its module
path (from its weight's scale initializer, ``layer1.0.conv1.weight_scale``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from deploycraft.quant.modules import exact_simulation, rounding_everywhere
from deploycraft.quant.placement import act_quantizers

# A tap diverges when its relative error exceeds that of the taps feeding it by more than this.
DEFAULT_TOLERANCE = 0.1


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def _initializer_name(name: str, producers: dict[str, onnx.NodeProto], initializers: set[str]) -> str | None:
    """The initializer behind ``name``, through Identity nodes (the exporter shares equal constants so)."""
    seen = 0
    while name not in initializers and name in producers and producers[name].op_type == "Identity" and seen < 8:
        name, seen = producers[name].input[0], seen + 1
    return name if name in initializers else None


def _weight_module(dq: onnx.NodeProto | None, producers, initializers: set[str]) -> str | None:
    """Module path of a layer from its weight's DequantizeLinear: the scale (``<path>.weight_scale``) or the
    weight itself (``<path>.weight``, stored or quantized in the graph)."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = _initializer_name(dq.input[1], producers, initializers)
    if scale and scale.endswith(".weight_scale"):
        return scale[: -len(".weight_scale")]
    src = dq.input[0]
    q = producers.get(src)
    if q is not None and q.op_type == "QuantizeLinear":
        src = q.input[0]
    src = _initializer_name(src, producers, initializers) or src
    return src[: -len(".weight")] if src.endswith(".weight") else None


def _layer_of(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], initializers: set[str]) -> str | None:
    """Module path of the conv / linear whose output reaches ``node`` first, walking up the first inputs."""
    current, steps = node, 0
    while current is not None and steps < 64:
        if current.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(current.input) > 1:
            name = _weight_module(producers.get(current.input[1]), producers, initializers)
            bias = _initializer_name(current.input[2], producers, initializers) if len(current.input) > 2 else None
            if not name and bias and bias.endswith(".bias"):  # the weight folded to an anonymous constant
                name = bias[: -len(".bias")]
            return name or current.name.strip("/").rsplit("/", 1)[0] or current.name
        # the data input: skip initializers and constants
        data = next((i for i in current.input if i and i not in initializers and i in producers), None)
        current = producers.get(data) if data else None
        steps += 1
    return None


def activation_taps(proto: onnx.ModelProto) -> list[dict[str, Any]]:
    """The file's activation DequantizeLinear outputs in graph order: tensor, quantizer module path, call
    index of that module, and the layer that produced the quantized tensor."""
    graph = proto.graph
    producers = _producers(graph)
    initializers = {t.name for t in graph.initializer}
    taps, calls = [], {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        scale = _initializer_name(node.input[1], producers, initializers)
        if not scale or not scale.endswith(".scale") or scale.endswith(".weight_scale"):
            continue
        module = scale[: -len(".scale")]
        k = calls.get(module, 0)
        calls[module] = k + 1
        q = producers.get(node.input[0])
        src = producers.get(q.input[0]) if q is not None else None
        layer = _layer_of(src, producers, initializers) if src is not None else None
        taps.append({"tensor": node.output[0], "quantizer": module, "call": k, "layer": layer, "node": node})
    index = {t["tensor"]: i for i, t in enumerate(taps)}
    for t in taps:
        t["inputs"] = _upstream_taps(t.pop("node"), producers, initializers, index)
    return taps


def _upstream_taps(dq: onnx.NodeProto, producers, initializers: set[str], index: dict[str, int]) -> list[int]:
    """Indices of the activation taps that feed the tensor quantized at ``dq`` (weights excluded)."""
    q = producers.get(dq.input[0])
    stack = [i for i in (q.input[:1] if q is not None else []) if i in producers]
    found, seen = set(), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index:
            found.add(index[name])
            continue
        node = producers.get(name)
        if node is None or (node.op_type == "DequantizeLinear" and node.input[1].endswith("weight_scale")):
            continue
        stack.extend(i for i in node.input if i and i not in initializers and i in producers)
    return sorted(found)


def _with_outputs(proto: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return model


def _run_all(runtime: str, path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every graph output of ``path`` on ``runtime`` (ONNX Runtime or OpenVINO in f32), by tensor name."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if runtime == "onnxruntime":
        from deploycraft.runtime.ort import session

        sess = session(path)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))
    if runtime == "openvino":
        from deploycraft.runtime.openvino import compile_model

        compiled = compile_model(path)
        request = compiled.create_infer_request()
        request.infer({0: x})
        out = {}
        for i, port in enumerate(compiled.outputs):
            value = request.get_output_tensor(i).data.copy()
            for name in port.get_names():
                out[name] = value
        return out
    raise ValueError(f"unknown runtime {runtime!r}")


def _sim_taps(exact: torch.nn.Module, x: torch.Tensor) -> dict[str, list[np.ndarray]]:
    outputs: dict[str, list[np.ndarray]] = {}
    handles = []

    def keep(name: str):
        return lambda module, args, out: outputs.setdefault(name, []).append(out.detach().numpy().copy())

    quantizers = act_quantizers(exact)
    for name, q in quantizers:
        handles.append(q.register_forward_hook(keep(name)))
    try:
        # The tapped file exposes every quantizer's output, so no runtime fuses across one (OpenVINO then
        # rounds where it would clip in the untapped file): the simulation rounds everywhere too.
        with torch.no_grad(), rounding_everywhere([q for _, q in quantizers]):
            exact(x.double())
    finally:
        for h in handles:
            h.remove()
    return outputs


def compare(
    qmodel: torch.nn.Module, proto: onnx.ModelProto, runtime: str, x: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, Any]:
    """Per activation quantizer, how far the deployed runtime's output is from the simulation's on ``x``.

    Per tap: ``rel_error`` (||deployed - sim|| / ||sim||) and ``off`` (fraction of elements more than one
    quantization step apart) and ``excess``: its relative error minus the largest of the taps that feed it.
    Rounding differences grow slowly along the depth (ResNet-50: excess under 0.05 at every tap, though
    the relative error reaches 0.17 in the last stage), a wrong number in the file jumps at the layer that
    holds it; ``first_over`` is the first tap in graph order whose ``excess`` exceeds ``tolerance``, with the
    layer that produced it.
    """
    taps = activation_taps(proto)
    # float64 sums, as the runtimes' integer accumulators, and the runtime's own requantization where known;
    # recorded with the result (reports of earlier runs compared in float32, then in plain float64)
    exact = exact_simulation(qmodel, runtime)
    precision = {"sim_precision": exact.simulation_arithmetic}
    if not taps:
        return {"taps": [], "first_over": None, "tolerance": tolerance, "images": int(x.shape[0]), **precision}
    sim = _sim_taps(exact, x)
    scales = {name: float(q.scale) for name, q in act_quantizers(qmodel)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taps.onnx"
        onnx.save(_with_outputs(proto, [t["tensor"] for t in taps]), str(path))
        deployed = _run_all(runtime, path, x.numpy())
    rows, first, errors = [], None, {}
    for i, t in enumerate(taps):
        s_calls = sim.get(t["quantizer"], [])
        if t["call"] >= len(s_calls) or t["tensor"] not in deployed:
            continue
        s, d = s_calls[t["call"]], deployed[t["tensor"]]
        if s.shape != d.shape:
            continue
        step = scales.get(t["quantizer"], 1.0)
        diff = np.abs(d.astype(np.float64) - s.astype(np.float64))
        row = {
            "quantizer": t["quantizer"] + (f" (call {t['call'] + 1})" if t["call"] else ""),
            "layer": t["layer"],
            "rel_error": float(np.linalg.norm(diff) / max(float(np.linalg.norm(s)), 1e-12)),
            "off": float((diff > 1.5 * step).mean()),
        }
        errors[i] = row["rel_error"]
        if any(j not in errors for j in t["inputs"]):
            row["excess"] = 0.0  # an input could not be compared: no jump can be told from growth
        else:
            row["excess"] = row["rel_error"] - max((errors[j] for j in t["inputs"]), default=0.0)
        rows.append(row)
        if first is None and row["excess"] > tolerance:
            first = row
    return {"taps": rows, "first_over": first, "tolerance": tolerance, "images": int(x.shape[0]), **precision}


def summary_line(f: dict[str, Any], runtime: str) -> str:
    """One report line: the largest error, and the first layer whose error jumps past its inputs' (or none)."""
    rows = f.get("taps") or []
    if not rows:
        return f"Layer fidelity ({runtime}): no activation quantizer found in the file."
    worst = max(rows, key=lambda r: r["rel_error"])
    jump = max(rows, key=lambda r: r["excess"])
    head = (
        f"Layer fidelity, simulation{' (in ' + f['sim_precision'] + ')' if f.get('sim_precision') else ''} vs "
        f"{runtime} on {f['images']} images, {len(rows)} quantizer outputs: "
        f"largest relative error {worst['rel_error']:.3f} ({worst['quantizer']}, "
        f"after {worst['layer'] or 'the input'}; "
        f"{worst['off'] * 100:.1f} % of its elements more than one step apart), largest jump over its inputs "
        f"{jump['excess']:.3f} ({jump['quantizer']})"
    )
    first = f.get("first_over")
    if first is None:
        return head + f"; no layer adds more than {f['tolerance']:g}: the differences are rounding, grown with depth."
    return (
        head + f"; **first diverging layer: {first['layer'] or first['quantizer']}** (its output {first['quantizer']} "
        f"adds {first['excess']:.3f} to its inputs' relative error, tolerance {f['tolerance']:g})."
    )
