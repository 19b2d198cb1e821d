"""The deployables for GPUs that CI can check on the CPU: the FP16 ONNX on ONNX Runtime, the AOTInductor
package compiled for the CPU (and run by torch alone, without deploycraft's model code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from deploycraft.deployables import FP16_MAX, build_aoti_package, build_deployable, build_fp16_onnx
from deploycraft.onnx_io import relative_error
from deploycraft.runtime.aoti import AotiRunner, package_device
from deploycraft.runtime.ort import OrtRunner


def _tiny_net() -> nn.Module:
    """A residual block and a head: the smallest model whose AOTInductor compile covers conv, add, ReLU,
    pooling and a linear layer (a ResNet-20 costs minutes of C++ compilation on 2 busy cores)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(self.bn(self.conv(x)) + x)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Block()
    from tests.conftest import randomize_bn

    randomize_bn(model)
    return model.eval()


def test_fp16_onnx_agrees_with_fp32_on_onnxruntime(tmp_path, tiny_resnet):
    fp32 = tmp_path / "m.onnx"
    build_deployable(tiny_resnet, "fp32", fp32, torch.randn(2, 3, 16, 16), show=False)
    built = build_fp16_onnx(fp32, tmp_path / "m16.onnx")
    proto = onnx.load(str(built.path))
    # FP32 in and out, FP16 weights inside: the file is half the size and runs where the FP32 file runs.
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert built.fp16_initializers >= 21  # every conv of ResNet-20 and the classifier
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims for t in proto.graph.initializer)
    assert built.path.stat().st_size < 0.6 * fp32.stat().st_size
    x = torch.randn(128, 3, 16, 16).numpy()
    ref, got = OrtRunner(fp32)(x), OrtRunner(built.path)(x)
    assert got.dtype == np.float32
    assert relative_error(got, ref) < 5e-3
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_fp16_onnx_keeps_weights_beyond_fp16_range_in_fp32(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e6  # casting it would make it inf
    fp32 = tmp_path / "big.onnx"
    build_deployable(model, "fp32", fp32, torch.randn(2, 3, 4, 4), show=False)
    built = build_fp16_onnx(fp32, tmp_path / "big16.onnx")
    assert len(built.fp32_nodes) == 1 and "Conv" in built.fp32_nodes[0]
    x = torch.rand(2, 3, 4, 4).numpy() * 1e-3
    got, ref = OrtRunner(built.path)(x), OrtRunner(fp32)(x)
    assert np.isfinite(got).all() and np.abs(ref).max() > FP16_MAX / 1e3
    assert relative_error(got, ref) < 1e-2


def test_aoti_package_builds_runs_and_matches_torch_on_cpu(tmp_path):
    model = _tiny_net()
    path = tmp_path / "model_fp32.pt2"
    built = build_aoti_package(
        model,
        path,
        torch.randn(2, 3, 8, 8),
        max_batch=16,
        metadata={"deploycraft.arch": "t", "deploycraft.input": {"channels": 3, "image_size": 8}},
    )
    assert path.is_file() and package_device(path) == "cpu"
    from deploycraft.runtime.aoti import check_loads

    check_loads(path)  # the child-process load (done for CUDA packages) passes for a package that loads
    assert not list(tmp_path.glob(".*")), "no temporary files left beside the package"
    runner = AotiRunner(path)
    meta = runner.model.get_metadata()
    assert meta["deploycraft.precision"] == "fp32" and meta["deploycraft.arch"] == "t"
    for bs in (1, 5, 16):  # the batch dimension is dynamic
        x = torch.randn(bs, 3, 8, 8)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(runner(runner.prepare(x)), ref, rtol=1e-4, atol=1e-5)
    assert built.compile_seconds > 0

    # deploycraft bench times the package beside ONNX files (input shape from the package's metadata).
    from deploycraft.benchmarking import bench_onnx

    text, results = bench_onnx([path], [1, 2], threads=1, repeats=3, warmup=1)
    assert results["input"] == [3, 8, 8] and f"{path} @torch-aoti:cpu" in results["results"]

    # A fresh interpreter with torch alone (no deploycraft on the path) loads and runs the package.
    np.save(tmp_path / "x.npy", torch.randn(3, 3, 8, 8).numpy())
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, torch, torch._inductor
        sys.path = [p for p in sys.path if p not in ("", {str(os.getcwd())!r})]
        model = torch._inductor.aoti_load_package({str(path)!r})
        out = model(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
        assert not any(m.startswith("deploycraft") for m in sys.modules)
        np.save({str(tmp_path / "y.npy")!r}, out.numpy())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        ref = model(torch.from_numpy(np.load(tmp_path / "x.npy"))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-4, atol=1e-5)


def test_cuda_package_refused_without_gpu(tmp_path, monkeypatch):
    """A package compiled for CUDA is refused with one line on a machine without a GPU."""
    import zipfile

    from deploycraft.errors import UserError
    from deploycraft.runtime import aoti

    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/data/aotinductor/model/x.wrapper_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cuda"}))
    assert package_device(path) == "cuda"
    monkeypatch.setattr(aoti.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="compiled for cuda"):
        aoti.load_package(path)


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"the loader crashed \(SIGSEGV\)"),
        ("raise RuntimeError('the archive is not a package')", "the loader failed: RuntimeError: the archive is"),
    ],
)
def test_a_package_the_loader_cannot_load_is_one_clear_error(tmp_path, monkeypatch, check, message):
    """Seen on an H200 (torch 2.11, CUDA 13): aoti_load_package crashed the process. The load is tried in a
    child process first, so a crash becomes one error naming the file, not the end of the run."""
    from deploycraft.errors import UserError
    from deploycraft.runtime import aoti

    monkeypatch.setattr(aoti, "LOAD_CHECK", check)
    with pytest.raises(UserError, match=message) as info:
        aoti.check_loads(tmp_path / "model_fp16.pt2")
    assert "model_fp16.pt2 cannot be loaded by torch" in str(info.value)


def test_aoti_resnet20_package_matches_torch(tmp_path, tiny_resnet):
    """ResNet-20 compiled into a CPU package (issue 11, acceptance 1: in CI). About 26 s with an empty Inductor
    cache on a quiet 2-core machine (several minutes when the cores are shared), so it is in the default run."""
    path = tmp_path / "resnet20.pt2"
    build_aoti_package(tiny_resnet, path, torch.randn(2, 3, 16, 16), max_batch=64)
    runner = AotiRunner(path)
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = tiny_resnet(x)
    got = runner(runner.prepare(x))
    assert relative_error(got.numpy(), ref.numpy()) < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_mixed_precision_training_is_refused_on_the_cpu(tmp_path, tiny_resnet):
    from deploycraft.errors import UserError
    from deploycraft.stages.train import TrainConfig, train_epochs

    for field in ("amp", "channels_last"):
        cfg = TrainConfig(**{field: "bf16" if field == "amp" else True})
        with pytest.raises(UserError) as e:
            train_epochs(tiny_resnet, None, cfg, tmp_path, 0, device="cpu")
        assert f"stages.train.{field}" in e.value.one_line()


def test_a_loader_that_never_answers_is_one_clear_error(tmp_path, monkeypatch):
    from deploycraft.errors import UserError
    from deploycraft.runtime import aoti

    monkeypatch.setattr(aoti, "LOAD_CHECK", "import time; time.sleep(30)")
    with pytest.raises(UserError, match="did not end within 1 s"):
        aoti.check_loads(tmp_path / "m.pt2", timeout=1.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_only_cuda_packages_are_loaded_in_a_child_process_first(tmp_path, monkeypatch, device):
    from deploycraft.runtime import aoti

    checked = []
    monkeypatch.setattr(aoti, "package_device", lambda path: device)
    monkeypatch.setattr(aoti.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(aoti, "check_loads", lambda path: checked.append(path))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: "loaded")
    assert aoti.load_package(tmp_path / "m.pt2") == "loaded"
    assert checked == ([tmp_path / "m.pt2"] if device == "cuda" else [])


def test_a_package_this_torch_cannot_load_is_not_shipped_and_the_run_goes_on(tmp_path, monkeypatch):
    """The export stage records the package as not loadable, removes the file, and the chain goes on: the
    ONNX deployables are still verified (what happened to the H200's CUDA packages, here with stand-ins)."""
    import torch._inductor  # noqa: F401 - the stand-in below replaces its loader

    from deploycraft.deployables import BuiltPackage
    from deploycraft.errors import UserError
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import build_recipe
    from deploycraft.runtime import aoti
    from deploycraft.stages import export as export_stage
    from tests.conftest import smoke_recipe

    def fake_build(model, path, sample, *, precision, device, max_batch, channels_last, metadata):
        path.write_bytes(b"not a package")
        return BuiltPackage(path, precision, device, max_batch, 0.1, {})

    class Unloadable:
        def __init__(self, path):
            raise UserError(f"{path} cannot be loaded by torch on this machine: the loader crashed (SIGSEGV)")

    monkeypatch.setattr(export_stage, "build_aoti_package", fake_build)
    monkeypatch.setattr(aoti, "AotiRunner", Unloadable)
    raw = smoke_recipe()
    raw["stages"][2] = {"type": "export", "format": ["onnx", "aoti"], "aoti_device": "cpu"}
    run = tmp_path / "run"
    Pipeline(build_recipe(raw), run).execute()
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "passed"
    a = report["stages"]["export"]["aoti"]["fp32"]
    assert a["status"] == "not loadable here" and "SIGSEGV" in a["reason"]
    assert not list(run.rglob("*.pt2")) and "aoti_fp32" not in report["models"]
    assert "int8_onnx" in report["models"]  # the rest of the chain was verified
    assert "AOTInductor fp32 package for cpu: not shipped" in (run / "report.md").read_text()


def test_a_package_is_loaded_in_a_child_process_once_per_run(tmp_path, monkeypatch):
    """Export checks a CUDA package when it builds it and verify loads the same file again: one child load."""
    import subprocess

    from deploycraft.runtime import aoti

    path = tmp_path / "model_fp16.pt2"
    path.write_bytes(b"package")
    calls = []
    monkeypatch.setattr(aoti, "_LOADED", set())
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", "")
    )
    aoti.check_loads(path)
    aoti.check_loads(path)
    assert len(calls) == 1
    path.write_bytes(b"another package")  # rewritten (size and time change): loaded again
    aoti.check_loads(path)
    assert len(calls) == 2


def test_export_key_holds_the_batch_the_aoti_package_serves():
    """The AOTInductor package (and TensorRT profile) are built for the verify stage's largest batch: a new
    batch size there must re-run export when those formats are asked for, and only then."""
    from deploycraft.recipe import build_recipe
    from deploycraft.stages.export import ExportStage
    from tests.conftest import smoke_recipe

    def derived(fmt, batch_sizes, max_batch=None):
        raw = smoke_recipe()
        export = next(s for s in raw["stages"] if s["type"] == "export")
        export.update(format=fmt, max_batch=max_batch)
        next(s for s in raw["stages"] if s["type"] == "verify")["batch_sizes"] = batch_sizes
        recipe = build_recipe(raw)
        return ExportStage.derived(recipe, recipe.stage("export"))

    eval_batch = build_recipe(smoke_recipe()).stage("verify").eval_batch_size
    assert derived("onnx", [1, 8]) == derived("onnx", [1, 1024]) == {}
    assert derived(["onnx", "aoti"], [1, 8]) == {"max_batch": max(8, eval_batch)}
    assert derived(["onnx", "aoti"], [1, 1024]) == {"max_batch": 1024}
    assert derived(["onnx", "aoti"], [1, 1024], max_batch=16) == {"max_batch": 16}
    trt = derived(["onnx", "tensorrt"], [1, 4096])
    assert trt == {"max_batch": 4096, "trt_batch_sizes": [1, 4096]}
    assert derived(["onnx", "tensorrt"], [4096, 1, 1]) == trt  # the same profile, the same key
