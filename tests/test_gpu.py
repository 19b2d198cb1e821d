"""GPU code paths: training on CUDA through the pipeline, and torch-CUDA timing in verify.

Skipped without a CUDA GPU. Run on a GPU machine with `pytest -m gpu` (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe
from deploycraft.runtime.torch_rt import TorchRunner
from tests.conftest import smoke_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def test_torch_runner_on_cuda_matches_cpu(tiny_resnet):
    x = torch.randn(4, 3, 16, 16)
    cpu = TorchRunner(tiny_resnet)(x)
    gpu = TorchRunner(tiny_resnet, device="cuda")(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_pipeline_trains_on_cuda_and_times_torch_cuda(tmp_path):
    raw = smoke_recipe(device="cuda", data={"train_subset": 1024})
    raw["model"]["kwargs"] = {"zero_init_residual": False}  # identity-initialised blocks learn slower in 96 steps
    raw["stages"][0].update(epochs=3, batch_size=32, lr=0.1)
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    m = report["models"]
    assert "fp32_torch_cuda" in m and m["fp32_torch_cuda"]["latency_ms"]["p50"] > 0
    assert abs(m["fp32_torch_cuda"]["top1"] - m["fp32_torch"]["top1"]) <= 0.01  # same weights, other device
    assert report["hardware"]["gpus"]
    assert m["fp32_torch"]["top1"] > 0.3  # the synthetic task is learnable in three epochs


def test_torchrun_world_of_one_trains_with_nccl(tmp_path):
    """The NCCL path as a smoke test: torchrun with one process on the one GPU (DDP over NCCL, gloo for bytes)."""
    from tests.conftest import write_recipe
    from tests.integration.test_ddp import launch

    raw = smoke_recipe(device="cuda", data={"train_subset": 513})
    raw["stages"][0].update(epochs=2, batch_size=64)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = launch("run", recipe, "--output-dir", tmp_path / "run", nproc=1, env={"OMP_NUM_THREADS": "4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "completed" and status["backend"] == "nccl" and status["world_size"] == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # Trained and evaluated on the GPU, verified on the CPU: the same weights, other kernels.
    assert abs(report["stages"]["train"]["history"][-1]["val_top1"] - report["models"]["fp32_torch"]["top1"]) <= 0.01


def test_fp16_bf16_cuda_graph_runners_agree_with_fp32(tiny_resnet):
    from deploycraft.runtime.torch_gpu import CudaRunner

    x = torch.randn(64, 3, 16, 16)
    ref = TorchRunner(tiny_resnet)(x)
    for precision in ("fp16", "bf16"):
        for graph in (True, False):
            runner = CudaRunner(copy.deepcopy(tiny_resnet), precision, channels_last=True, cuda_graph=graph)
            out = runner(runner.prepare(x)).cpu()
            out2 = runner(runner.prepare(x)).cpu()  # a replay gives the same result
            torch.testing.assert_close(out, out2)
            assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


def test_cuda_events_time_gpu_runners(tiny_resnet):
    from deploycraft.runtime.bench import measure
    from deploycraft.runtime.torch_gpu import CudaRunner

    # CudaRunner casts the module it is given: each runner gets its own copy
    runners = {"fp16": CudaRunner(copy.deepcopy(tiny_resnet), "fp16"), "fp32": TorchRunner(tiny_resnet, "cuda")}
    res = measure(runners, lambda bs: torch.randn(bs, 3, 16, 16), [1, 32], warmup=3, repeats=10, show=False)
    assert all(res[n][bs].p50 > 0 for n in runners for bs in (1, 32))


def test_aoti_fp16_package_on_cuda(tmp_path, tiny_resnet):
    from deploycraft.deployables import build_aoti_package
    from deploycraft.runtime.aoti import AotiRunner

    path = tmp_path / "m.pt2"
    build_aoti_package(
        tiny_resnet, path, torch.randn(2, 3, 16, 16), precision="fp16", device="cuda", channels_last=True
    )
    runner = AotiRunner(path)
    x = torch.randn(64, 3, 16, 16)
    out = runner(runner.prepare(x)).cpu()
    assert out.dtype == torch.float32
    assert (out.argmax(1) == TorchRunner(tiny_resnet)(x).argmax(1)).float().mean() >= 0.95


def test_amp_training_and_gpu_deployables_through_the_pipeline(tmp_path):
    raw = smoke_recipe(device="cuda", data={"train_subset": 1024})
    raw["model"]["kwargs"] = {"zero_init_residual": False}
    raw["stages"][0].update(epochs=2, batch_size=32, lr=0.1, amp="bf16", channels_last=True)
    raw["stages"][2] = {"type": "export", "format": ["onnx-fp16", "aoti"], "aoti_precisions": ["fp16"]}
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["train"]["history"][-1]["amp"] == "bf16"
    m = report["models"]
    for name in ("fp16_torch_cuda", "bf16_torch_cuda", "aoti_fp16", "fp16_onnx"):
        assert m[name]["top1_agreement"] >= 0.95, name
    assert (tmp_path / "run" / "deploy" / "model_fp16.pt2").is_file()


def test_batches_prepared_on_the_gpu_match_the_cpu_batches():
    """Training on CUDA prepares its batches there (resize, crop, flip, normalize): the same images as on the CPU."""
    from deploycraft.data import DataModule
    from deploycraft.data.transforms import Augment
    from deploycraft.recipe import DataConfig

    dm = DataModule(DataConfig(dataset="synthetic", image_size=64, train_subset=70, val_subset=40), seed=3)
    aug = Augment(crop_padding=3, hflip=True)
    pairs = zip(dm.train_epoch(16, 1, aug), dm.train_epoch(16, 1, aug, device="cuda"), strict=True)
    for (x, y), (gx, gy) in pairs:
        assert gx.is_cuda and torch.equal(gy, y)
        torch.testing.assert_close(gx.cpu(), x, rtol=1e-4, atol=1e-4)
    for (x, _), (gx, _) in zip(dm.val_batches(16), dm.val_batches(16, device="cuda"), strict=True):
        torch.testing.assert_close(gx.cpu(), x, rtol=1e-4, atol=1e-4)
