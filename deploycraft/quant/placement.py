"""Where the Q/DQ pairs go: a function of the deployment target.

Every placement starts from the BN-folded graph and quantizes every Conv/Linear weight per output
channel (S8 symmetric). They differ in the activations (docs/design.md, "placements by target"):

onnxruntime-cpu (U8 asymmetric activations)
    ONNX Runtime turns DQ -> Conv -> Q into QLinearConv and DQ, DQ -> Add -> Q into QLinearAdd; an
    op whose output is not quantized stays in float. So every conv input, both inputs of each
    residual add and the add's output are quantized. Max-pool and flatten share the quantizer of
    their input, so ONNX Runtime drops their Q/DQ and runs them on uint8 directly.

openvino-cpu (symmetric activations, zero points 0: U8 after a ReLU, S8 elsewhere)
    The same tensors as for ONNX Runtime: the inputs of every quantizable op (convs, the linear,
    both inputs of each residual add), which is where NNCF places FakeQuantize for OpenVINO's CPU
    plugin on these graphs (measured on ResNet-20/50: conv inputs, both add inputs, the pooled
    features); the plugin then runs every conv as a U8/I8 convolution with the add fused in.
    Symmetric activations are NNCF's default ("performance" preset) for the CPU.

tensorrt (S8 symmetric everywhere, zero points 0)
    TensorRT fuses Conv + Add + ReLU into one INT8 kernel when the *skip* input of the add carries
    Q/DQ and the conv branch does not. So only the inputs of convs and linears and the skip input of
    each residual add are quantized; outputs are left to TensorRT.

One quantizer per tensor: a tensor read by several quantized consumers is quantized once and all of
them read the same Q/DQ, which is what the deployed graph computes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from deploycraft.models.layers import ResidualAdd
from deploycraft.quant.graph import fold_bn
from deploycraft.quant.modules import ActQuantizer, QuantConv2d, QuantLinear

Target = Literal["onnxruntime-cpu", "openvino-cpu", "tensorrt"]
TARGETS: tuple[str, ...] = ("onnxruntime-cpu", "openvino-cpu", "tensorrt")
# Activation scheme per target (quant/modules.py: ActQuantizer) and whether the target quantizes conv
# outputs and both inputs of residual adds ("outputs") or conv inputs and the skip input only ("inputs").
ACTIVATION_SCHEME = {"onnxruntime-cpu": "u8", "openvino-cpu": "sym", "tensorrt": "s8"}
PLACEMENT = {"onnxruntime-cpu": "outputs", "openvino-cpu": "outputs", "tensorrt": "inputs"}

_PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_PASSTHROUGH_FUNCTIONS = {torch.flatten, torch.reshape}
_PASSTHROUGH_METHODS = {"flatten", "view", "reshape"}


def _module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _is_passthrough(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_module(gm, n), _PASSTHROUGH_MODULES)
    if n.op == "call_function":
        return n.target in _PASSTHROUGH_FUNCTIONS
    if n.op == "call_method":
        return n.target in _PASSTHROUGH_METHODS
    return False


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(_module(gm, n), nn.ReLU)
    if n.op == "call_function":
        return n.target in (torch.relu, torch.nn.functional.relu)
    return n.op == "call_method" and n.target == "relu"


def _is_concat(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is torch.cat


def _is_plain_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (operator.add, torch.add)


def _find(parent: dict, n: fx.Node) -> fx.Node:
    while parent[n] is not n:
        parent[n] = parent[parent[n]]
        n = parent[n]
    return n


def plan(gm: fx.GraphModule, target: Target) -> list[list[fx.Node]]:
    """Groups of graph nodes whose outputs are quantized; each group shares one quantizer."""
    if target not in TARGETS:
        raise ValueError(f"unknown quantization target {target!r}; expected one of {TARGETS}")
    need: dict[fx.Node, None] = {}

    def want(x) -> None:
        if isinstance(x, fx.Node):
            need[x] = None

    ort = PLACEMENT[target] == "outputs"  # ONNX Runtime's rules (OpenVINO's quantize the same tensors)
    for n in gm.graph.nodes:
        m = _module(gm, n)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            want(n.args[0])
            if ort and isinstance(m, nn.Conv2d):
                # ONNX Runtime makes a conv QLinearConv only when its output is quantized, so quantize it
                # even when a float op (sigmoid gate, pooling, SE) reads it; after a lone ReLU, so that
                # Conv -> ReLU -> Q fuses.
                users = list(n.users)
                want(users[0] if len(users) == 1 and _is_relu(gm, users[0]) else n)
        elif isinstance(m, ResidualAdd):
            if ort:
                want(n.args[0])
                want(n.args[1])
                want(n)
            else:
                want(n.args[1])
        elif ort and _is_concat(n):
            for x in n.args[0]:
                want(x)
            want(n)
        elif ort and _is_plain_add(n) and all(isinstance(a, fx.Node) for a in n.args[:2]):
            want(n.args[0])
            want(n.args[1])
            want(n)

    parent = {n: n for n in gm.graph.nodes}
    if ort:
        # Walk backwards so chains (pool -> flatten -> fc) share one quantizer end to end.
        for n in reversed(list(gm.graph.nodes)):
            if n in need and _is_passthrough(gm, n) and isinstance(n.args[0], fx.Node):
                src = n.args[0]
                need[src] = None
                parent[_find(parent, n)] = _find(parent, src)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:  # graph order keeps names deterministic
        if n in need:
            groups.setdefault(_find(parent, n), []).append(n)
    return list(groups.values())


def weight_layers(gm: fx.GraphModule) -> list[str]:
    """Module paths of the convs and linear layers in graph order (the first is the stem, the last the
    classifier)."""
    return [n.target for n in gm.graph.nodes if isinstance(_module(gm, n), (nn.Conv2d, nn.Linear))]


def insert_quantizers(
    float_model: nn.Module,
    target: Target,
    per_channel: bool = True,
    reduce_range: bool = False,
    weight_bits: Callable[[str, int, int], int] | None = None,
) -> fx.GraphModule:
    """BN-folded copy of ``float_model`` with weight and activation quantizers placed for ``target``.

    ``weight_bits(module_path, index, count)`` gives each conv or linear layer's weight bit-width (2-8;
    8 when None); ``index`` is its place among the ``count`` weight layers in graph order."""
    gm = fold_bn(float_model)
    groups = plan(gm, target)
    graph = gm.graph
    for i, group in enumerate(groups):
        name = f"act_quant_{i}"
        gm.add_module(name, ActQuantizer(ACTIVATION_SCHEME[target]))
        for n in group:
            with graph.inserting_after(n):
                q = graph.call_module(name, args=(n,))
            n.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    layers = weight_layers(gm)
    for n in list(graph.nodes):
        m = _module(gm, n)
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        bits = weight_bits(n.target, layers.index(n.target), len(layers)) if weight_bits else 8
        if type(m) is nn.Conv2d:
            new = QuantConv2d.from_float(m, per_channel, reduce_range, bits)
        else:
            new = QuantLinear.from_float(m, per_channel, reduce_range, bits)
        parent_name, _, child = n.target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, new)
    if target == "onnxruntime-cpu":
        _set_bias_grids(gm)
    if target == "openvino-cpu":
        _set_clip_only(gm)
    gm.recompile()
    return gm.eval()


def _quantized_conv(gm: fx.GraphModule, x) -> ActQuantizer | None:
    """The quantizer of ``x`` when ``x`` is a quantizer applied right to a conv's output (no op between), the
    conv's only user."""
    q = _module(gm, x) if isinstance(x, fx.Node) else None
    if not isinstance(q, ActQuantizer) or not isinstance(x.args[0], fx.Node):
        return None
    conv = x.args[0]
    return q if isinstance(_module(gm, conv), QuantConv2d) and len(conv.users) == 1 else None


def _set_clip_only(gm: fx.GraphModule) -> None:
    """OpenVINO's CPU plugin fuses a residual add into one of the convs that feed it ("sum" post-op), with the
    add's ReLU and its output quantizer; when the conv's first fused op is its own output quantizer and an
    output quantizer follows the sum, it applies that first quantizer as a clip without rounding (its graph
    optimizer picks the add's first input when both are quantized convs, else the one that is a conv; its
    convolution node drops the rounding of that pattern). The simulation does the same, so that it computes
    what OpenVINO runs. The quantize stage checks this against OpenVINO's runtime model."""
    for n in gm.graph.nodes:
        if not (isinstance(_module(gm, n), ResidualAdd) or _is_plain_add(n)) or len(n.args) < 2:
            continue
        users = list(n.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            users = list(users[0].users)
        out = _module(gm, users[0]) if len(users) == 1 else None
        if not isinstance(out, ActQuantizer):
            continue
        branch = _quantized_conv(gm, n.args[0]) or _quantized_conv(gm, n.args[1])
        if branch is not None:
            branch.clip_only_before(out)


def fused_as(gm: fx.GraphModule, runtime: str) -> fx.GraphModule:
    """A copy of the simulation ``gm`` that fuses and rounds where ``runtime`` does when it runs the file
    exported from ``gm``, whichever target the quantizers were placed for: the rules are the runtime's, not
    the placement's (``target: auto`` may ship the file placed for one CPU runtime on the other).

    ``openvino``: the residual add fused into a conv clips without rounding (``_set_clip_only``); the bias
    stays in float (OpenVINO adds it in float after its integer convolution). ``onnxruntime``: every
    quantizer rounds (QLinearConv and QLinearAdd are separate kernels); a conv whose input and output
    quantizers it fuses (``onnxruntime_fuses``) becomes QLinearConv, its bias on QLinearConv's int32 grid
    (``_set_bias_grids``). On its own runtime's file
    this reproduces what the placement set (tested); other runtimes: the copy unchanged."""
    import copy

    out = copy.deepcopy(gm)
    if runtime not in ("openvino", "onnxruntime"):
        return out
    for m in out.modules():
        if isinstance(m, ActQuantizer):
            object.__setattr__(m, "clip_only_while", None)
        elif isinstance(m, QuantConv2d):
            object.__setattr__(m, "bias_grid", None)
    if runtime == "openvino":
        _set_clip_only(out)
    else:
        _set_bias_grids(out, only=lambda n: onnxruntime_fuses(out, n))
    return out


def onnxruntime_fuses(gm: fx.GraphModule, n) -> bool:
    """Whether ONNX Runtime (x86-64) fuses the quantizer at node ``n`` into the integer kernels around it: a
    uint8 one always; an int8 one when its tensor has one consumer, since ONNX Runtime turns an int8 Q/DQ pair
    into uint8 (zero point + 128) only where the QuantizeLinear feeds a single DequantizeLinear, after it has
    given each consumer a DequantizeLinear of its own. Measured: the openvino-cpu placement's int8 tensors
    (conv outputs before the add, the input) become uint8 and every conv runs as QLinearConv; the tensorrt
    placement's int8 block inputs, read by two convs, stay int8 and their convs in float."""
    m = _module(gm, n) if isinstance(n, fx.Node) else None
    if not isinstance(m, ActQuantizer) or m.mode != "quantize" or not m.rounds:
        return False
    return bool(m.unsigned) or len(n.users) == 1


def _set_bias_grids(gm: fx.GraphModule, only: Callable[[fx.Node], bool] | None = None) -> None:
    """Each conv that ONNX Runtime fuses into QLinearConv (quantized input, quantized output or ReLU
    output) learns its quantizers, so that its bias is simulated on QLinearConv's int32 grid. ``only``:
    the quantizer nodes ONNX Runtime fuses (``onnxruntime_fuses``); None: every one (uint8 placements)."""
    for n in gm.graph.nodes:
        m = _module(gm, n)
        if not isinstance(m, QuantConv2d):
            continue
        src = n.args[0]
        iq = _module(gm, src) if isinstance(src, fx.Node) else None
        users = list(n.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            users = list(users[0].users)
        oq_node = next((u for u in users if isinstance(_module(gm, u), ActQuantizer)), None)
        oq = None if oq_node is None else _module(gm, oq_node)
        if only is not None and not (oq_node is not None and only(src) and only(oq_node)):
            continue
        if isinstance(iq, ActQuantizer) and oq is not None:
            m.set_bias_grid(iq, oq)


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]


def _is_active(m: nn.Module | None) -> bool:
    """An activation quantizer that quantizes (not one that fallback turned off)."""
    return isinstance(m, ActQuantizer) and m.mode != "off"


def expected_int8_convs(qmodel: fx.GraphModule, target: Target, fused_only: bool = False) -> int:
    """How many convs the placement lets the target's runtime run in INT8.

    A conv runs in INT8 when its input is quantized (weights always are); ONNX Runtime also needs its
    output (or the output of the ReLU right after it) quantized to form a QLinearConv. The quantize
    stage holds the runtime's own optimized graph to this number, so a file that would silently run
    convs in float never ships. ``fused_only`` (a file ONNX Runtime runs that was placed for another
    runtime): only quantizers ONNX Runtime fuses count (``onnxruntime_fuses``: not int8 tensors read twice).
    """
    need_output = target == "onnxruntime-cpu"

    def _active(x) -> bool:
        if fused_only and need_output:
            return onnxruntime_fuses(qmodel, x)
        return isinstance(x, fx.Node) and _is_active(_module(qmodel, x))

    count = 0
    for n in qmodel.graph.nodes:
        m = _module(qmodel, n)
        if not isinstance(m, QuantConv2d) or not m.quantize_weight:
            continue  # a conv left in float by fallback runs in float
        if m.bits <= 4:
            # INT4 weights: ONNX Runtime dequantizes them and runs the conv in float (smaller, not faster).
            continue
        src = n.args[0]
        if not _active(src):
            continue
        if need_output:
            users = list(n.users)
            if len(users) == 1 and _is_relu(qmodel, users[0]):
                users = list(users[0].users)
            if not any(_active(u) for u in users):
                continue
        count += 1
    return count
