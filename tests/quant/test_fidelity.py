"""Layer fidelity: the deployed runtime's quantizer outputs against the simulation's, and a planted
mismatch (one wrong scale in the exported file) named by its layer, in the data and in the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.deployables import QuantSettings, build_deployable
from deploycraft.machine import u8s8_pairs_saturate
from deploycraft.quant import fidelity
from deploycraft.stages.quantize import QuantizeStage

RUNTIMES = {"onnxruntime-cpu": "onnxruntime", "openvino-cpu": "openvino"}


@pytest.fixture(scope="module")
def data():
    return build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=64, val_subset=64))


@pytest.fixture(scope="module", params=sorted(RUNTIMES))
def built(request, data, tmp_path_factory):
    import torch

    from deploycraft.models import create_model
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    randomize_bn(model)
    images, _ = data.calibration_images(64)
    path = tmp_path_factory.mktemp("fidelity") / "int8.onnx"
    b = build_deployable(
        model, "int8", path, data.sample_input(2), target=request.param, settings=QuantSettings(),
        calibration=(images, data.spec), show=False,
    )  # fmt: skip
    return request.param, b.module, onnx.load(str(path))


def _plant(proto: onnx.ModelProto, layer: str, factor: float) -> onnx.ModelProto:
    """A copy where the weight DequantizeLinear of ``layer`` reads a scale ``factor`` times the right one."""
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    name = f"{layer}.weight_scale"
    init = next(t for t in bad.graph.initializer if t.name == name)
    bad.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name + ".wrong"))
    hits = 0
    for n in bad.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] == name:
            n.input[1] = name + ".wrong"
            hits += 1
    assert hits == 1
    return bad


def _plain_float64_errors(qmodel, proto: onnx.ModelProto, runtime: str, x) -> list[tuple[float, int]]:
    """Per tap, the relative error and the count of elements a step or more apart between the deployed file
    and the plain float64 simulation (exact sums, float64 requantization: no runtime's arithmetic)."""
    import tempfile
    from pathlib import Path

    from deploycraft.quant.modules import exact_simulation

    taps = fidelity.activation_taps(proto)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taps.onnx"
        onnx.save(fidelity._with_outputs(proto, [t["tensor"] for t in taps]), str(path))
        deployed = fidelity._run_all(runtime, path, x.numpy())
    sim = fidelity._sim_taps(exact_simulation(qmodel), x)
    scales = {n: float(q.scale) for n, q in fidelity.act_quantizers(qmodel)}
    out = []
    for t in taps:
        s, d = sim[t["quantizer"]][t["call"]], deployed[t["tensor"]]
        diff = np.abs(d.astype(np.float64) - s)
        out.append(
            (
                float(np.linalg.norm(diff) / max(np.linalg.norm(s), 1e-12)),
                int((diff > 0.5 * scales[t["quantizer"]]).sum()),
            )
        )
    return out


def test_taps_cover_every_activation_quantizer_in_graph_order(built):
    _, qmodel, proto = built
    taps = fidelity.activation_taps(proto)
    quantizers = {n for n, _ in fidelity.act_quantizers(qmodel)}
    assert {t["quantizer"] for t in taps} == quantizers
    assert taps[0]["inputs"] == [] and all(max(t["inputs"], default=-1) < i for i, t in enumerate(taps))
    # every tap after the input one names the conv that produced it, by module path
    convs = {n for n, m in qmodel.named_modules() if hasattr(m, "weight_scale")}
    assert all(t["layer"] in convs for t in taps[1:] if t["layer"] is not None)
    assert any(t["layer"] == "layer2.0.conv1" for t in taps)


def test_the_unchanged_file_follows_its_simulation(built, data):
    target, qmodel, proto = built
    f = fidelity.compare(qmodel, proto, RUNTIMES[target], data.sample_input(16))
    assert f["first_over"] is None, f["first_over"]
    assert len(f["taps"]) == len(fidelity.activation_taps(proto))
    assert max(r["rel_error"] for r in f["taps"]) < 0.05


@pytest.mark.parametrize("layer", ["layer1.1.conv2", "layer3.0.conv1"])
def test_a_planted_wrong_scale_is_named_by_its_layer(built, data, layer):
    target, qmodel, proto = built
    f = fidelity.compare(qmodel, _plant(proto, layer, 1.3), RUNTIMES[target], data.sample_input(16))
    first = f["first_over"]
    assert first is not None and first["layer"] == layer, first
    # the report names it
    report = {
        "stages": {
            "quantize": {
                "percentile": None, "calibrator": "max", "calibration": "test", "target": target,
                "targets": {
                    target: {
                        "activation_dtype": "uint8", "activation_quantizers": 1, "weight_quantizers": 1,
                        "sim_vs_onnx_top1_agreement": 1.0, "runtime": RUNTIMES[target], "fidelity": f,
                    }
                },
            }
        }
    }  # fmt: skip
    text = "\n".join(QuantizeStage.report_section(report))
    assert f"first diverging layer: {layer}" in text


def test_excess_is_relative_to_the_inputs_not_the_depth(built, data):
    """A wrong scale late in the net: the taps before it stay clean, the ones after inherit its error but
    only the planted layer jumps."""
    target, qmodel, proto = built
    f = fidelity.compare(qmodel, _plant(proto, "layer3.0.conv1", 1.3), RUNTIMES[target], data.sample_input(16))
    rows = f["taps"]
    i = next(k for k, r in enumerate(rows) if r["layer"] == "layer3.0.conv1")
    assert all(r["excess"] <= f["tolerance"] for r in rows[:i])
    assert np.isclose(max(r["excess"] for r in rows), rows[i]["excess"])


def test_the_ort_simulation_rounds_biases_as_qlinearconv_does(built, data):
    """ONNX Runtime keeps each QLinearConv's bias as int32 on the input x weight scale grid; the simulation
    does the same, so its quantizer outputs match the deployed file's far more closely than with float
    biases (tiny ResNet-20: a smaller total error over the taps)."""
    target, qmodel, proto = built
    if target != "onnxruntime-cpu":
        pytest.skip("only ONNX Runtime quantizes the bias (OpenVINO and TensorRT keep it in float)")
    convs = [m for m in qmodel.modules() if getattr(m, "bias_grid", None) is not None]
    assert len(convs) == 21  # every conv of ResNet-20 becomes a QLinearConv
    x = data.sample_input(16)
    with_grid = _plain_float64_errors(qmodel, proto, "onnxruntime", x)
    grids = [m.bias_grid for m in convs]
    try:
        for m in convs:
            object.__setattr__(m, "bias_grid", None)
        without = _plain_float64_errors(qmodel, proto, "onnxruntime", x)
    finally:
        for m, g in zip(convs, grids, strict=True):
            object.__setattr__(m, "bias_grid", g)
    total = sum(e for e, _ in with_grid)
    assert total < 0.5 * sum(e for e, _ in without)


def test_the_float64_simulation_follows_the_file_element_for_element(built, data):
    """The simulation is compared in float64 (exact_simulation), where a conv's sum of integer products is
    exact as in the runtimes' int32 accumulators: OpenVINO's quantizer outputs then match to float32
    precision at every tap. For ONNX Runtime it also requantizes as QLinearConv / QLinearAdd / QuantizeLinear
    do in float32 (quant/mlas.py): every tap matches too, where the plain float64 copy is a step off at some
    elements of most taps (ties broken the other way; the float32 simulation: 5 of 33 taps exact)."""
    from deploycraft.quant import mlas
    from deploycraft.quant.modules import exact_simulation

    target, qmodel, proto = built
    runtime = RUNTIMES[target]
    x = data.sample_input(16)
    f = fidelity.compare(qmodel, proto, runtime, x)
    assert len(f["taps"]) >= 30
    errors = [r["rel_error"] for r in f["taps"]]
    if mlas.kernels_imitated() or (target == "openvino-cpu" and not u8s8_pairs_saturate()):
        assert max(errors) < 1e-6 and max(r["off"] for r in f["taps"]) == 0.0
    elif target == "openvino-cpu":
        # x86 without VNNI: oneDNN halves the s8 weights to keep its int16 pair sums from saturating, so
        # odd weights round (measured on a 2.0 GHz Xeon with AVX-512, no VNNI: median 0.29 %, max 0.89 %
        # with 7-bit weights; 11.7 % and 14.9 % with 8-bit ones, which also saturate)
        assert max(errors) < 0.02 and np.median(errors) < 0.01, errors
    else:  # another CPU's ONNX Runtime kernels (ARM, x86 without VNNI): ties only, as the plain float64 copy
        assert sum(e < 1e-6 for e in errors) >= 12 and np.median(errors) < 1e-3, errors
    exact = exact_simulation(qmodel, runtime)
    fused = [type(m) for m in exact.modules() if isinstance(m, (mlas.QLinearConv, mlas.QLinearAdd))]
    if target == "openvino-cpu":
        assert f["sim_precision"] == "float64" and not fused
        return
    assert f["sim_precision"] == "float64 with ONNX Runtime's requantization"
    # what ONNX Runtime fuses: every conv of ResNet-20 (19 3x3, 2 1x1 shortcuts) and every residual add
    assert (fused.count(mlas.QLinearConv), fused.count(mlas.QLinearAdd)) == (21, 9)
    with pytest.raises(ValueError, match="imitates onnxruntime"):
        exact_simulation(exact, "openvino")
    off = [k for _, k in _plain_float64_errors(qmodel, proto, runtime, x)]
    assert sum(k > 0 for k in off) >= 5, off  # the plain float64 copy: ties broken the other way


def test_the_simulation_takes_the_files_weight_integers_and_the_float64_copy_leaves_it_alone():
    """Weights at near-ties: torch's float32 fake-quant multiplies by the reciprocal of the scale and puts
    some of them on the neighbouring integer; the file divides (ONNX QuantizeLinear), and so do the
    simulation and its float64 copy."""
    import torch

    from deploycraft.onnx_io import fold_weight_quantizers
    from deploycraft.quant.modules import QuantConv2d, exact_simulation, quant_step

    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3))
    scale = quant_step(conv.weight_scale).view(-1, 1, 1, 1)
    k = torch.randint(-120, 120, conv.weight.shape).float()
    with torch.no_grad():
        conv.weight.copy_(((k + 0.5) * scale.double()).float())  # the float32 nearest to a tie
    torch_op = torch.fake_quantize_per_channel_affine(
        conv.weight.detach(), scale.flatten(), conv.weight_zero_point, 0, -128, 127
    )
    conv.eval()
    with torch.no_grad():
        fq = conv.qweight()
    exact = exact_simulation(conv)
    # the file's integers, as the exporter computes them
    w = numpy_helper.from_array(conv.weight.detach().numpy(), "w")
    s = numpy_helper.from_array(quant_step(conv.weight_scale).numpy(), "s")
    z = numpy_helper.from_array(np.zeros(4, np.int8), "z")
    node = onnx.helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0)
    out = onnx.helper.make_tensor_value_info("q", onnx.TensorProto.INT8, None)
    proto = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], [out], [w, s, z]))
    assert fold_weight_quantizers(proto) == 1
    file_integers = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "q"))
    assert (torch.round(torch_op / scale).numpy() != file_integers).sum() > 0  # the case guarded against
    assert (torch.round(fq / scale).numpy() == file_integers).all()
    assert (torch.round(exact.weight.detach() / scale.double()).numpy() == file_integers).all()
    assert exact.weight.dtype == torch.float64 and not exact.quantize_weight
    assert conv.weight.dtype == torch.float32 and conv.quantize_weight  # the simulation itself is untouched
    with torch.no_grad():
        assert torch.equal(conv.qweight(), fq)


def test_training_quantizes_weights_with_torchs_op_and_evaluation_with_the_files_integers():
    """QAT's forward keeps torch's fused op and its straight-through gradient (zero where a weight is
    clamped); evaluation, where no gradient is asked for, takes the exact integers."""
    import torch

    from deploycraft.quant.modules import QuantConv2d, quant_step

    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3))
    scale = quant_step(conv.weight_scale).view(-1, 1, 1, 1)
    k = torch.randint(-120, 120, conv.weight.shape).float()
    with torch.no_grad():
        conv.weight.copy_(((k + 0.5) * scale.double()).float())
        conv.weight[0, 0, 0, 0] = 200 * conv.weight_scale[0]  # past the calibrated range (127 steps): clamped
    op = torch.fake_quantize_per_channel_affine(conv.weight, conv.weight_scale, conv.weight_zero_point, 0, -128, 127)
    trained = conv.qweight()
    assert torch.equal(trained, op)
    trained.sum().backward()
    assert conv.weight.grad[0, 0, 0, 0] == 0 and conv.weight.grad.sum() == conv.weight.numel() - 1
    conv.eval()
    with torch.no_grad():
        evaluated = conv.qweight()
    exact = torch.round(conv.weight.detach().double() / scale.double()).clamp(-128, 127)
    assert not torch.equal(evaluated, op.detach())  # near-ties: the reciprocal put some on another integer
    assert torch.equal(torch.round(evaluated.double() / scale.double()), exact)


def test_the_float64_copy_takes_onnx_runtimes_bias_integers():
    """ONNX Runtime puts a QLinearConv's bias on its int32 grid in float32 (Mul of the scales, Div, Round):
    the float64 copy takes those integers, not ones divided in float64 (a wide conv with biases of all
    sizes: some differ by one unit between the two divisions)."""
    import torch

    from deploycraft.quant.modules import ActQuantizer, QuantConv2d, exact_simulation

    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(256, 2048, 1))
    with torch.no_grad():
        conv.bias.copy_(torch.randn(2048) * 0.5)
    grid_in, grid_out = ActQuantizer("u8"), ActQuantizer("u8")
    for q in (grid_in, grid_out):
        q.set_range(0.0, 5.0)
        q.mode = "quantize"
    conv.set_bias_grid(grid_in, grid_out)
    step32 = grid_in.scale * conv.weight_scale
    ort = torch.round(conv.bias.detach() / step32)  # float32, as BiasQuantization computes it
    divided64 = torch.round(conv.bias.detach().double() / step32.double())
    assert (ort.double() != divided64).any()  # the case guarded against is present
    exact = exact_simulation(conv)
    assert torch.equal(torch.round(exact.bias.detach() / step32.double()), ort.double())


def test_held_out_agreement_in_float64_or_float32(built, data, tmp_path):
    """The recipe chooses the simulation's arithmetic for the held-out comparison; the result says which,
    and the float64 copy agrees with the file at least as often as the float32 simulation on this split."""
    import torch

    from deploycraft.models import create_model
    from deploycraft.runtime import onnx_runner
    from deploycraft.stages.quantize import held_out_agreement

    target, qmodel, proto = built
    path = tmp_path / "int8.onnx"
    onnx.save(proto, str(path))
    torch.manual_seed(0)
    fp32 = create_model("resnet20", num_classes=10, in_chans=3).eval()
    deployed = onnx_runner(RUNTIMES[target], path, threads=None)
    exact = held_out_agreement(fp32, qmodel, deployed, data, runtime=RUNTIMES[target])
    plain = held_out_agreement(fp32, qmodel, deployed, data, "float32")
    arithmetic = "float64" if target == "openvino-cpu" else "float64 with ONNX Runtime's requantization"
    assert (exact["sim_precision"], plain["sim_precision"]) == (arithmetic, "float32")
    assert exact["images"] == plain["images"] == data.num_val
    assert exact["sim_vs_deployed"] >= plain["sim_vs_deployed"] and exact["sim_vs_deployed"] > 0.95
    assert next(qmodel.parameters()).dtype == torch.float32  # the simulation itself stays float32
