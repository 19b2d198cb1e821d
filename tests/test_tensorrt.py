"""TensorRT engine export.

The default run exercises the builder up to the import boundary with a recording stand-in for the
``tensorrt`` module (strongly typed network, no precision flags, one optimization profile per batch
size, timing cache, inspector layer list, manifest), the fusion check on inspector JSON, the refusal
of a mismatched engine, and a pipeline run that reports the engines as "not built here". The tests
marked ``tensorrt`` build real engines and run only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest
import torch

from deploycraft.deployables import build_deployable, build_fp16_onnx
from deploycraft.errors import UserError
from deploycraft.runtime import tensorrt as trt_rt
from deploycraft.runtime.tensorrt import (
    EngineBuildError,
    build_engine,
    check_compatible,
    check_fusion,
    companion_paths,
    load_engine,
    residual_blocks,
)

GPU = {"gpu": "NVIDIA H200", "compute_capability": "9.0"}


def fake_tensorrt(layers_for, version: str = "11.1.0", parse_ok: bool = True, build_ok: bool = True):
    """A stand-in for the tensorrt module that records every call. It defines only what TensorRT 11 still
    has: touching BuilderFlag.INT8/FP16, calibrators or EXPLICIT_BATCH raises AttributeError."""
    calls: list[tuple] = []

    class Enum:
        def __init__(self, **values):
            self.__dict__.update(values)

    class Error:
        def desc(self):
            return "Assertion failed: zero point must be 0"

        def node_name(self):
            return "QuantizeLinear_7"

        def node_operator(self):
            return "QuantizeLinear"

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def get_input(self, i):
            return Tensor("input", (-1, 3, 16, 16))

        def get_output(self, i):
            return Tensor("logits", (-1, 10))

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            calls.append(("OnnxParser",))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            self.path = path
            return parse_ok

        def get_error(self, i):
            return Error()

    class Cache:
        def serialize(self):
            return b"timing-cache-v2"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, lo, opt, hi))

    class Config:
        def __setattr__(self, key, value):
            calls.append(("config." + key, value))
            object.__setattr__(self, key, value)

        def set_memory_pool_limit(self, pool, n):
            calls.append(("set_memory_pool_limit", pool, n))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))

        def get_timing_cache(self):
            return Cache()

        def add_optimization_profile(self, p):
            calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"plan-bytes" if build_ok else None

    class Inspector:
        def get_engine_information(self, fmt):
            calls.append(("get_engine_information", fmt))
            return json.dumps({"Layers": layers_for()})

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append(("deserialize_cuda_engine", bytes(blob)))
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        Runtime=Runtime,
        NetworkDefinitionCreationFlag=Enum(STRONGLY_TYPED=1),
        MemoryPoolType=Enum(WORKSPACE="WORKSPACE"),
        ProfilingVerbosity=Enum(DETAILED="DETAILED"),
        LayerInformationFormat=Enum(JSON="JSON"),
        BuilderFlag=Enum(),  # 11: no FP16/INT8 flags at all
    )
    return trt, calls


def fused_layers(blocks, int8: bool = True) -> list[dict]:
    """Inspector layers of an engine that fused every block, as TensorRT 10 writes them."""
    fmt = "Row major linear Int8 format" if int8 else "Row major linear FP16 format"
    layers = [{"Name": "input_reformat", "LayerType": "Reformat", "Origin": "REFORMAT"}]
    for conv, add, relu in blocks:
        layers.append(
            {
                "Name": f"{conv}.weight + QuantizeLinear + {conv} + {add} + {relu}",
                "LayerType": "CaskConvolution",
                "Inputs": [{"Format/Datatype": fmt}, {"Format/Datatype": fmt}],
                "Outputs": [{"Format/Datatype": fmt}],
                "Weights": {"Type": "Int8" if int8 else "Half"},
            }
        )
    return layers


@pytest.fixture
def resnet20_onnx(tmp_path, tiny_resnet):
    path = tmp_path / "model_fp32.onnx"
    build_deployable(tiny_resnet, "fp32", path, torch.randn(2, 3, 16, 16), show=False)
    return path


def test_residual_blocks_found_in_the_onnx_graph(resnet20_onnx):
    blocks = residual_blocks(onnx.load(str(resnet20_onnx)))
    assert len(blocks) == 9  # ResNet-20: three stages of three basic blocks, each relu(conv + skip)
    ops = {n.name: n.op_type for n in onnx.load(str(resnet20_onnx)).graph.node}
    assert all((ops[c], ops[a], ops[r]) == ("Conv", "Add", "Relu") for c, a, r in blocks)


def test_builder_drives_tensorrt_as_documented(tmp_path, resnet20_onnx):
    blocks = residual_blocks(onnx.load(str(resnet20_onnx)))
    trt, calls = fake_tensorrt(lambda: fused_layers(blocks))
    cache = tmp_path / "tensorrt.timing-cache"
    cache.write_bytes(b"earlier-timings")
    engine = tmp_path / "model_int8.plan"
    built = build_engine(
        resnet20_onnx,
        engine,
        precision="int8",
        batch_sizes=[1, 64],
        max_batch=256,
        timing_cache=cache,
        trt=trt,
        device=lambda: GPU,
    )
    names = [c[0] for c in calls]
    assert ("create_network", 1 << 1) in calls  # STRONGLY_TYPED, from the enum, never a hard-coded bit
    assert ("parse_from_file", str(resnet20_onnx)) in calls
    assert ("config.profiling_verbosity", "DETAILED") in calls  # the inspector needs detailed verbosity
    assert ("create_timing_cache", b"earlier-timings") in calls and ("set_timing_cache", False) in calls
    assert not any(n.startswith("config.int8_calibrator") for n in names)
    # One profile per batch size, each tuned for it, all valid from 1 to the largest batch.
    shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    assert shapes == [
        ("input", (1, 3, 16, 16), (1, 3, 16, 16), (256, 3, 16, 16)),
        ("input", (1, 3, 16, 16), (64, 3, 16, 16), (256, 3, 16, 16)),
    ]
    assert names.count("add_optimization_profile") == 2
    assert names.index("build_serialized_network") > names.index("add_optimization_profile")
    assert engine.read_bytes() == b"plan-bytes" and cache.read_bytes() == b"timing-cache-v2"
    manifest_path, layers_path = companion_paths(engine)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tensorrt"] == "11.1.0" and manifest["compute_capability"] == "9.0"
    assert manifest["gpu"] == "NVIDIA H200" and manifest["precision"] == "int8"
    assert manifest["profiles"][1]["opt"] == [64, 3, 16, 16]
    assert json.loads(layers_path.read_text())["Layers"][1]["LayerType"] == "CaskConvolution"
    assert built.fusion == {**built.fusion, "blocks": 9, "fused": 9, "int8_fused": 9, "passed": True}
    assert built.files == [manifest_path, layers_path]


def test_parse_errors_name_the_node(tmp_path, resnet20_onnx):
    trt, _ = fake_tensorrt(list, parse_ok=False)
    with pytest.raises(EngineBuildError, match=r"QuantizeLinear_7 \(QuantizeLinear\): Assertion failed"):
        build_engine(
            resnet20_onnx,
            tmp_path / "e.plan",
            precision="int8",
            batch_sizes=[1],
            max_batch=8,
            timing_cache=tmp_path / "c",
            trt=trt,
            device=lambda: GPU,
        )
    trt, _ = fake_tensorrt(list, build_ok=False)
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_engine(
            resnet20_onnx,
            tmp_path / "e.plan",
            precision="fp16",
            batch_sizes=[1],
            max_batch=8,
            timing_cache=tmp_path / "c",
            trt=trt,
            device=lambda: GPU,
        )
    assert not (tmp_path / "e.plan").exists()


def test_fusion_check_tells_fused_from_int8(resnet20_onnx):
    blocks = residual_blocks(onnx.load(str(resnet20_onnx)))
    assert check_fusion(fused_layers(blocks), blocks, "int8")["passed"]
    # Same fused names with FP16 formats and a QDQ reformat: fused, but not in INT8.
    fp16 = fused_layers(blocks, int8=False) + [{"Name": "q", "LayerType": "Reformat", "Origin": "QDQ"}]
    result = check_fusion(fp16, blocks, "int8")
    assert result["fused"] == 9 and result["int8_fused"] == 0 and not result["passed"]
    assert check_fusion(fused_layers(blocks, int8=False), blocks, "fp16")["passed"]
    # A block left as a separate conv, add and ReLU.
    conv, add, relu = blocks[4]
    split = [layer for layer in fused_layers(blocks) if add not in layer["Name"]] + [
        {"Name": conv, "LayerType": "CaskConvolution"},
        {"Name": add, "LayerType": "ElementWise"},
        {"Name": relu, "LayerType": "Activation"},
    ]
    result = check_fusion(split, blocks, "int8")
    assert result["not_fused"] == [add] and result["standalone_elementwise"] == [add] and not result["passed"]
    # TensorRT 11's split fields are read too.
    v11 = fused_layers(blocks)
    for layer in v11:
        for t in layer.get("Inputs", []) + layer.get("Outputs", []):
            t["Format"], t["Datatype"] = "Row major linear", t.pop("Format/Datatype").split()[-2]
    assert check_fusion(v11, blocks, "int8")["int8_fused"] == 9


def test_mismatched_engine_is_refused_with_one_line(tmp_path):
    manifest = {"tensorrt": "10.16.0", "compute_capability": "8.0", "gpu": "NVIDIA A100"}
    with pytest.raises(UserError) as e:
        check_compatible(manifest, "11.1.0", GPU, "model_int8.plan")
    assert "built with TensorRT 10.16.0, this machine has 11.1.0" in e.value.one_line()
    assert "\n" not in e.value.one_line()
    with pytest.raises(UserError, match=r"compute capability 8.0 \(NVIDIA A100\), this GPU is 9.0"):
        check_compatible({**manifest, "tensorrt": "11.1.0"}, "11.1.0", GPU, "model_int8.plan")
    check_compatible({**manifest, "tensorrt": "11.1.0", "compute_capability": "9.0"}, "11.1.0", GPU, "m")
    # load_engine reads the manifest beside the engine and refuses before deserializing.
    engine = tmp_path / "model_int8.plan"
    engine.write_bytes(b"plan")
    trt, calls = fake_tensorrt(list)
    with pytest.raises(UserError, match="no manifest"):
        load_engine(engine, trt, device=lambda: GPU)
    companion_paths(engine)[0].write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="TensorRT 10.16.0"):
        load_engine(engine, trt, device=lambda: GPU)
    assert not any(c[0] == "deserialize_cuda_engine" for c in calls)


def test_missing_tensorrt_is_reported_not_failed(monkeypatch):
    monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: None)
    assert "tensorrt is not installed" in trt_rt.missing_reason()


def test_recipe_refuses_tensorrt_export_before_quantize():
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    raw = smoke_recipe(target="tensorrt")
    raw["stages"] = [
        raw["stages"][0],
        {"type": "export", "format": ["tensorrt"]},
        *raw["stages"][1:2],
        raw["stages"][3],
    ]
    with pytest.raises(UserError) as e:
        build_recipe(raw)
    assert "stages.1.format" in e.value.one_line() and "quantize comes after export" in e.value.one_line()


def test_pipeline_ships_fp16_onnx_and_marks_tensorrt_not_built_here(tmp_path, monkeypatch):
    """A run asking for FP16 ONNX and TensorRT engines on a machine without TensorRT completes: the FP16
    file ships with its agreement measured, the engines are reported as not built here."""
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: None)
    raw = smoke_recipe(target="tensorrt")
    raw["stages"][2] = {"type": "export", "format": ["onnx-fp16", "tensorrt"]}
    raw["stages"][3]["backends"] = ["torch", "onnxruntime"]
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    export = report["stages"]["export"]
    assert export["tensorrt"]["status"] == "not built here"
    assert export["tensorrt"]["planned"] == {"fp16": "trt_fp16", "int8": "trt_int8"}
    assert export["onnx_fp16"]["top1_agreement_vs_fp32"] >= 0.99
    fp16 = report["models"]["fp16_onnx"]
    assert fp16["precision"] == "fp16" and fp16["path"] == "deploy/model_fp16.onnx"
    assert fp16["top1_agreement"] >= 0.98
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "deploy/model_fp16.onnx" in json.dumps(manifest)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "TensorRT engines (trt_fp16, trt_int8): not built here — tensorrt is not installed" in md
    assert "Top-1 agreement with the FP32 reference" in md


# --- real engines: only where TensorRT and a GPU exist -------------------------------------------------

needs_tensorrt = pytest.mark.skipif(
    trt_rt.missing_reason() is not None, reason=f"needs TensorRT and a CUDA GPU: {trt_rt.missing_reason()}"
)


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_real_engine_of_resnet20_fuses_and_agrees_with_onnxruntime(tmp_path, tiny_resnet, precision):
    from deploycraft.runtime.ort import OrtRunner
    from deploycraft.runtime.tensorrt import TrtRunner, import_tensorrt

    sample = torch.randn(2, 3, 16, 16)
    fp32 = tmp_path / "model_fp32.onnx"
    build_deployable(tiny_resnet, "fp32", fp32, sample, show=False)
    if precision == "int8":
        from deploycraft.data.transforms import InputSpec

        spec = InputSpec(image_size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        images = torch.randint(0, 256, (128, 3, 16, 16), dtype=torch.uint8)
        source = tmp_path / "model_int8.onnx"
        build_deployable(tiny_resnet, "int8", source, sample, target="tensorrt", calibration=(images, spec), show=False)
    else:
        source = build_fp16_onnx(fp32, tmp_path / "model_fp16.onnx").path
    built = build_engine(
        source,
        tmp_path / f"model_{precision}.plan",
        precision=precision,
        batch_sizes=[1, 64],
        max_batch=256,
        timing_cache=tmp_path / "tensorrt.timing-cache",
        trt=import_tensorrt(),
    )
    assert built.fusion["fused"] == built.fusion["blocks"] == 9, built.fusion
    assert built.fusion["passed"], built.fusion
    runner = TrtRunner(built.path)
    x = torch.randn(256, 3, 16, 16)
    engine_out = runner(runner.prepare(x)).cpu().numpy()
    ort_out = OrtRunner(source)(x.numpy())
    agreement = float((engine_out.argmax(1) == ort_out.argmax(1)).mean())
    assert agreement >= 0.98, agreement
    assert np.isfinite(engine_out).all()
