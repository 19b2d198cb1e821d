"""Graph capture and BatchNorm folding for deployment.

The deployed graph is captured with torch.fx. Our own composite layers (residual adds, shortcuts,
SE gates, stochastic depth) stay single nodes, so later passes see a residual add as one node with
a known (branch, skip) argument order.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from deploycraft.models.layers import CompositeLayer, StochasticDepth
from deploycraft.quant.modules import ActQuantizer, QuantConv2d


class DeployTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CompositeLayer) or super().is_leaf_module(m, qualname)


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace an eval-mode model into a GraphModule (eval-time control flow is what gets deployed).

    The family's ``stage_names`` go into ``meta`` (which, unlike plain attributes, survives deepcopy), and
    the tracer records each node's module path in ``node.meta["nn_module_stack"]``: together they let
    ``stage_outputs`` find the stages in the simulation, where fx has inlined the stage modules.
    """
    model = model.eval()
    graph = DeployTracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Graph")
    gm.meta["stage_names"] = list(getattr(model, "stage_names", None) or [])
    return gm


def _module_paths(node: fx.Node) -> set[str] | None:
    """The module paths a traced node was created inside; None for a node a pass inserted later (quantizers)."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    return {path for path, _type in stack.values()}


def stage_outputs(gm: fx.GraphModule, names: list[str], after_quantizer: bool = True) -> dict[str, fx.Node]:
    """For each stage (a module path of the traced model, e.g. ``layer1``), the node carrying its output.

    A stage's output is the one node created inside it whose value is read outside it; nodes that passes
    inserted after tracing (quantizers) carry no module path and are looked through. With
    ``after_quantizer`` the node returned is the activation quantizer that reads that output, where one
    does: the tensor the deployed graph carries between the stages. Raises ValueError when a stage is not
    in the graph or has no single output.
    """

    def readers(node: fx.Node):
        for user in node.users:
            if user.op == "output":
                yield None  # the graph's output: outside every stage
            elif _module_paths(user) is None:
                yield from readers(user)
            else:
                yield user

    found: dict[str, fx.Node] = {}
    for name in names:
        inside = [n for n in gm.graph.nodes if name in (_module_paths(n) or ())]
        if not inside:
            raise ValueError(f"stage {name!r} is not in the traced graph")
        members = set(inside)
        outs = [n for n in inside if any(r is None or r not in members for r in readers(n))]
        if len(outs) != 1:
            raise ValueError(f"stage {name!r} has {len(outs)} outputs in the traced graph ({[n.name for n in outs]})")
        out = outs[0]
        users = list(out.users)
        if (
            after_quantizer
            and len(users) == 1
            and users[0].op == "call_module"
            and isinstance(gm.get_submodule(users[0].target), ActQuantizer)
        ):
            out = users[0]
        found[name] = out
    return found


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel: an eval-mode BatchNorm that no conv can absorb."""

    # The float64 simulation of a file that ONNX Runtime runs computes it in float32, as ONNX Runtime's Mul and
    # Add do (quant/mlas.py sets it on the simulation's copy): DenseNet's BN-ReLU in front of every layer.
    float32: bool = False

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.view(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and x.dtype == torch.float64:
            return (x.float() * self.scale.float() + self.shift.float()).double()
        return x * self.scale + self.shift


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BN, computed in float64 to keep folding exact to float32.

    Detached: a ChannelAffine's buffers must not carry the BN parameters' autograd history (a deepcopy of the
    simulation, as QAT's control makes, refuses such tensors, and every backward would run into the BN)."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, new)


def _bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _foldable(conv: nn.Module | None, src, bn: nn.BatchNorm2d) -> bool:
    """A BN folds into the conv before it when that conv feeds it alone."""
    return isinstance(conv, nn.Conv2d) and len(src.users) == 1 and conv.out_channels == bn.num_features


def folded_conv_paths(model: nn.Module) -> list[str]:
    """Module paths of the convs ``fold_bn`` folds a BN into (the graph only: works on the meta device)."""
    gm = capture(copy.deepcopy(model))
    out = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        src = node.args[0] if node.args else None
        if isinstance(bn, nn.BatchNorm2d) and isinstance(src, fx.Node) and _foldable(_module(gm, src), src, bn):
            out.append(src.target)
    return out


def fold_bn(model: nn.Module, record: dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]] | None = None) -> fx.GraphModule:
    """A copy of ``model`` with every eval-mode BatchNorm folded away.

    ``record``, when given, receives a copy of each conv and the BN folded into it, by the conv's module path
    (the folded conv keeps that path): QAT with ``bn_fold: after`` trains them unfolded.

    - Conv -> BN: the BN's scale and shift go into the conv's weight and bias (standard folding).
    - BN or conv -> StochasticDepth (eval: multiply by the survival probability): the constant goes
      into that layer first, so the branch ends in a plain conv and the residual add can fuse with it.
    - Any other BN (pre-activation nets, DenseNet) becomes a ChannelAffine (Mul + Add in ONNX),
      so the exported graph has no BatchNormalization node at all.
    """
    gm = capture(copy.deepcopy(model).eval())
    graph = gm.graph
    # 1) fold eval-time stochastic-depth scaling into the BN or conv that ends the branch.
    for node in list(graph.nodes):
        m = _module(gm, node)
        if isinstance(m, StochasticDepth):
            src = node.args[0]
            prev = _module(gm, src) if isinstance(src, fx.Node) else None
            if isinstance(prev, (nn.BatchNorm2d, nn.Conv2d)) and len(src.users) == 1:
                with torch.no_grad():
                    prev.weight.mul_(m.survival_prob)
                    if prev.bias is not None:
                        prev.bias.mul_(m.survival_prob)
                _bypass(gm, node)
    # 2) conv -> bn.
    for node in list(graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if _foldable(conv, src, bn):
            if record is not None:
                record[src.target] = (copy.deepcopy(conv), copy.deepcopy(bn))
            scale, shift = _bn_affine(bn)
            w = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
            b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
            folded = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
                padding_mode=conv.padding_mode,
            )
            with torch.no_grad():
                folded.weight.copy_(w.float())
                folded.bias.copy_((b * scale + shift).float())
            _replace_module(gm, src.target, folded)
            _bypass(gm, node)
        else:
            scale, shift = _bn_affine(bn)
            _replace_module(gm, node.target, ChannelAffine(scale.float(), shift.float()))
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def attach_live_bn(qmodel: nn.Module, pairs: dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]]) -> list[str]:
    """Give every QuantConv2d of ``qmodel`` whose BN was folded (``pairs``: fold_bn's record, by module path) its
    BN back, live; returns their paths. A conv whose weight is not the fold of its pair is refused."""
    done = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantConv2d) and name in pairs and m._modules.get("live_bn") is None:
            conv, bn = pairs[name]
            scale, _ = _bn_affine(bn)  # as fold_bn folded it
            if not torch.allclose(
                (conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).float(), m.weight, atol=1e-6
            ):
                raise ValueError(f"{name}: its weight is not the fold of its recorded conv and BN")
            m.attach_bn(conv, bn)
            done.append(name)
    return done
