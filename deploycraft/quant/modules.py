"""Fake-quantization modules: the INT8 arithmetic simulated in torch, exported as QuantizeLinear /
DequantizeLinear.

torch's fake-quant ops export to Q/DQ only for the integer ranges (0, 255), (-128, 127) and (0, 127),
so symmetric "narrow range" quantization uses (-128, 127) with scale = amax / 127 (the values never
reach -128), and 7-bit weights (reduce_range) use scale = amax / 63.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft.quant.calibrators import HistogramCalibrator


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: observes in calibration mode, fake-quantizes afterwards.

    ``scheme``: ``u8`` asymmetric U8 with a zero point (ONNX Runtime CPU); ``s8`` symmetric S8 with zero
    point 0 (TensorRT); ``sym`` symmetric with zero point 0, U8 where calibration saw no negative value
    (after a ReLU) and S8 elsewhere (OpenVINO's CPU rules, as NNCF places them for it).
    """

    SCHEMES = ("u8", "s8", "sym")

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
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax)
        return x

    def extra_repr(self) -> str:
        kind = {"u8": "u8 asymmetric", "s8": "s8 symmetric"}.get(self.scheme) or (
            f"{'u8' if bool(self.unsigned) else 's8'} symmetric"
        )
        return f"{kind}, mode={self.mode}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


def weight_scales(w: torch.Tensor, per_channel: bool, reduce_range: bool) -> torch.Tensor:
    levels = 63.0 if reduce_range else 127.0
    if per_channel:
        amax = w.detach().abs().flatten(1).amax(1)
    else:
        amax = w.detach().abs().amax().reshape(1)
    return (amax / levels).clamp(min=1e-12)


class _WeightQuant:
    """Mixin: symmetric S8 weights, per output channel (axis 0) or per tensor, scales from the max."""

    per_channel: bool
    reduce_range: bool
    weight: nn.Parameter

    def _init_quant(self, per_channel: bool, reduce_range: bool) -> None:
        self.per_channel, self.reduce_range = per_channel, reduce_range
        scales = weight_scales(self.weight, per_channel, reduce_range)
        self.register_buffer("weight_scale", scales)
        self.register_buffer("weight_zero_point", torch.zeros_like(scales, dtype=torch.int32))
        self.quantize_weight = True

    def qweight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.weight
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                self.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127
            )
        return torch.fake_quantize_per_tensor_affine(self.weight, self.weight_scale, self.weight_zero_point, -128, 127)


class QuantConv2d(nn.Conv2d, _WeightQuant):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, per_channel: bool = True, reduce_range: bool = False) -> QuantConv2d:
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
        q._init_quant(per_channel, reduce_range)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qweight(), self.bias)


class QuantLinear(nn.Linear, _WeightQuant):
    @classmethod
    def from_float(cls, fc: nn.Linear, per_channel: bool = True, reduce_range: bool = False) -> QuantLinear:
        q = cls(fc.in_features, fc.out_features, bias=fc.bias is not None)
        q.load_state_dict(fc.state_dict())
        q._init_quant(per_channel, reduce_range)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight(), self.bias)
