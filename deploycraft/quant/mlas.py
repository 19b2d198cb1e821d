"""ONNX Runtime's integer arithmetic on x86-64 (its MLAS kernels), imitated in the float64 simulation.

The float64 simulation (``modules.exact_simulation``) sums a conv's integer products exactly, as the runtime's
int32 accumulator does, and then divides by the next quantizer's scale in float64. ONNX Runtime does not
divide there: it fuses each quantized op into an integer kernel whose last step is float32, so an element
whose exact quotient lies within about 1e-5 of a tie (x.5) can land on the other integer, and such one-step
differences spread along the depth (the shipped recipe's PyramidNet-20 on Fashion-MNIST, 64 images: 1.6
million of its 32 million quantized elements off by a step or more; 21 of 10,000 test images predicted
differently). Here the simulation computes those steps as the kernels do, so that it and the deployed file
agree element for element and any difference left is a real one (a wrong number in the file):

* **QLinearConv** (DQ -> Conv -> [ReLU] -> Q): the int32 sum of (x - x_zero) x w, plus the bias on its int32
  grid, converted to float32 and multiplied by ``x_scale * w_scale / y_scale`` (float32, left to right, as
  ``QLinearConv::ComputeOutputScale``), rounded half to even, clamped, plus the zero point
  (``MlasRequantizeOutput``; the symmetric conv kernels requantize the same way). A ReLU between the conv
  and its quantizer is dropped by ONNX Runtime when the quantizer's zero point is its lowest integer, which
  the clamp then does.
* **QLinearAdd** (DQ, DQ -> Add -> [ReLU] -> Q): float32 ratios ``r_a = a_scale / y_scale``,
  ``r_b = b_scale / y_scale``, a constant ``k = y_zero - fma(r_a, a_zero, r_b * b_zero)`` and per element
  ``fma(a, r_a, fma(b, r_b, k))`` on the raw integers a, b (input 0 and 1 of the ONNX Add), rounded half to
  even, clamped: ONNX Runtime's SSE2 kernel (``qladd.cpp``) as its x86-64 build computes it, with its
  multiply-adds fused. Determined by measurement: of fourteen orderings of that kernel's arithmetic (and its
  AVX2 assembly variant, which divides by the output scale instead), this is the only one that matched
  every output element of all 69 QLinearAdds of six models (trained PyramidNet-20, pre-activation and
  SE-ResNet-20, WRN-16-2 and ResNet-56 with stochastic depth, 128-256 images each; a random ResNet-20) and
  of 3 x 65,536 planted ties (tests/quant/test_mlas.py).
* **QLinearGlobalAveragePool** (DQ -> GlobalAveragePool -> Q): the int32 sum of (x - x_zero) over the image,
  converted to float32 and multiplied by ``x_scale / (y_scale * H*W)`` (float32), rounded, clamped.
* **QLinearAveragePool** (DQ -> AveragePool -> Q, no padding): the dequantized inputs summed in float32 in
  row-major order over the window, divided by its size, by ``y_scale``, plus ``y_zero``, then rounded half to
  even (the zero point added before rounding) and clamped.
* **QuantizeLinear** everywhere else (and the lookup table of QLinearConcat, which dequantizes and quantizes
  in float32): ``x / scale`` in float32, rounded half to even.
* **Mul, Add** of a BatchNorm that no conv absorbs (``graph.ChannelAffine``: DenseNet's BN-ReLU in front of
  every layer, PyramidNet's in front of every block): float32, as ONNX Runtime runs them between a
  DequantizeLinear and a QuantizeLinear (a trained DenseNet-BC: 22 of 10,000 test images predicted otherwise
  with them in float64).

ONNX Runtime on x86-64 fuses these for uint8 activations; an int8 Q/DQ pair it first turns into uint8
(zero point + 128, the same integers shifted) where the QuantizeLinear feeds one DequantizeLinear, i.e. where
the tensor has one consumer (``placement.onnxruntime_fuses``): the openvino-cpu placement's int8 tensors
all do (its file on ONNX Runtime: 53 of 53 convs of ResNet-50 as QLinearConv, and this simulation equal to
it element for element), the tensorrt placement's block inputs, read by two convs, do not (their convs run
in float there: only their QuantizeLinear is imitated). Where a kernel adds the zero point in float32
before it rounds, it is the uint8 one (``_uint8_zero``). Measured on the ONNX Runtime
1.32 CPU build (AMD EPYC Zen 4, AVX-512 VNNI): on the shipped recipe's PyramidNet-20 (alpha 48; 64 images)
the plain float64 simulation differs from the file at 1.6 million of 32 million elements, this one at none
(and at none of a trained DenseNet-BC's 91 million on 16 images). Other CPUs' kernels round elsewhere (ARM's
NEON QLinearAdd works in fixed point; x86 without VNNI saturates pairs of conv products to int16): there
the simulation is about as close as the plain float64 one (``kernels_imitated``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from deploycraft.models.layers import ResidualAdd
from deploycraft.quant.graph import ChannelAffine
from deploycraft.quant.modules import ActQuantizer, QuantConv2d, integer_conv2d, quant_step
from deploycraft.quant.placement import _is_relu, onnxruntime_fuses


def kernels_imitated() -> bool:
    """Whether this CPU runs the kernels imitated here: x86-64 with AVX2, FMA and VNNI (Linux: read from
    /proc/cpuinfo). Without VNNI ONNX Runtime's u8 x s8 conv kernels multiply with VPMADDUBSW, which
    saturates pairs of products to int16, so their sums are not the exact ones; on other CPUs (ARM) it picks
    other kernels. There the imitation is only close."""
    import platform

    from deploycraft.machine import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags()
    return "avx2" in flags and "fma" in flags and ("avx512_vnni" in flags or "avx_vnni" in flags)


def _uint8_zero(q: ActQuantizer) -> torch.Tensor:
    """The quantizer's zero point as ONNX Runtime's fused kernels see it (float32): on uint8, where an int8
    quantizer (zero point z) becomes a uint8 one with zero point z + 128 and the same integers shifted by 128.
    It matters where the kernel adds the zero point in float32 before it rounds (QLinearAdd,
    QLinearAveragePool)."""
    return q.zero_point.float() + (0.0 if bool(q.unsigned) else 128.0)


def _requantize(v: torch.Tensor, out: ActQuantizer) -> torch.Tensor:
    """float32 ``v`` (the output's quotient) rounded half to even and clamped to the output's integers, as
    dequantized float64 values (exactly on the output's grid, so its own quantizer leaves them alone)."""
    lo, hi = out.qrange
    zp = int(out.zero_point)
    return torch.clamp(torch.round(v), lo - zp, hi - zp).double() * out.scale.double()


class QLinearConv(nn.Module):
    """A quantized conv and its output quantizer as ONNX Runtime's QLinearConv computes them; takes the input
    quantizer's (float64) output. Holds the conv and the quantizers as plain attributes: they stay where the
    graph has them."""

    def __init__(self, conv: QuantConv2d, inp: ActQuantizer, out: ActQuantizer):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "inp", inp)
        object.__setattr__(self, "out", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, inp, out = self.conv, self.inp, self.out
        w_scale = quant_step(conv.weight_scale).float()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        # The float64 copy holds integer x step (exact), input values on the input's grid: integers come back
        # exactly; a sum of integer products is exact in float64, as in the int32 accumulator.
        w_int = torch.round(conv.weight.double() / w_scale.double().reshape(shape if w_scale.numel() > 1 else -1))
        x_int = torch.round(x / inp.scale.double())  # q - zero
        acc = integer_conv2d(x_int, w_int, conv.stride, conv.padding, conv.dilation, conv.groups)
        bias_step = inp.scale.float() * w_scale  # float32, as the int32 bias was computed (bias_step)
        if conv.bias is not None:  # the simulation's bias is integer x bias_step: the integers come back exactly
            acc = acc + torch.round(conv.bias.double() / bias_step.double()).reshape(1, -1, 1, 1)
        multiplier = (bias_step / out.scale.float()).reshape(1, -1, 1, 1)
        return _requantize(acc.float() * multiplier, out)


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 x * y + z rounded once (a fused multiply-add): the product of two float32 values is exact in
    float64, and its sum with z is too unless their exponents lie more than about 29 bits apart (a ratio far
    from 1); then it is rounded twice, which differs from one rounding only if the float64 sum lands exactly
    halfway between two float32 values (about 2^-29 of such elements)."""
    return (x.double() * y.double() + z.double()).float()


class QLinearAdd(nn.Module):
    """A residual add of two quantized tensors and its output quantizer as ONNX Runtime's QLinearAdd computes
    them (see the module's docstring); ``a`` is the ONNX Add's first input (the fx node's first argument)."""

    def __init__(self, a: ActQuantizer, b: ActQuantizer, out: ActQuantizer):
        super().__init__()
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "out", out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa, qb, out = self.a, self.b, self.out
        ra, rb = qa.scale.float() / out.scale.float(), qb.scale.float() / out.scale.float()
        za, zb, zy = (_uint8_zero(q) for q in (qa, qb, out))
        k = zy - _fma(ra, za, rb * zb)
        # the raw (uint8) integers q = x / scale + zero (x is exactly on its grid)
        ia = torch.round(a / qa.scale.double()).float() + za
        ib = torch.round(b / qb.scale.double()).float() + zb
        v = _fma(ia, ra, _fma(ib, rb, k.expand_as(ib)))
        return (torch.clamp(torch.round(v), 0, 255) - zy).double() * out.scale.double()


class QLinearGlobalAveragePool(nn.Module):
    """A global average pool between two uint8 quantizers as ONNX Runtime's QLinearGlobalAveragePool."""

    def __init__(self, inp: ActQuantizer, out: ActQuantizer):
        super().__init__()
        object.__setattr__(self, "inp", inp)
        object.__setattr__(self, "out", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.round(x / self.inp.scale.double()).sum((2, 3), keepdim=True)  # exact int32 sum of q - zero
        size = torch.tensor(float(x.shape[2] * x.shape[3]), dtype=torch.float32)
        multiplier = self.inp.scale.float() / (self.out.scale.float() * size)
        return _requantize(acc.float() * multiplier, self.out)


class QLinearAveragePool(nn.Module):
    """An average pool (no padding) between two uint8 quantizers as ONNX Runtime's QLinearAveragePool."""

    def __init__(self, pool: nn.AvgPool2d, inp: ActQuantizer, out: ActQuantizer):
        super().__init__()
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "inp", inp)
        object.__setattr__(self, "out", out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = _pair(self.pool.kernel_size)
        sh, sw = _pair(self.pool.stride if self.pool.stride is not None else self.pool.kernel_size)
        oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
        inp, out = self.inp, self.out
        values = torch.round(x / inp.scale.double()).float() * inp.scale.float()  # DequantizeLinear, float32
        total = torch.zeros(x.shape[0], x.shape[1], oh, ow, dtype=torch.float32)
        for i in range(kh):  # float32 sums in the kernel's order
            for j in range(kw):
                total = total + values[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        zy = _uint8_zero(out)
        v = (total / float(kh * kw)) / out.scale.float() + zy
        return (torch.clamp(torch.round(v), 0, 255) - zy).double() * out.scale.double()


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _global_pool(m: nn.Module | None) -> bool:
    return isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1)


def _plain_avg_pool(m: nn.Module | None) -> bool:
    return isinstance(m, nn.AvgPool2d) and _pair(m.padding) == (0, 0) and not m.ceil_mode and m.divisor_override is None


def imitate_onnxruntime(gm: nn.Module, int8_convs: set[nn.Module]) -> int:
    """Rewrite the float64 simulation ``gm`` in place to compute as ONNX Runtime: every conv, residual add and
    average pool that ONNX Runtime fuses into QLinearConv / QLinearAdd / QLinear(Global)AveragePool becomes one
    of the modules above (feeding the same output quantizer, so hooks on quantizers see the same calls), and
    every activation quantizer divides in float32. ``int8_convs``: the convs whose weights the file holds as
    8-bit integers (INT4 convs run in float). A model that is not a graph (a lone layer) only gets the
    division. Returns how many ops were rewritten."""
    for m in gm.modules():
        if isinstance(m, ActQuantizer):
            m.float32_division = True
        elif isinstance(m, ChannelAffine):
            m.float32 = True
    if not isinstance(gm, fx.GraphModule):
        return 0
    graph = gm.graph

    def module(n) -> nn.Module | None:
        return gm.get_submodule(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None

    def quantized(n) -> ActQuantizer | None:
        """The node's quantizer, if ONNX Runtime fuses it (uint8, or int8 that it turns into uint8 first)."""
        return module(n) if onnxruntime_fuses(gm, n) else None

    count = 0
    for n in list(graph.nodes):
        out = quantized(n)
        if out is None or not isinstance(n.args[0], fx.Node):
            continue
        src, relu = n.args[0], False
        if _is_relu(gm, src) and len(src.users) == 1:
            src, relu = src.args[0], True
        m = module(src)
        if len(src.users) != 1:
            continue
        if isinstance(m, QuantConv2d) and m in int8_convs and quantized(src.args[0]) and m.padding_mode == "zeros":
            new, args = QLinearConv(m, quantized(src.args[0]), out), (src.args[0],)
        elif (
            (type(m) is ResidualAdd or (src.op == "call_function" and src.target in (operator.add, torch.add)))
            and len(src.args) == 2
            and quantized(src.args[0])
            and quantized(src.args[1])
        ):
            relu = relu or (type(m) is ResidualAdd and m.act is not None)
            new, args = QLinearAdd(quantized(src.args[0]), quantized(src.args[1]), out), tuple(src.args)
        elif not relu and _global_pool(m) and quantized(src.args[0]):
            new, args = QLinearGlobalAveragePool(quantized(src.args[0]), out), (src.args[0],)
        elif not relu and _plain_avg_pool(m) and quantized(src.args[0]):
            new, args = QLinearAveragePool(m, quantized(src.args[0]), out), (src.args[0],)
        else:
            continue
        if relu and int(out.zero_point) != out.qrange[0]:
            continue  # ONNX Runtime keeps that ReLU in float and does not fuse
        name = f"onnxruntime_{type(new).__name__.lower()}_{count}"
        gm.add_module(name, new)
        with graph.inserting_before(n):
            n.args = (graph.call_module(name, args),) + tuple(n.args[1:])
        count += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return count
