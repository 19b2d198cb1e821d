"""ONNX Runtime's fused integer kernels against their imitation in the float64 simulation (quant/mlas.py), op
by op on every input integer: QLinearAdd on all 256 x 256 pairs of integers, QLinearConv on random
integers with accumulators of every size, for several scales and zero points each."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploycraft.machine import u8s8_pairs_saturate
from deploycraft.quant import mlas
from deploycraft.quant.modules import ActQuantizer, QuantConv2d

# The arithmetic imitated is that of ONNX Runtime's x86-64 kernels with fused multiply-adds (measured on AVX-512
# and AVX2 CPUs' code path); elsewhere (ARM, old x86) it rounds differently and only closeness can be asserted.
EXACT = mlas.kernels_imitated()


def _quantizer(scale: float, zero: int) -> ActQuantizer:
    q = ActQuantizer("u8")
    q.scale.fill_(scale)
    q.zero_point.fill_(zero)
    q.mode = "quantize"
    return q


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _run(graph: onnx.GraphProto, tmp_path, feeds: dict[str, np.ndarray], fused_op: str) -> np.ndarray:
    """Run the QDQ graph on ONNX Runtime's CPU provider, checking that it fused the op into ``fused_op``."""
    import onnxruntime as ort

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path, optimized = tmp_path / f"{graph.name}.onnx", tmp_path / f"{graph.name}.optimized.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert fused_op in {n.op_type for n in onnx.load(str(optimized)).graph.node}
    return sess.run(None, feeds)[0]


# Scales whose ratios lie within a few float32 steps of 1/2, 1 and 2: thousands of the 65,536 sums fall on or
# next to a tie, where the plain float64 division and ONNX Runtime's AVX2 assembly kernel (which divides by
# the output scale) round otherwise than the kernel that runs (found by a random search over such scales).
TIES = [
    (0.04770665243268013, 0.04770664870738983, 0.09541330486536026, 88, 117, 177),
    (0.01133481040596962, 0.00566740520298481, 0.02266962081193924, 89, 0, 45),
    (0.07397336512804031, 0.036986686289310455, 0.07397336512804031, 60, 180, 50),
]


@pytest.mark.parametrize("case", range(6))
def test_qlinearadd_on_every_pair_of_integers(case, tmp_path):
    if case < len(TIES):
        sa, sb, sy, za, zb, zy = TIES[case]
    else:
        rng = np.random.default_rng(case)
        sa, sb, sy = (float(np.float32(v)) for v in rng.uniform(0.01, 0.2, 3))
        za, zb, zy = (int(v) for v in rng.integers(0, 256, 3))
        zy = 0 if case == len(TIES) else zy  # a ReLU'd sum: the clamp at the zero point
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    a, b = a.reshape(1, 1, 256, 256), b.reshape(1, 1, 256, 256)
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["da"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["db"]),
        helper.make_node("Add", ["da", "db"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["y"]),
    ]
    inits = [
        _scalar("sa", sa, np.float32), _scalar("za", za, np.uint8), _scalar("sb", sb, np.float32),
        _scalar("zb", zb, np.uint8), _scalar("sy", sy, np.float32), _scalar("zy", zy, np.uint8),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "qladd",
        [helper.make_tensor_value_info(n, TensorProto.UINT8, a.shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, a.shape)], inits,
    )  # fmt: skip
    ort = _run(graph, tmp_path, {"a": a, "b": b}, "QLinearAdd").astype(np.int64)
    qa, qb, qy = _quantizer(sa, za), _quantizer(sb, zb), _quantizer(sy, zy)
    da = (torch.from_numpy(a.astype(np.float64)) - za) * qa.scale.double()
    db = (torch.from_numpy(b.astype(np.float64)) - zb) * qb.scale.double()
    sim = mlas.QLinearAdd(qa, qb, qy)(da, db)
    ours = (torch.round(sim / qy.scale.double()) + zy).numpy().astype(np.int64)
    assert np.abs(ours - ort).max() <= 1
    if EXACT:
        assert (ours == ort).all(), int((ours != ort).sum())
    if case < len(TIES):  # the case is what it is meant to be: the float64 division misses thousands
        plain = np.clip(np.rint((da.numpy() + db.numpy()) / np.float64(sy)) + zy, 0, 255)
        assert (plain != ort).sum() > 1000


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qlinearconv_requantizes_as_onnx_runtime(per_channel, ties, tmp_path):
    """Random weights and inputs; with ``ties`` small integer weights on a step of 0.01 and an output scale that
    makes x_scale x w_scale / y_scale a few float32 steps from 1/2: every odd accumulator lands next to a tie,
    where the float32 multiplier decides (the plain float64 division misses hundreds)."""
    torch.manual_seed(0)
    cin, cout = 64, 32
    # 7-bit weights where this CPU's u8 x s8 pair sums saturate (no VNNI): the requantization is tested here
    conv = QuantConv2d.from_float(
        torch.nn.Conv2d(cin, cout, 3, padding=1), per_channel=per_channel, reduce_range=u8s8_pairs_saturate()
    )
    sx, zx, zy = 0.05, 7, 131
    x = torch.randint(0, 256, (4, cin, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(cout))
        if ties:
            conv.weight_scale.fill_(0.01)
            conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape).float() * conv.weight_scale[0])
            x = torch.randint(0, 16, x.shape, dtype=torch.uint8)
    step32 = np.float32(np.float32(sx) * conv.weight_scale.numpy()[0])
    sy = float(np.float32(2 * np.float64(step32) * (1 + 4e-8))) if ties else 0.02
    qx, qy = _quantizer(sx, zx), _quantizer(sy, zy)
    w_int, step = conv.integer_weight()
    w_scale = conv.weight_scale.float()
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["dw"], axis=0),
        helper.make_node("Conv", ["dx", "dw", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["y"]),
    ]
    inits = [
        _scalar("sx", sx, np.float32), _scalar("zx", zx, np.uint8), _scalar("sy", sy, np.float32),
        _scalar("zy", zy, np.uint8), numpy_helper.from_array(w_int.numpy().astype(np.int8), "w"),
        numpy_helper.from_array(w_scale.numpy() if per_channel else w_scale.numpy()[0], "sw"),
        numpy_helper.from_array(np.zeros(cout if per_channel else (), np.int8), "zw"),
        numpy_helper.from_array(conv.bias.detach().numpy(), "bias"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "qlconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
    )  # fmt: skip
    ort = _run(graph, tmp_path, {"x": x.numpy()}, "QLinearConv").astype(np.int64)
    # the float64 copy's conv: integer x step weights, the bias on its int32 grid (as exact_simulation bakes them)
    sim_conv = QuantConv2d.from_float(torch.nn.Conv2d(cin, cout, 3, padding=1), per_channel=per_channel).double()
    with torch.no_grad():
        sim_conv.weight.copy_(w_int.double() * step.double())
        sim_conv.weight_scale.copy_(conv.weight_scale.double())
        bias_step = qx.scale.float() * w_scale
        sim_conv.bias.copy_(torch.round(conv.bias.detach() / bias_step).double() * bias_step.double())
        dx = (x.double() - zx) * qx.scale.double()
        sim = mlas.QLinearConv(sim_conv, qx, qy)(dx)
        plain = torch.nn.functional.conv2d(dx, sim_conv.weight, sim_conv.bias, padding=1) / qy.scale.double()
    ours = (torch.round(sim / qy.scale.double()) + zy).numpy().astype(np.int64)
    plain = torch.clamp(torch.round(plain) + zy, 0, 255).numpy().astype(np.int64)
    assert np.abs(ours - ort).max() <= 1
    assert 0 < (ours == 0).sum() and 0 < (ours == 255).sum()  # both clamps are exercised
    if EXACT:
        assert (ours == ort).all(), int((ours != ort).sum())
    if ties:
        assert (plain != ort).sum() > 100, int((plain != ort).sum())


def test_a_dead_channels_bias_fits_int32_and_the_file_computes_what_the_simulation_does(tmp_path):
    """A BN whose gamma is (all but) zero, folded into its conv, leaves a channel with weights of 1e-9 and a
    bias: on the int32 grid x_scale x w_scale its bias would be billions of steps, and ONNX Runtime's cast
    would wrap it. The exporter raises that channel's weight scale so the bias fits (and its weights quantize
    to zero); the deployed file then agrees with the simulation at every tap."""
    from deploycraft.config import DataConfig
    from deploycraft.data import build_data
    from deploycraft.deployables import QuantSettings, build_deployable
    from deploycraft.models import create_model
    from deploycraft.quant import fidelity
    from tests.conftest import randomize_bn

    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=64, val_subset=64))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    randomize_bn(model)
    bn = model.layer3[0].bn2
    with torch.no_grad():
        bn.weight[5] = 1e-9  # the folded weights of channel 5: 1e-9 x w / sqrt(var)
        bn.bias[5] = 0.5
    images, _ = data.calibration_images(64)
    built = build_deployable(
        model, "int8", tmp_path / "int8.onnx", data.sample_input(2), target="onnxruntime-cpu",
        settings=QuantSettings(), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    assert built.bias_fitted == ["layer3.0.conv2[5]"]
    conv = built.module.get_submodule("layer3.0.conv2")
    bias_int = conv.bias.detach() / conv.bias_step()
    assert bias_int.abs().max() <= QuantConv2d.BIAS_INT_LIMIT * (1 + 1e-6)
    assert (conv.integer_weight()[0][5] == 0).all() and float(conv.weight.detach()[5].abs().max()) < 1e-8
    f = fidelity.compare(built.module, built.proto, "onnxruntime", data.sample_input(16))
    assert f["first_over"] is None  # before: layer3.0.conv2 jumped by 0.2 (its channel 5 wrapped)
    if EXACT:
        assert max(r["rel_error"] for r in f["taps"]) < 1e-6 and max(r["off"] for r in f["taps"]) == 0.0


def _pool_graph(op: str, shape, sx, zx, sy, zy, **attrs) -> onnx.GraphProto:
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"]),
        helper.make_node(op, ["dx"], ["p"], **attrs),
        helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"]),
    ]
    inits = [
        _scalar("sx", sx, np.float32), _scalar("zx", zx, np.uint8), _scalar("sy", sy, np.float32),
        _scalar("zy", zy, np.uint8),
    ]  # fmt: skip
    return helper.make_graph(
        nodes, op.lower(), [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
    )  # fmt: skip


@pytest.mark.parametrize("multiple", [2, 4])
def test_qlinear_global_average_pool(multiple, tmp_path):
    """A 7x7 global pool whose output scale is x_scale x 2 (or 4) / 49 in float32: many means fall on or next
    to a tie (found by a search over such scales: the plain float64 mean then misses 45 and 102 of 4,096)."""
    rng = np.random.default_rng(0)
    sx, size = float(np.float32(0.07)), 7
    sy = float(np.float32(sx * multiple / size**2))
    zx, zy = 100, 17
    x = rng.integers(0, 256, (64, 64, size, size)).astype(np.uint8)
    ort = _run(
        _pool_graph("GlobalAveragePool", x.shape, sx, zx, sy, zy), tmp_path, {"x": x}, "QLinearGlobalAveragePool"
    )
    qx, qy = _quantizer(sx, zx), _quantizer(sy, zy)
    dx = (torch.from_numpy(x.astype(np.float64)) - zx) * qx.scale.double()
    ours = (torch.round(mlas.QLinearGlobalAveragePool(qx, qy)(dx) / qy.scale.double()) + zy).numpy()
    plain = torch.clamp(torch.round(dx.mean((2, 3), keepdim=True) / qy.scale.double()) + zy, 0, 255).numpy()
    assert np.abs(ours - ort).max() <= 1
    if EXACT:
        assert (ours == ort).all(), int((ours != ort).sum())
        assert (plain != ort).sum() > 0  # the ties are there: the plain float64 mean misses some


@pytest.mark.parametrize("kernel", [2, 3])
def test_qlinear_average_pool(kernel, tmp_path):
    """DenseNet's transitions: an average pool without padding. An output scale of x_scale x 2 / k^2 in float32
    puts many window means on or next to a tie (the plain float64 mean misses hundreds)."""
    rng = np.random.default_rng(0)
    sx = float(np.float32(0.031))
    sy = float(np.float32(sx * 2 / kernel**2))
    zx, zy = 100, 17
    x = rng.integers(0, 256, (8, 32, 12, 12)).astype(np.uint8)
    graph = _pool_graph("AveragePool", x.shape, sx, zx, sy, zy, kernel_shape=[kernel, kernel], strides=[kernel, kernel])
    ort = _run(graph, tmp_path, {"x": x}, "QLinearAveragePool")
    qx, qy = _quantizer(sx, zx), _quantizer(sy, zy)
    pool = torch.nn.AvgPool2d(kernel)
    dx = (torch.from_numpy(x.astype(np.float64)) - zx) * qx.scale.double()
    ours = (torch.round(mlas.QLinearAveragePool(pool, qx, qy)(dx) / qy.scale.double()) + zy).numpy()
    plain = torch.clamp(torch.round(pool(dx) / qy.scale.double()) + zy, 0, 255).numpy()
    assert np.abs(ours - ort).max() <= 1
    if EXACT:
        assert (ours == ort).all(), int((ours != ort).sum())
        assert (plain != ort).sum() > 100, int((plain != ort).sum())


@pytest.mark.parametrize("arch", ["densenet40_12", "resnext29_4x16d"])
def test_concatenations_pools_and_grouped_convs_match_the_file_at_every_tap(arch, tmp_path):
    """A DenseNet (concatenations requantize every layer's input, average pools in the transitions) and a
    ResNeXt (grouped convs): the float64 simulation with ONNX Runtime's arithmetic matches the deployed file
    at every activation quantizer, and every fusable op was rewritten."""
    from deploycraft.config import DataConfig
    from deploycraft.data import build_data
    from deploycraft.deployables import QuantSettings, build_deployable
    from deploycraft.models import create_model
    from deploycraft.quant import fidelity
    from deploycraft.quant.modules import exact_simulation
    from deploycraft.runtime.ort import optimized_op_counts
    from tests.conftest import randomize_bn

    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=32, val_subset=32))
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=3)
    randomize_bn(model)
    images, _ = data.calibration_images(32)
    built = build_deployable(
        model, "int8", tmp_path / "int8.onnx", data.sample_input(2), target="onnxruntime-cpu",
        settings=QuantSettings(), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    exact = exact_simulation(built.module, "onnxruntime")
    rewritten = {}
    for m in exact.modules():
        if type(m).__module__ == mlas.__name__:
            rewritten[type(m).__name__] = rewritten.get(type(m).__name__, 0) + 1
    ops = optimized_op_counts(tmp_path / "int8.onnx", tmp_path)
    for op in ("QLinearConv", "QLinearAdd", "QLinearAveragePool", "QLinearGlobalAveragePool"):
        assert rewritten.get(op, 0) == ops.get(op, 0), (op, rewritten, ops)
    f = fidelity.compare(exact, built.proto, "onnxruntime", data.sample_input(8))
    assert f["first_over"] is None
    if EXACT:
        assert max(r["rel_error"] for r in f["taps"]) < 1e-6 and max(r["off"] for r in f["taps"]) == 0.0


def test_a_batchnorm_no_conv_absorbs_runs_in_float32(tmp_path):
    """DenseNet's BN-ReLU in front of every layer is a Mul and an Add between a DequantizeLinear and a
    QuantizeLinear: ONNX Runtime computes them in float32, and so does the float64 copy (ChannelAffine), on
    every input integer of 4,096 channels with random BN scales and shifts (the plain float64 affine misses
    some of the near-ties)."""
    from deploycraft.quant.graph import ChannelAffine

    rng = np.random.default_rng(0)
    channels = 4096
    scale = rng.uniform(0.2, 3.0, channels).astype(np.float32)
    shift = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
    sx, zx, sy = 0.031, 120, 0.017
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 1, 256)).copy()
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"]),
        helper.make_node("Mul", ["dx", "scale"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y"]),
    ]
    inits = [
        _scalar("sx", sx, np.float32), _scalar("zx", zx, np.uint8), _scalar("sy", sy, np.float32),
        _scalar("zy", 0, np.uint8), numpy_helper.from_array(scale.reshape(1, -1, 1, 1), "scale"),
        numpy_helper.from_array(shift.reshape(1, -1, 1, 1), "shift"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits,
    )  # fmt: skip
    ort = _run(graph, tmp_path, {"x": x}, "QuantizeLinear").astype(np.int64)
    affine = ChannelAffine(torch.from_numpy(scale).double(), torch.from_numpy(shift).double()).double()
    qx, qy = _quantizer(sx, zx), _quantizer(sy, 0)
    qy.float32_division = True
    dx = (torch.from_numpy(x.astype(np.float64)) - zx) * qx.scale.double()
    with torch.no_grad():
        plain = (torch.round(qy(torch.relu(affine(dx))) / qy.scale.double())).numpy()
        affine.float32 = True
        ours = (torch.round(qy(torch.relu(affine(dx))) / qy.scale.double())).numpy()
    assert np.abs(ours - ort).max() <= 1
    if EXACT:
        assert (ours == ort).all(), int((ours != ort).sum())
        assert (plain != ort).sum() > 0  # the case is what it is meant to be
