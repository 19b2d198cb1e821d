"""Fake-quantization modules: the INT8 arithmetic simulated in torch, exported as QuantizeLinear /
DequantizeLinear.

torch's fake-quant ops export to Q/DQ only for the integer ranges (0, 255), (-128, 127) and (0, 127),
so symmetric "narrow range" quantization uses (-128, 127) with scale = amax / 127 (the values never
reach -128), and 7-bit weights (reduce_range) use scale = amax / 63.

Quantization-aware training fine-tunes this same simulation: the fake-quant ops pass gradients straight
through inside the range (the straight-through estimator). With learnable scales (LSQ, Esser et al.
2020) the scales become parameters for the fine-tuning and turn back into buffers before export, so
the exported graph is the PTQ graph with other numbers in it.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.quant.calibrators import HistogramCalibrator


def lsq_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """Fake quantization whose scale gets the LSQ gradient (Esser et al. 2020, "Learned Step Size
    Quantization"); the forward value equals torch's fake-quant op (both round half to even).

    The scale's gradient is scaled by 1 / sqrt(elements per scale * qmax) as LSQ prescribes, so that
    scales and weights learn at comparable rates under one learning rate. The step is the scale's absolute
    value (at least SCALE_FLOOR), what ``learn_scale(False)`` keeps for export: a scale that SGD pushes
    through zero (channels whose weights decay to nothing: 457 of the flagship's 4-bit weight scales in one
    epoch) computes the same in training and in the file.
    """
    scale = quant_step(scale)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    per_scale = x.numel() / max(scale.numel(), 1)
    g = 1.0 / math.sqrt(per_scale * max(qmax, 1))
    s = scale * g + (scale - scale * g).detach()  # value of scale, gradient times g
    s = s.reshape(shape) if axis is not None else s
    zp = zero_point.reshape(shape).to(x.dtype) if axis is not None else zero_point.to(x.dtype)
    v = x / s + zp
    q = v + (torch.round(v) - v).detach()  # round with a straight-through gradient
    return (torch.clamp(q, qmin, qmax) - zp) * s


TIE_WINDOW = 1e-4  # weight quotients this close to a tie are divided again in float64 (integer_weight)
SCALE_FLOOR = 1e-12  # the smallest quantization step kept (an all-zero weight channel has this scale)


def quant_step(scale: torch.Tensor) -> torch.Tensor:
    """The quantization step a (possibly learned) scale stands for: its absolute value, at least SCALE_FLOOR."""
    return scale.abs().clamp(min=SCALE_FLOOR)


def _to_parameter(module: nn.Module, name: str) -> None:
    value = module._buffers.pop(name)
    module.register_parameter(name, nn.Parameter(value.detach().clone()))


def _to_buffer(module: nn.Module, name: str) -> None:
    value = module._parameters.pop(name)
    module.register_buffer(name, value.detach().clone())


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: observes in calibration mode, fake-quantizes afterwards.

    ``scheme``: ``u8`` asymmetric U8 with a zero point (ONNX Runtime CPU); ``s8`` symmetric S8 with zero
    point 0 (TensorRT); ``sym`` symmetric with zero point 0, U8 where calibration saw no negative value
    (after a ReLU) and S8 elsewhere (OpenVINO's CPU rules, as NNCF places them for it).
    """

    SCHEMES = ("u8", "s8", "sym")
    # OpenVINO's CPU plugin fuses conv -> Q/DQ -> residual add -> (ReLU) -> Q/DQ into one convolution and
    # applies the first Q/DQ there as a clip without rounding, while the add's output quantizer is active
    # (placement.py: _set_clip_only). ``clip_only_while`` is that output quantizer; the exported file keeps
    # the Q/DQ pair either way.
    clip_only_while: ActQuantizer | None = None
    # The float64 simulation of a file that ONNX Runtime runs divides in float32, as its QuantizeLinear does
    # (quant/mlas.py sets it on the simulation's copy).
    float32_division: bool = False

    def __init__(self, scheme: str = "u8"):
        super().__init__()
        if scheme not in self.SCHEMES:
            raise ValueError(f"unknown activation scheme {scheme!r}; expected one of {self.SCHEMES}")
        self.scheme = scheme
        self.register_buffer("scale", torch.ones(()))  # 0-d: ORT fuses QLinearAdd only for scalar qparams
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        # U8 or S8: fixed by the scheme, or (sym) set by calibration; a buffer, so saved with the scales.
        self.register_buffer("unsigned", torch.tensor(scheme == "u8"))
        self.mode = "off"  # off | calibrate | quantize
        self.calibrator: HistogramCalibrator | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        return (0, 255) if bool(self.unsigned) else (-128, 127)

    def clip_only_before(self, output_quant: ActQuantizer) -> None:
        # a plain attribute, not a submodule: the other quantizer belongs to the graph
        object.__setattr__(self, "clip_only_while", output_quant)

    @property
    def rounds(self) -> bool:
        """False where the target runtime clips without rounding (see ``clip_only_while``)."""
        return self.clip_only_while is None or self.clip_only_while.mode != "quantize"

    def start_calibration(self) -> None:
        self.calibrator = HistogramCalibrator()
        self.mode = "calibrate"

    def finish_calibration(self, method: str, percentile: float) -> tuple[float, float]:
        assert self.calibrator is not None
        if self.scheme == "sym":
            self.unsigned.fill_(self.calibrator.min >= 0.0)
        unsigned = bool(self.unsigned)
        symmetric = self.scheme == "s8" or (self.scheme == "sym" and not unsigned)
        lo, hi = self.calibrator.range(
            method, symmetric=symmetric, percentile=percentile, levels=255 if unsigned else 254
        )
        self.set_range(lo, hi)
        self.calibrator = None
        self.mode = "quantize"
        return lo, hi

    def set_range(self, lo: float, hi: float) -> None:
        if self.scheme == "u8":
            scale = (hi - lo) / 255.0
            zp = int(round(-lo / scale))
            zp = min(max(zp, 0), 255)
        elif bool(self.unsigned):  # sym on a non-negative tensor: [0, hi] over 0..255
            scale = hi / 255.0
            zp = 0
        else:
            scale = max(abs(lo), abs(hi)) / 127.0
            zp = 0
        self.scale.fill_(max(scale, 1e-12))
        self.zero_point.fill_(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self.calibrator.observe(x)
            return x
        if self.mode == "quantize":
            qmin, qmax = self.qrange
            if not self.rounds and not torch.onnx.is_in_onnx_export():
                zp = self.zero_point.to(x.dtype)
                step = quant_step(self.scale)  # as lsq_fake_quant when the scale is learned
                return torch.clamp(x, (qmin - zp) * step, (qmax - zp) * step)
            if isinstance(self.scale, nn.Parameter) and self.training:
                return lsq_fake_quant(x, self.scale, self.zero_point, qmin, qmax)
            if x.dtype == torch.float64:  # exact_simulation: torch's op takes float32 only
                zp = self.zero_point.to(x.dtype)
                if self.float32_division:  # as ONNX Runtime's QuantizeLinear (quant/mlas.py)
                    v = (x.float() / self.scale.float()).double()
                else:
                    v = x / self.scale.to(x.dtype)
                return (torch.clamp(torch.round(v) + zp, qmin, qmax) - zp) * self.scale
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax)
        return x

    def learn_scale(self, learn: bool) -> None:
        """Make the scale a trained parameter (QAT with LSQ) or a buffer again (for export and saving)."""
        if learn and not isinstance(self.scale, nn.Parameter):
            _to_parameter(self, "scale")
        elif not learn and isinstance(self.scale, nn.Parameter):
            self.scale.data = quant_step(self.scale.data)  # the step lsq_fake_quant used
            _to_buffer(self, "scale")

    def extra_repr(self) -> str:
        kind = {"u8": "u8 asymmetric", "s8": "s8 symmetric"}.get(self.scheme) or (
            f"{'u8' if bool(self.unsigned) else 's8'} symmetric"
        )
        clip = "" if self.rounds else ", clip only (no rounding)"
        return f"{kind}, mode={self.mode}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}{clip}"


@contextlib.contextmanager
def rounding_everywhere(quantizers: list[ActQuantizer]):
    """Every quantizer rounds inside the block, also those the target runtime applies as a clip only: for a
    file whose quantizer outputs are all exposed (fidelity taps), where no runtime fuses across one."""
    partners = {q: q.clip_only_while for q in quantizers}
    try:
        for q in quantizers:
            object.__setattr__(q, "clip_only_while", None)
        yield
    finally:
        for q, partner in partners.items():
            object.__setattr__(q, "clip_only_while", partner)


SIMULATION_ARITHMETIC = {None: "float64", "onnxruntime": "float64 with ONNX Runtime's requantization"}

# float32 holds every integer of magnitude up to 2^24 exactly; a sum of such integers whose every partial sum
# stays within it is exact whatever the order of the additions.
FLOAT32_INTEGERS = 2**24
DIGIT = 16  # the conv input's integers are split into base-16 digits for the float32 conv


def _float32_conv(x: torch.Tensor, w: torch.Tensor, *args) -> torch.Tensor:
    """F.conv2d in float32 without NNPACK, which torch picks for batches of 16 or more where oneDNN is off or
    missing, and whose Winograd and FFT kernels do not sum integers exactly."""
    with torch.backends.nnpack.flags(enabled=False):
        return F.conv2d(x.float(), w.float(), None, *args)


@functools.lru_cache(maxsize=8)
def _float32_conv_exact(settings: tuple) -> bool:
    """Whether this torch sums a float32 conv of small integers exactly (no accumulation in reduced precision, no
    Winograd or FFT transforms): checked once per setting that picks the kernels (``settings``: the float32
    precision, whether oneDNN is on), on a 3x3 and a 1x1 conv of a batch of 32 whose sums reach 2^23
    (``integer_conv2d`` stays below 2^24)."""
    del settings  # the cache key
    g = torch.Generator().manual_seed(0)
    for cin, k in ((512, 3), (4096, 1)):
        x = torch.randint(-DIGIT, DIGIT, (32, cin, 6, 6), generator=g).double()
        w = torch.randint(-128, 128, (16, cin, k, k), generator=g).double()
        x[0], w[0] = -DIGIT, -128  # output channel 0 of image 0: sums of the largest terms, all of one sign
        exact = F.conv2d(x, w, padding=k // 2)
        if not torch.equal(_float32_conv(x, w, 1, k // 2).double(), exact):
            return False
    return True


def digits_fit_float32(nmax: float, wmax: float, k: int) -> bool:
    """Whether a conv of integers up to ``nmax`` (at most 256) split into base-16 digits, with integer weights up
    to ``wmax`` and ``k`` inputs per output, keeps every float32 partial sum below 2^24 (``integer_conv2d``)."""
    largest_digit = max(math.floor(nmax / DIGIT) + 1, DIGIT - 1)
    return nmax <= 256 and largest_digit * wmax * k < FLOAT32_INTEGERS


def integer_conv2d(n: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The exact integer sums of the conv of the integers ``n`` (float64, |n| <= 256: 8-bit activations less
    their zero point) with the integer weights ``w``, as float64: what the runtimes' int32 accumulators hold.

    torch has no fast float64 conv on the CPU (ResNet-50's 53 convs: 1.14 s for 64 images at 32 px on one
    core, against 0.32 s this way); its float32 conv sums integers exactly while every partial sum stays below
    2^24, so ``n`` is split into base-16 digits (``n = 16 * hi + lo``, ``lo`` in 0..15, ``|hi| <= 16``), both
    convolved in one float32 call and joined in float64. Where the bound does not hold (about 8,000 or more
    inputs per output at 8 bits) or this torch's float32 conv is not exact, the conv runs in float64."""
    nmax = float(n.abs().amax()) if n.numel() else 0.0
    wmax = float(w.abs().amax()) if w.numel() else 0.0
    settings = (torch.get_float32_matmul_precision(), torch.backends.mkldnn.enabled)
    if not digits_fit_float32(nmax, wmax, w[0].numel()) or not _float32_conv_exact(settings):
        return F.conv2d(n, w.double(), None, stride, padding, dilation, groups)
    lo = torch.remainder(n, DIGIT)
    hi = (n - lo) / DIGIT  # exact: n - lo is a multiple of 16
    y = _float32_conv(torch.cat([hi, lo]), w, stride, padding, dilation, groups).double()
    b = n.shape[0]
    return y[:b] * DIGIT + y[b:]


def exact_simulation(qmodel: nn.Module, runtime: str | None = None) -> nn.Module:
    """A float64 copy of the simulation, for evaluating it against the deployed file (call it on float64 input).

    The runtimes sum a convolution's integer products exactly (int32 accumulators); the float32 simulation
    rounds its sums, so a value near a rounding boundary of the next quantizer lands on the other step now
    and then, and such differences grow along the depth (the flagship ResNet-50's float32 simulation agreed
    with its deployed files on 99.72-99.76 % of the held-out split). In float64 each product of an 8-bit
    integer times its float32 scale is exact and a conv's sum is within about 1e-13 of its value relative
    to its terms, far inside one step, so what is left are ties and the runtime's own float32
    requantization. The weights are the simulation's integers (``integer_weight``, the file's) times their
    step, a live BN folded first; biases, where the simulation puts them on their int32 grid, are the
    integers ONNX Runtime computes in float32 (``bias_step``) times the step; activation quantizers round in
    float64.

    ``runtime="onnxruntime"``: the copy also computes the float32 steps of ONNX Runtime's fused kernels
    (QLinearConv's, QLinearAdd's and its average pools' requantization, QuantizeLinear's division;
    quant/mlas.py), so that it agrees with a file ONNX Runtime runs element for element.
    ``exact.simulation_arithmetic`` says which."""
    import copy

    asked = runtime
    if runtime not in SIMULATION_ARITHMETIC:
        runtime = None  # other runtimes: the plain float64 simulation
    if getattr(qmodel, "is_exact_simulation", False):
        if qmodel.simulates != runtime:
            raise ValueError(
                f"this float64 simulation imitates {qmodel.simulates or 'no runtime'}; {asked or 'no runtime'} "
                "needs its own copy (exact_simulation of the simulation itself)"
            )
        return qmodel  # already the float64 copy: the stage builds it once per target and passes it on
    exact = copy.deepcopy(qmodel).eval()
    fold_live_bn(exact)
    baked: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
    int8_convs: set[nn.Module] = set()  # convs whose integers the runtime multiplies (INT4 ones run in float)
    with torch.no_grad():
        for m in exact.modules():
            if not isinstance(m, _WeightQuant):
                continue
            w = m.weight.double()
            if m.quantize_weight:  # integers x step: exact in float64
                q, step = m.integer_weight()
                w = q.double() * step.double()
                if isinstance(m, QuantConv2d) and m.bits > 4:
                    int8_convs.add(m)
                    object.__setattr__(m, "integer_weights", (q, step.double().reshape(-1)))
            b = None if m.bias is None else m.bias.double()
            if isinstance(m, QuantConv2d) and b is not None and m._integer_bias():
                step = m.bias_step()  # the integers as ONNX Runtime computes them (float32), times the step
                b = torch.round(m.bias.float() / step).double() * step.double()
            baked[m] = (w, b)
    exact.double()
    for m, (w, b) in baked.items():
        m.weight.data = w
        if b is not None:
            m.bias.data = b
        m.quantize_weight = False
        if isinstance(m, QuantConv2d):
            object.__setattr__(m, "bias_grid", None)
    _learn_integer_inputs(exact, int8_convs)
    if runtime == "onnxruntime":
        from deploycraft.quant.mlas import imitate_onnxruntime

        imitate_onnxruntime(exact, int8_convs)
    exact.is_exact_simulation = True
    exact.simulates = runtime
    exact.simulation_arithmetic = SIMULATION_ARITHMETIC[runtime]
    return exact


def _learn_integer_inputs(exact: nn.Module, int8_convs: set[nn.Module]) -> None:
    """Each INT8 conv of the float64 copy ``exact`` that reads an activation quantizer's output directly (and
    is called once) learns that quantizer: it then sums its integer products exactly and fast
    (``QuantConv2d.integer_forward``). A model that is not a graph keeps the plain float64 conv."""
    graph = getattr(exact, "graph", None)
    if graph is None:
        return
    calls: dict[nn.Module, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(exact.get_submodule(node.target), []).append(node)
    for m in int8_convs:
        nodes = calls.get(m, [])
        if len(nodes) != 1 or m.padding_mode != "zeros" or not nodes[0].args:
            continue
        src = nodes[0].args[0]
        q = exact.get_submodule(src.target) if getattr(src, "op", None) == "call_module" else None
        if isinstance(q, ActQuantizer):
            object.__setattr__(m, "integer_input", q)


def weight_levels(bits: int, reduce_range: bool) -> int:
    """Largest integer of symmetric ``bits``-bit weights: 127 for 8 bits (63 with reduce_range), 7 for 4."""
    return 63 if reduce_range and bits == 8 else 2 ** (bits - 1) - 1


def weight_scales(w: torch.Tensor, per_channel: bool, reduce_range: bool, bits: int = 8) -> torch.Tensor:
    levels = float(weight_levels(bits, reduce_range))
    if per_channel:
        amax = w.detach().abs().flatten(1).amax(1)
    else:
        amax = w.detach().abs().amax().reshape(1)
    return (amax / levels).clamp(min=1e-12)


class _WeightQuant:
    """Mixin: symmetric weights of ``bits`` bits (2-8), per output channel (axis 0) or per tensor, scales
    from the max.

    Weights below 8 bits have scale = amax / (2^(b-1) - 1) and integers in [-2^(b-1), 2^(b-1) - 1]
    ([-8, 7] at 4 bits, what ONNX INT4 holds). torch exports fake-quant only for 8-bit ranges, so they
    export as INT8 Q/DQ (``narrow_for_export``: the weight is replaced by its fake-quantized value, whose
    integers the INT8 quantizer reproduces exactly) and onnx_io narrows those initializers to INT4.
    """

    per_channel: bool
    reduce_range: bool
    bits: int
    weight: nn.Parameter

    def _init_quant(self, per_channel: bool, reduce_range: bool, bits: int = 8) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be 2..8, got {bits}")
        self.per_channel, self.reduce_range, self.bits = per_channel, reduce_range, bits
        scales = weight_scales(self.weight, per_channel, reduce_range, bits)
        self.register_buffer("weight_scale", scales)
        self.register_buffer("weight_zero_point", torch.zeros_like(scales, dtype=torch.int32))
        self.quantize_weight = True
        self.export_weights = False

    def set_bits(self, bits: int) -> None:
        """Requantize the weights at ``bits`` (scales from the max again): fallback to 8 bits keeps a layer
        integer where the rest of the model has fewer bits."""
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be 2..8, got {bits}")
        self.bits = bits
        with torch.no_grad():
            self.weight_scale.copy_(weight_scales(self.weight, self.per_channel, self.reduce_range, bits))

    @property
    def weight_qrange(self) -> tuple[int, int]:
        if self.bits == 8 or self.export_weights:
            return -128, 127
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def learn_scale(self, learn: bool) -> None:
        """Make the weight scales trained parameters (QAT with LSQ) or buffers again."""
        if learn and not isinstance(self.weight_scale, nn.Parameter):
            _to_parameter(self, "weight_scale")
        elif not learn and isinstance(self.weight_scale, nn.Parameter):
            self.weight_scale.data = quant_step(self.weight_scale.data)  # as lsq_fake_quant
            _to_buffer(self, "weight_scale")

    def qweight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight (``w``: another weight on this layer's grid, the BN-folded one of a live BN)."""
        w = self.weight if w is None else w
        if not self.quantize_weight:
            return w
        qmin, qmax = self.weight_qrange
        scale, zp = self.weight_scale, self.weight_zero_point
        if isinstance(scale, nn.Parameter) and self.training:
            return lsq_fake_quant(w, scale, zp, qmin, qmax, axis=0 if self.per_channel else None)
        return self._fake(w, scale, zp, qmin, qmax)

    def narrow_for_export(self) -> None:
        """Replace a below-8-bit weight by its fake-quantized value and export it with the INT8 range."""
        if self.bits < 8 and not self.export_weights:
            q, step = self.integer_weight()
            with torch.no_grad():  # integer x step, rounded once: the INT8 quantizer gets the integers back
                self.weight.copy_((q.double() * step.double()).float())
            self.export_weights = True

    def integer_weight(self, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's integers (clamped, zero point removed) and the step, both float32.

        The integers are round(w / step) of the float32 weight divided exactly, as the exporter computes the
        file's (onnx_io.fold_weight_quantizers divides in float64, ONNX QuantizeLinear's division); torch's
        float32 fake-quant multiplies by the reciprocal instead and puts a few weights in 10^6 (37 of the
        flagship ResNet-50's 23.5 M) on the neighbouring integer. Divided in float32 (at most 128 x 2^-24
        from the exact quotient) and, where that lies within TIE_WINDOW of a tie, again in float64."""
        w = (self.weight if w is None else w).detach()
        shape = (-1,) + (1,) * (w.dim() - 1) if self.per_channel else (1,) * w.dim()
        step = quant_step(self.weight_scale.detach()).reshape(shape)
        v = w / step
        raw = torch.round(v)
        near = ((v - raw).abs_().sub_(0.5).abs_()) < TIE_WINDOW
        if bool(near.any()):
            raw[near] = torch.round(w[near].double() / step.expand_as(w)[near].double()).to(raw.dtype)
        zp = self.weight_zero_point.reshape(shape).to(w.dtype)
        lo, hi = self.weight_qrange
        return torch.clamp(raw + zp, lo, hi) - zp, step

    def _fake(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        # Training (QAT's forward, torch's fused op and its straight-through gradient) and export (as
        # QuantizeLinear / DequantizeLinear) use torch's op; evaluation takes the file's integers exactly.
        if self.training or torch.onnx.is_in_onnx_export() or torch.is_grad_enabled() and w.requires_grad:
            if self.per_channel:
                return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
            return torch.fake_quantize_per_tensor_affine(w, scale, zp, qmin, qmax)
        q, step = self.integer_weight(w)
        return q * step  # integer x step, rounded once to float32 as torch's op rounds it


class QuantConv2d(nn.Conv2d, _WeightQuant):
    """A conv with quantized weights. Where ONNX Runtime will run it as QLinearConv (placement sets
    ``bias_grid`` to its input and output quantizers), the simulation also rounds the bias to the int32
    grid QLinearConv keeps it on, input scale x weight scale, as ONNX Runtime does when it fuses the file
    (the file itself holds the float bias):
    without that the simulation and the deployed file differ by a fraction of a step in every such conv,
    and the differences grow along the depth (ResNet-50: top-1 agreement 99.28 % before, 99.73 % after)."""

    bias_grid: tuple[ActQuantizer, ActQuantizer] | None = None
    # Set on the float64 copy only (exact_simulation): the quantizer this conv reads and its integer weights
    # (float32) and steps (float64, per output channel), for ``integer_forward``.
    integer_input: ActQuantizer | None = None
    integer_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_bias_grid(self, input_quant: ActQuantizer, output_quant: ActQuantizer) -> None:
        # a plain attribute, not submodules: the quantizers belong to the graph, not to this conv
        object.__setattr__(self, "bias_grid", (input_quant, output_quant))

    def _integer_bias(self) -> bool:
        if self.bias is None or self.bias_grid is None or not self.quantize_weight or self.bits <= 4:
            return False  # INT4 convs run in float in ONNX Runtime, with a float bias
        return all(q.mode == "quantize" for q in self.bias_grid)

    def qbias(self, b: torch.Tensor | None = None) -> torch.Tensor | None:
        # The exported file keeps the float bias: ONNX Runtime rounds it to the same integers when it fuses
        # the conv (and a named initializer stays named).
        b = self.bias if b is None else b
        if torch.onnx.is_in_onnx_export() or not self._integer_bias():
            return b
        step = self.bias_step().to(b.dtype)
        return b + (torch.round(b / step) * step - b).detach()

    def bias_step(self) -> torch.Tensor:
        """The int32 grid of the bias: input scale x weight scale, in float32 as ONNX Runtime's
        BiasQuantization computes it (Mul of the scales, Div, Round, in float32)."""
        return (self.bias_grid[0].scale.detach().float() * self.weight_scale.detach().float()).clamp(min=1e-30)

    # |bias / bias_step| is kept at or below this: an int32, with room left for the accumulator added to it.
    BIAS_INT_LIMIT = 2.0**30

    def fit_bias_to_int32(self) -> list[int]:
        """Raise the weight scale of each output channel whose bias would not fit QLinearConv's int32 bias, and
        return those channels.

        A channel whose weights are all but zero (a BN whose gamma decayed to nothing, folded in: weight
        scale 1e-10, bias 0.01) has a bias of billions of input x weight steps; ONNX Runtime's float-to-int32
        cast then saturates or wraps and that channel of the deployed file computes garbage (measured: a
        ResNet-20 after one epoch, one channel of ``layer3.0.conv2`` up to 61 steps off). With the scale raised
        to ``|bias| / (input scale x 2^30)`` the channel's weights take coarser steps (that run's channel: 26
        levels left of 127; none where the weights are 1e-9 of the bias), which costs nothing in a channel whose
        output is its bias, and the bias stays exact (ONNX Runtime's own quantizer adjusts weight scales for
        int32 biases the same way). Only where the bias is on the int32 grid (``bias_grid``: ONNX Runtime fuses
        the conv)."""
        if not self._integer_bias():
            return []
        with torch.no_grad():
            need = self.bias.detach().abs().float() / (self.bias_grid[0].scale.detach().float() * self.BIAS_INT_LIMIT)
            if self.weight_scale.numel() == 1:
                need = need.max().reshape(1)
            step = quant_step(self.weight_scale.detach())
            low = step < need
            if bool(low.any()):
                self.weight_scale.data.copy_(torch.where(low, need, step).to(self.weight_scale.dtype))
        if low.numel() == 1:  # one scale for the whole layer: -1 stands for all its channels
            return [-1] if bool(low.any()) else []
        return low.nonzero().flatten().tolist()

    # --- QAT with the BatchNorm trained, folded at the end (qat.bn_fold: after) -------------------------------
    # The conv holds the unfolded weight and bias and its BN as the submodule ``live_bn``. In training it
    # computes as torch's quantized ConvBn does (Jacob et al. 2018, Krishnamoorthi 2018): the weight is folded
    # with the BN's *running* std and quantized, the conv's output is divided by that fold factor again and
    # normalized with the batch's statistics (which also update the running ones); the bias is not on the
    # int32 grid there (BN's batch mean removes it). In eval it is the folded conv, running statistics folded
    # into weight and bias (bias rounded as always), which is what ``fold_live_bn`` writes at the end: the
    # file holds exactly the simulation that was evaluated.

    def attach_bn(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        """Unfold: this conv's weight and bias become ``conv``'s and ``bn`` (a copy) follows it, live. A BN
        without affine parameters gets them (1 and 0: the same function), so that they can train."""
        if conv.weight.shape != self.weight.shape or bn.num_features != self.out_channels:
            raise ValueError(f"conv {tuple(conv.weight.shape)} / BN {bn.num_features} do not match {self}")
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            self.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(self.bias))
        live = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum if bn.momentum is not None else 0.1)
        live.load_state_dict(bn.state_dict(), strict=False)  # affine=False: weight 1, bias 0 stay
        live.momentum = bn.momentum  # None: a cumulative average, as the model had it
        self.live_bn = live.to(self.weight.device)
        self.live_bn.train(self.training)

    def _bn_factor(self) -> torch.Tensor:
        bn = self._modules["live_bn"]
        return bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with the live BN's running statistics folded in."""
        bn, s = self._modules["live_bn"], self._bn_factor()
        return self.weight * s.view(-1, 1, 1, 1), (self.bias - bn.running_mean) * s + bn.bias

    def absorb_bn(self) -> None:
        """Fold the live BN into weight and bias (the same float32 arithmetic as the eval forward) and drop it."""
        with torch.no_grad():
            w, b = self.folded()
            self.weight.copy_(w)
            self.bias.copy_(b)
        del self._modules["live_bn"]

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, per_channel: bool = True, reduce_range: bool = False, bits: int = 8
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        q.load_state_dict(conv.state_dict())
        q._init_quant(per_channel, reduce_range, bits)
        return q

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The float64 copy's conv from the integers of its input: their exact sums (``integer_conv2d``)
        times input step x weight step, plus the bias. None where the input is not on its quantizer's grid (a
        quantizer that clips without rounding, or off): the plain float64 conv computes those."""
        inp, (q, step) = self.integer_input, self.integer_weights
        if inp.mode != "quantize" or not inp.rounds:
            return None
        s = inp.scale.double()
        n = x / s  # (q - zero point) x step divided by the step: the integers again, exactly
        if not torch.equal(n, torch.round(n)):
            return None
        y = integer_conv2d(n, q, self.stride, self.padding, self.dilation, self.groups)
        y = y * (s * step).reshape(1, -1, 1, 1)  # two float32 factors: their product is exact in float64
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self._modules.get("live_bn")
        if bn is None:
            if self.integer_input is not None and x.dtype == torch.float64:
                y = self.integer_forward(x)
                if y is not None:
                    return y
            return self._conv_forward(x, self.qweight(), self.qbias())
        if not self.training:
            w, b = self.folded()
            return self._conv_forward(x, self.qweight(w), self.qbias(b))
        s = self._bn_factor()
        y = self._conv_forward(x, self.qweight(self.weight * s.view(-1, 1, 1, 1)), None)
        s = torch.where(s == 0, torch.ones_like(s), s)  # a zero gamma: the quantized weight is 0, so is y
        return bn(y / s.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1))


def fold_live_bn(qmodel: nn.Module) -> int:
    """Fold every live BN (``attach_live_bn``) into its conv; returns how many."""
    convs = [m for m in qmodel.modules() if isinstance(m, QuantConv2d) and m._modules.get("live_bn") is not None]
    for m in convs:
        m.absorb_bn()
    return len(convs)


class QuantLinear(nn.Linear, _WeightQuant):
    @classmethod
    def from_float(
        cls, fc: nn.Linear, per_channel: bool = True, reduce_range: bool = False, bits: int = 8
    ) -> QuantLinear:
        q = cls(fc.in_features, fc.out_features, bias=fc.bias is not None)
        q.load_state_dict(fc.state_dict())
        q._init_quant(per_channel, reduce_range, bits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight(), self.bias)
