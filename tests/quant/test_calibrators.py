"""Histogram calibration: ranges match their definitions, whatever the batch order."""

from __future__ import annotations

import math

import pytest
import torch

from deploycraft.quant.calibrators import HistogramCalibrator
from deploycraft.quant.modules import ActQuantizer


def _calib(*batches) -> HistogramCalibrator:
    c = HistogramCalibrator()
    for b in batches:
        c.observe(b)
    return c


def test_max_is_exact_and_growth_keeps_counts():
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g) * 50
    c = _calib(small, big)
    assert c.range("max", symmetric=False) == (
        pytest.approx(float(torch.cat([small, big]).min())),
        pytest.approx(float(torch.cat([small, big]).max())),
    )
    assert c.hist.sum() == 20_000


def test_percentile_matches_quantile_within_a_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    x[:20] = 1000.0  # outliers the percentile calibrator should ignore
    c = _calib(x[:100_000], x[100_000:])
    lo, hi = c.range("percentile", symmetric=True, percentile=99.9)
    expected = float(torch.quantile(x.abs()[:100_000].double(), 0.999))  # subsample: torch.quantile size limit
    assert hi == -lo
    assert abs(hi - expected) < 0.05
    assert c.range("max", symmetric=True)[1] == pytest.approx(1000.0)


def test_mean_max_averages_each_batchs_extremes():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1_000, generator=g) * s for s in (1.0, 2.0, 3.0)]
    batches[1][7] = 100.0  # one outlier in one batch moves the range by a third of its excess only
    c = _calib(*batches)
    lo, hi = c.range("mean_max", symmetric=False)
    assert hi == pytest.approx(sum(float(b.max()) for b in batches) / 3)
    assert lo == pytest.approx(sum(float(b.min()) for b in batches) / 3)
    assert c.range("max", symmetric=False)[1] == pytest.approx(100.0)
    absmax = sum(float(b.abs().max()) for b in batches) / 3
    assert c.range("mean_max", symmetric=True) == (pytest.approx(-absmax), pytest.approx(absmax))
    # symmetric: each batch's largest |x| is averaged (NNCF's abs-max), not the signed extremes
    two = _calib(torch.tensor([-10.0, 1.0]), torch.tensor([-1.0, 10.0]))
    assert two.range("mean_max", symmetric=True) == (-10.0, 10.0)
    assert two.range("mean_max", symmetric=False) == (-5.5, 5.5)
    relu = _calib(*(torch.relu(b) for b in batches)).range("mean_max", symmetric=False)
    assert relu[0] == 0.0 and relu[1] == pytest.approx(hi)


def test_unsigned_percentile_after_relu_starts_at_zero():
    x = torch.relu(torch.randn(100_000, generator=torch.Generator().manual_seed(1)))
    lo, hi = _calib(x).range("percentile", symmetric=False, percentile=99.99)
    assert lo == 0.0 and 3.0 < hi < 4.5


def test_mse_clips_heavy_tails_but_not_uniform():
    g = torch.Generator().manual_seed(0)
    # Seeded Laplace(0, 1) by its inverse CDF (heavy tails); at 8 bits MSE clips to 0.60-0.78 of the
    # max over seeds 0-3 with a million samples (0.77-0.85 with 200k: too close to a bound).
    u = torch.rand(1_000_000, generator=g, dtype=torch.float64) - 0.5
    tailed = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    c = _calib(tailed)
    amax = c.range("mse", symmetric=True, levels=254)[1]
    assert amax < 0.85 * float(tailed.abs().max())
    uniform = torch.rand(200_000, generator=g) * 2 - 1
    amax_u = _calib(uniform).range("mse", symmetric=True, levels=254)[1]
    assert amax_u > 0.95


def test_quantizer_scale_and_zero_point():
    q = ActQuantizer("u8")
    q.set_range(-1.0, 3.0)
    assert float(q.scale) == pytest.approx(4 / 255) and int(q.zero_point) == 64
    s = ActQuantizer("s8")
    s.set_range(-1.0, 3.0)
    assert float(s.scale) == pytest.approx(3 / 127) and int(s.zero_point) == 0
    s.mode = "quantize"
    out = s(torch.tensor([3.0, -3.0, 0.0]))
    assert torch.allclose(out, torch.tensor([3.0, -3.0, 0.0]), atol=1e-6)


def test_symmetric_scheme_picks_u8_after_relu_and_s8_otherwise():
    relu_out, signed = ActQuantizer("sym"), ActQuantizer("sym")
    pos, mixed = torch.rand(1000) * 3, torch.randn(1000)
    for q, x in ((relu_out, pos), (signed, mixed)):
        q.start_calibration()
        q(x)
        q.finish_calibration("max", 100.0)
    assert bool(relu_out.unsigned) and relu_out.qrange == (0, 255) and int(relu_out.zero_point) == 0
    assert float(relu_out.scale) == pytest.approx(float(pos.max()) / 255)
    assert not bool(signed.unsigned) and signed.qrange == (-128, 127) and int(signed.zero_point) == 0
    assert float(signed.scale) == pytest.approx(float(mixed.abs().max()) / 127)
    again = ActQuantizer("sym")
    again.load_state_dict(relu_out.state_dict())
    assert bool(again.unsigned)  # the calibrated choice is saved with the scales


def _kl_reference(hist: list[float], i: int, quant_bins: int) -> float:
    """KL(P || Q) at threshold bin i, written out loop by loop as TensorRT describes it."""
    p = hist[:i]
    p[-1] += sum(hist[i:])
    q = [0.0] * i
    groups: dict[int, list[int]] = {}
    for k in range(i):
        groups.setdefault(k * quant_bins // i, []).append(k)
    for members in groups.values():
        filled = [k for k in members if hist[k] > 0]
        for k in filled:
            q[k] = sum(hist[k2] for k2 in members) / len(filled)
    if any(a > 0 and b == 0 for a, b in zip(p, q, strict=True)):
        return math.inf
    ps, qs = sum(p), sum(q)
    return sum((a / ps) * math.log((a / ps) / (b / qs)) for a, b in zip(p, q, strict=True) if a > 0)


def test_entropy_picks_the_threshold_of_least_kl_divergence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[:10] = 40.0  # rare outliers: the KL-optimal clip ignores them
    c = _calib(x)
    lo, hi = c.range("entropy", symmetric=True, levels=254)
    assert hi == -lo and 2.5 < hi < 10.0
    folded, _ = c._abs_hist()
    hist = folded.tolist()
    width = c.radius / len(hist)
    chosen = round(hi / width)
    kl = _kl_reference(list(hist), chosen, 128)
    for other in (128, 200, chosen - 7, chosen + 7, min(chosen * 2, len(hist)), min(int(40.0 / width) + 1, len(hist))):
        assert kl <= _kl_reference(list(hist), other, 128) + 1e-12, other


def test_entropy_keeps_the_range_of_a_uniform_tensor_and_of_a_relu_output():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(100_000, generator=g) * 2 - 1
    assert _calib(u).range("entropy", symmetric=True, levels=254)[1] > 0.95
    r = torch.relu(torch.randn(100_000, generator=g))
    lo, hi = _calib(r).range("entropy", symmetric=False, levels=255)
    assert lo == 0.0 and 1.0 < hi <= float(r.max())


def test_entropy_calibrates_a_deployable(tiny_resnet, tmp_path):
    from deploycraft.config import DataConfig
    from deploycraft.data import build_data
    from deploycraft.deployables import QuantSettings, build_deployable

    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=64, val_subset=64))
    images, _ = data.calibration_images(64)
    for target in ("onnxruntime-cpu", "tensorrt"):
        built = build_deployable(
            tiny_resnet, "int8", tmp_path / f"{target}.onnx", data.sample_input(2), target=target,
            settings=QuantSettings("entropy"), calibration=(images, data.spec), show=False,
        )  # fmt: skip
        maxed = build_deployable(
            tiny_resnet, "int8", tmp_path / f"{target}-max.onnx", data.sample_input(2), target=target,
            settings=QuantSettings("max"), calibration=(images, data.spec), show=False,
        )  # fmt: skip
        widths = [(r[1] - r[0], m[1] - m[0]) for r, m in zip(built.ranges.values(), maxed.ranges.values(), strict=True)]
        assert all(w <= wm + 1e-6 for w, wm in widths) and any(w < 0.9 * wm for w, wm in widths)
