"""Q/DQ placement per target, checked on the exported ONNX and on ONNX Runtime's optimized graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploycraft.machine import u8s8_pairs_saturate
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.runtime.ort import OrtRunner, optimized_op_counts


def _calibrated(model, target, size=16):
    # 7-bit weights where this CPU's INT8 kernels would saturate 8-bit ones, as the quantize stage does
    q = insert_quantizers(model, target, reduce_range=u8s8_pairs_saturate())
    for _, a in act_quantizers(q):
        a.start_calibration()
    with torch.no_grad():
        q(torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0)))
    for _, a in act_quantizers(q):
        a.finish_calibration("max", 100.0)
    return q


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    from deploycraft.models import create_model
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    randomize_bn(model)
    out = {}
    folder = tmp_path_factory.mktemp("qdq")
    for target in ("onnxruntime-cpu", "tensorrt"):
        q = _calibrated(model, target)
        path = folder / f"{target}.onnx"
        export_onnx(q, torch.randn(2, 3, 16, 16), path)
        out[target] = (q, path, onnx.load(str(path)))
    return model, out, folder


def test_ort_graph_runs_convs_and_adds_in_int8(exported):
    _, out, folder = exported
    _, path, proto = out["onnxruntime-cpu"]
    ops = op_counts(proto)
    assert ops.get("BatchNormalization", 0) == 0 and ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    opt = optimized_op_counts(path, folder)
    assert opt.get("QLinearConv") == ops["Conv"] == 21
    assert opt.get("QLinearAdd") == ops["Add"] == 9
    assert opt.get("Conv", 0) == 0 and opt.get("FusedConv", 0) == 0


def test_ort_activations_are_uint8(exported):
    _, out, _ = exported
    proto = out["onnxruntime-cpu"][2]
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[2] in consts:
            assert consts[n.input[2]].dtype == np.uint8


def test_tensorrt_placement_symmetric_and_skip_only(exported):
    _, out, _ = exported
    proto = out["tensorrt"][2]
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in consts:
            zp = consts[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), "TensorRT needs symmetric INT8: zero points all 0"
    producers = _producers(proto)
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert len(adds) == 9
    for add in adds:
        kinds = sorted(producers[i].op_type for i in add.input)
        # branch straight from its conv (TensorRT fuses conv+add+relu), skip through Q/DQ
        assert kinds == ["Conv", "DequantizeLinear"], kinds
    for n in proto.graph.node:
        if n.op_type == "Conv":
            assert producers[n.input[0]].op_type == "DequantizeLinear"  # every conv input quantized
            assert producers[n.input[1]].op_type == "DequantizeLinear"  # and its weight


def test_weights_stored_as_int8(exported):
    _, out, _ = exported
    proto = out["onnxruntime-cpu"][2]
    producers = _producers(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Conv":
            w_dq = producers[n.input[1]]
            assert w_dq.op_type == "DequantizeLinear"
            w = inits[w_dq.input[0]]
            assert w.data_type == onnx.TensorProto.INT8
            assert numpy_helper.to_array(inits[w_dq.input[1]]).ndim == 1  # per-channel scales


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "tensorrt"])
def test_deployed_file_matches_simulation(exported, target):
    _, out, _ = exported
    q, path, _ = out[target]
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sim = q(x).numpy()
    ort = OrtRunner(path)(x.numpy())
    assert relative_error(ort, sim) < 0.05
    assert (ort.argmax(1) == sim.argmax(1)).mean() >= 0.85


def test_dynamic_batch(exported):
    _, out, _ = exported
    runner = OrtRunner(out["onnxruntime-cpu"][1])
    for bs in (1, 5):
        assert runner(np.random.randn(bs, 3, 16, 16).astype(np.float32)).shape == (bs, 10)


def test_openvino_placement_clips_without_rounding_where_openvino_fuses_the_add(tiny_resnet, tmp_path):
    """The quantizer between a block's last conv and its residual add is a clip only for openvino-cpu (its CPU
    plugin fuses conv -> Q/DQ -> add -> ReLU -> Q/DQ and drops that rounding), rounds again once the add's
    output quantizer is off (no fusion then), never for the other targets, and is exported as Q/DQ all the same."""
    q = _calibrated(tiny_resnet, "openvino-cpu")
    clip = {name: a for name, a in act_quantizers(q) if not a.rounds}
    assert len(clip) == 9  # one per residual block of ResNet-20
    a = next(iter(clip.values()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = a(x * 10)
    lo, hi = (a.qrange[0] - int(a.zero_point)) * float(a.scale), (a.qrange[1] - int(a.zero_point)) * float(a.scale)
    assert torch.equal(y, (x * 10).clamp(lo, hi))  # clipped, not on the grid
    a.clip_only_while.mode = "off"
    assert a.rounds
    a.clip_only_while.mode = "quantize"
    path = tmp_path / "ov.onnx"
    export_onnx(q, x, path)
    names = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}
    assert all(f"/{name}/QuantizeLinear" in names for name in clip)
    for target in ("onnxruntime-cpu", "tensorrt"):
        assert all(a.rounds for _, a in act_quantizers(_calibrated(tiny_resnet, target)))


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "openvino-cpu"])
def test_fused_as_its_own_runtime_is_the_placement_itself(tiny_resnet, target):
    """A simulation fused as the runtime it was placed for computes exactly what it computed (same unrounded
    clips, same int32 bias grids); fused as the other runtime it follows that runtime's rules."""
    from deploycraft.deployables import TARGET_RUNTIME
    from deploycraft.quant.modules import QuantConv2d
    from deploycraft.quant.placement import fused_as

    q = _calibrated(tiny_resnet, target)

    def rules(m):
        clips = sorted(name for name, a in act_quantizers(m) if not a.rounds)
        grids = sorted(name for name, c in m.named_modules() if isinstance(c, QuantConv2d) and c.bias_grid)
        return clips, grids

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    own = fused_as(q, TARGET_RUNTIME[target])
    assert rules(own) == rules(q)
    with torch.no_grad():
        assert torch.equal(own(x), q(x))
    other = fused_as(q, "openvino" if target == "onnxruntime-cpu" else "onnxruntime")
    clips, grids = rules(other)
    if target == "onnxruntime-cpu":  # OpenVINO: one unrounded clip per residual block, biases in float
        assert len(clips) == 9 and grids == []
    else:  # ONNX Runtime: every quantizer rounds, every conv is a QLinearConv (int8 tensors turned uint8)
        assert clips == [] and len(grids) == 21
        assert any(not bool(a.unsigned) for name in grids for a in other.get_submodule(name).bias_grid)
    assert rules(q) == rules(fused_as(q, TARGET_RUNTIME[target]))  # the original is untouched
