"""Weights of 2-8 bits per layer (per-channel symmetric) with 8-bit activations: 4-bit weights are stored
as ONNX INT4 initializers read by DequantizeLinear (opset 21), and ONNX Runtime runs the file."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.deployables import QuantSettings, build_deployable
from deploycraft.errors import UserError
from deploycraft.pipeline import Pipeline
from deploycraft.quant.modules import QuantConv2d
from deploycraft.recipe import build_recipe
from deploycraft.runtime import onnx_runner
from tests.conftest import smoke_recipe


@pytest.fixture(scope="module")
def data():
    return build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=64, val_subset=64))


def _build(model, data, path, target="onnxruntime-cpu", **settings):
    images, _ = data.calibration_images(64)
    return build_deployable(
        model,
        "int8",
        path,
        data.sample_input(2),
        target=target,
        settings=QuantSettings(**settings),
        calibration=(images, data.spec),
        show=False,
    )


def _bits(qmodel) -> dict[str, int]:
    return {n: m.bits for n, m in qmodel.named_modules() if hasattr(m, "weight_scale")}


def test_first_conv_and_classifier_stay_at_8_bits_unless_told(tiny_resnet, data, tmp_path):
    built = _build(tiny_resnet, data, tmp_path / "a.onnx", weight_bits=4)
    bits = _bits(built.module)
    assert bits.pop("conv1") == 8 and bits.pop("fc") == 8 and set(bits.values()) == {4}
    built = _build(
        tiny_resnet, data, tmp_path / "b.onnx", weight_bits=4, ends_bits=None, layer_bits=(("layer2.0.conv1", 6),)
    )
    bits = _bits(built.module)
    assert bits["conv1"] == 4 and bits["fc"] == 4 and bits["layer2.0.conv1"] == 6


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "tensorrt"])
def test_4_bit_weights_are_int4_in_a_file_onnx_runtime_runs(tiny_resnet, data, tmp_path, target):
    int8 = _build(tiny_resnet, data, tmp_path / "int8.onnx", target)
    int4 = _build(tiny_resnet, data, tmp_path / "int4.onnx", target, weight_bits=4)
    four_bit = [m for m in int4.module.modules() if getattr(m, "bits", 8) == 4]
    # the simulation's 4-bit integers span [-7, 7] per channel (scale = amax / 7)
    conv = next(m for m in four_bit if isinstance(m, QuantConv2d))
    ints = torch.round(conv.qweight() / conv.weight_scale.view(-1, 1, 1, 1))
    assert ints.abs().amax() == 7 and (ints.abs().flatten(1).amax(1) == 7).all()
    proto = onnx.load(str(tmp_path / "int4.onnx"))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    narrow = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    weights = [t for t in narrow if len(t.dims) > 1]
    assert len(weights) == len(four_bit)
    assert all(numpy_helper.to_array(t).astype(int).min() >= -8 for t in weights)
    readers = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert all(t.name in readers for t in weights)
    x = data.sample_input(64)
    with torch.no_grad():
        sim = int4.module(x).numpy()
    out = onnx_runner("onnxruntime", tmp_path / "int4.onnx", threads=1)(x.numpy())
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.9  # an untrained net: close logits flip on rounding
    assert abs(out - sim).max() <= 0.05 * abs(sim).max()
    # Half the bytes per weight: with the stem and classifier at 8 bits, well under 0.6 of the INT8 file.
    assert (tmp_path / "int4.onnx").stat().st_size < 0.6 * (tmp_path / "int8.onnx").stat().st_size
    # the same graph, narrower weights (less the Identity nodes that passed on INT8 zero points)
    assert {k: v for k, v in int8.ops.items() if k != "Identity"} == {
        k: v for k, v in int4.ops.items() if k != "Identity"
    }


def test_5_to_7_bit_weights_stay_in_int8_initializers(tiny_resnet, data, tmp_path):
    _build(tiny_resnet, data, tmp_path / "w6.onnx", weight_bits=6)
    proto = onnx.load(str(tmp_path / "w6.onnx"))
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    ints = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert max(int(abs(a.astype(int)).max()) for a in ints if a.ndim == 4 and a.shape[1] > 3) <= 32


def test_bad_bit_widths_are_one_clear_error(tmp_path):
    raw = smoke_recipe()
    raw["stages"][1] = {"type": "quantize", "weight_bits": 1}
    with pytest.raises(UserError, match="weight_bits"):
        build_recipe(raw)
    raw["stages"][1] = {"type": "quantize", "layer_bits": {"layer1.0.conv1": 9}}
    with pytest.raises(UserError, match="layer_bits"):
        build_recipe(raw)
    raw["stages"][1] = {"type": "quantize", "layer_bits": {"layer9.conv": 4}}
    with pytest.raises(UserError, match=r"stages\.1\.layer_bits\.layer9\.conv"):
        Pipeline(build_recipe(raw), tmp_path / "run").preflight()
