"""The float64 simulation's convs from integers (modules.integer_conv2d, QuantConv2d.integer_forward): exact
integer sums computed in float32 digits, the same numbers as the plain float64 conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deploycraft.quant import modules
from deploycraft.quant.modules import QuantConv2d, digits_fit_float32, exact_simulation, integer_conv2d


@pytest.mark.parametrize(
    "cin, cout, k, stride, padding, dilation, groups",
    [
        (512, 64, 3, 1, 1, 1, 1),  # ResNet-50's largest 3x3 (4,608 inputs per output)
        (2048, 32, 1, 2, 0, 1, 1),  # a strided 1x1 with 2,048 inputs
        (64, 64, 3, 2, 1, 1, 8),  # grouped (ResNeXt)
        (32, 32, 3, 1, 2, 2, 32),  # depthwise, dilated
        (3, 16, 7, 2, 3, 1, 1),  # a stem
    ],
)
def test_integer_conv_is_the_exact_sum(cin, cout, k, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(cin + k)
    n = torch.randint(-255, 256, (3, cin, 9, 9), generator=g).double()
    n[0] = 255  # the extremes, all of one sign: the largest sums
    n[1, :, ::2] = -255
    w = torch.randint(-128, 128, (cout, cin // groups, k, k), generator=g).float()
    w[0] = 127
    w[0, 0] = 126  # an odd sum above 2^24 at output channel 0 of image 0 (K >= 1024): float32 cannot hold it
    w[1] = -128
    assert digits_fit_float32(255, 128, w[0].numel())
    got = integer_conv2d(n, w, stride, padding, dilation, groups)
    # float64 holds these sums (below 2^31) exactly whatever the order of the additions
    want = F.conv2d(n, w.double(), None, stride, padding, dilation, groups)
    assert got.dtype == torch.float64
    assert torch.equal(got, want)
    # and the float32 conv alone is not: the sums exceed 2^24 where the digits are not split
    if w[0].numel() >= 1024:
        assert not torch.equal(F.conv2d(n.float(), w, None, stride, padding, dilation, groups).double(), want)


def test_a_conv_too_wide_for_float32_digits_runs_in_float64(monkeypatch):
    assert not digits_fit_float32(255, 128, 8192) and digits_fit_float32(255, 127, 4608)
    assert not digits_fit_float32(300, 1, 1)  # not 8-bit integers
    calls = []
    real = F.conv2d

    def spy(x, *args, **kwargs):
        calls.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(modules.F, "conv2d", spy)
    g = torch.Generator().manual_seed(1)
    n = torch.randint(-255, 256, (2, 1024, 3, 3), generator=g).double()
    w = torch.randint(-128, 128, (4, 1024, 3, 3), generator=g).float()  # 9,216 inputs per output
    got = integer_conv2d(n, w, 1, 1, 1, 1)
    assert calls == [torch.float64]
    assert torch.equal(got, real(n, w.double(), None, 1, 1, 1, 1))
    calls.clear()
    integer_conv2d(n[:, :256], w[:, :256], 1, 1, 1, 1)  # 2,304: the float32 digits
    assert calls == [torch.float32]


def test_the_float64_copy_reads_integers_and_computes_what_the_plain_float64_conv_does(tmp_path):
    from deploycraft.config import DataConfig
    from deploycraft.data import build_data
    from deploycraft.deployables import QuantSettings, build_deployable
    from deploycraft.models import create_model
    from tests.conftest import randomize_bn

    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=64, val_subset=64))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    randomize_bn(model)
    images, _ = data.calibration_images(64)
    x = data.sample_input(16).double()
    # the ONNX Runtime placement's float64 copy without the runtime's requantization (runtime None): plain convs
    for target, runtime in (("openvino-cpu", "openvino"), ("onnxruntime-cpu", None)):
        built = build_deployable(
            model, "int8", tmp_path / f"{target}.onnx", data.sample_input(2), target=target,
            settings=QuantSettings(), calibration=(images, data.spec), show=False,
        )  # fmt: skip
        exact = exact_simulation(built.module, runtime)
        convs = [m for m in exact.modules() if isinstance(m, QuantConv2d)]
        reading = [m for m in convs if m.integer_input is not None]
        # every conv of ResNet-20 reads a quantizer that rounds (OpenVINO: the block input; the shortcut 1x1s too)
        assert len(convs) == 21 and len(reading) == 21, (target, len(reading))
        with torch.no_grad():
            fast = exact(x)
            for m in reading:
                object.__setattr__(m, "integer_input", None)  # the plain float64 conv
            plain = exact(x)
        assert torch.equal(fast.argmax(1), plain.argmax(1))
        assert float((fast - plain).abs().max() / plain.abs().max()) < 1e-12, target


def test_an_input_off_the_grid_takes_the_plain_conv():
    conv = QuantConv2d.from_float(torch.nn.Conv2d(4, 4, 3, padding=1))
    q = modules.ActQuantizer("u8")
    q.set_range(0.0, 2.55)
    q.mode = "quantize"
    exact = exact_simulation(torch.nn.Sequential(q, conv))
    m = exact[1]
    assert m.integer_input is None  # not a graph: nothing to read the input quantizer from
    object.__setattr__(m, "integer_input", exact[0])
    on_grid = exact[0](torch.rand(2, 4, 5, 5).double() * 2.55)
    assert m.integer_forward(on_grid) is not None
    assert m.integer_forward(on_grid + 1e-3) is None  # not integers x step: the forward falls back
    with torch.no_grad():
        assert torch.allclose(m(on_grid + 1e-3), m._conv_forward(on_grid + 1e-3, m.weight, m.bias))


def test_exact_without_onednn_where_torch_would_take_nnpack():
    """With oneDNN off, torch runs float32 convs of 16 or more images through NNPACK (Winograd, FFT), whose
    sums of integers are not exact; integer_conv2d keeps NNPACK out (found by review: sums off by up to 28)."""
    g = torch.Generator().manual_seed(2)
    n = torch.randint(-255, 256, (32, 256, 8, 8), generator=g).double()
    w = torch.randint(-128, 128, (64, 256, 3, 3), generator=g).float()
    with torch.backends.mkldnn.flags(enabled=False):
        got = integer_conv2d(n, w, 1, 1, 1, 1)
    assert torch.equal(got, F.conv2d(n, w.double(), None, 1, 1, 1, 1))
