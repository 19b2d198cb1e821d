"""Integration on real data: a Fashion-MNIST subset through the whole chain, the flagship recipe on a
user's ImageFolder and checkpoint by overrides alone, and (marked slow) the full acceptance runs."""

from __future__ import annotations

import json

import pytest
import torch

from deploycraft.models import create_model
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe, load_recipe
from tests.conftest import REPO, needs_fmnist, run_cli
from tests.data.test_datasets import make_imagefolder


@needs_fmnist
def test_fashion_mnist_subset_chain(tmp_path):
    raw = {
        "name": "fmnist_subset",
        # zero_init_residual off: in a run this short (94 steps) identity-initialised blocks learn slower
        "model": {"arch": "resnet20", "num_classes": 10, "kwargs": {"zero_init_residual": False}},
        "data": {"dataset": "fashion-mnist", "image_size": 28, "channels": 1, "train_subset": 3000, "val_subset": 1000},
        "stages": [
            {
                "type": "train",
                "epochs": 1,
                "batch_size": 32,
                "lr": 0.1,
                "warmup_epochs": 0.1,
                "crop_padding": 0,
                "hflip": False,
                "eval_each_epoch": False,
            },
            {"type": "quantize", "num_calibration": 256},
            {"type": "export"},
            {"type": "verify", "batch_sizes": [1, 16], "repeats": 20, "max_accuracy_drop": 0.03},
        ],
    }
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    models = report["models"]
    assert models["fp32_torch"]["top1"] > 0.6  # one short epoch on 3,000 images already learns
    assert abs(models["fp32_onnx"]["top1"] - models["fp32_torch"]["top1"]) <= 0.001
    assert models["fp32_torch"]["top1"] - models["int8_onnx"]["top1"] <= 0.03
    q = report["stages"]["quantize"]
    assert q["int8_conv_fraction"] == 1.0 and "calibration/fashion-mnist-train-512.npz" in q["calibration"]
    assert report["held_out_images"] == 1000


def test_flagship_recipe_on_user_imagefolder_and_checkpoint(tmp_path):
    """Acceptance 3: only --set overrides turn the flagship into a run on the user's data and weights."""
    make_imagefolder(tmp_path / "data", per_class=8, size=40)
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet50_2cls.pth"
    torch.save(create_model("resnet50", num_classes=2).state_dict(), ckpt)  # torchvision key format
    sets = [
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.image_size=32",
        "model.num_classes=2",
        f"model.weights={ckpt}",
        "stages.train.enabled=false",
        "stages.quantize.num_calibration=16",
        "stages.verify.repeats=5",
        "stages.verify.max_accuracy_drop=0.5",  # 16 images: one flipped prediction is 6 points
        "stages.verify.min_speedup=null",
        "stages.verify.ceiling=false",
    ]
    args = ["run", REPO / "recipes" / "resnet50_int8.yaml", "--output-dir", tmp_path / "run"]
    for s in sets:
        args += ["--set", s]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["init"]["source"] == f"checkpoint {ckpt}"
    assert "train" not in report["stages"]
    assert report["held_out_images"] == 16 and report["input"]["channels"] == 3
    assert set(report["models"]) >= {"fp32_torch", "fp32_onnx", "int8_onnx"}  # the flagship's target is auto:
    assert report["target"] == "auto" and report["candidates"]  # every CPU deployable was a candidate
    assert "training split" in report["stages"]["quantize"]["calibration"]
    targets = report["stages"]["quantize"]["targets"]
    if "openvino-cpu" in targets:  # each INT8 file was also compared with its simulation on the other runtime
        for target, other in (("onnxruntime-cpu", "openvino"), ("openvino-cpu", "onnxruntime")):
            assert targets[target]["other_runtimes"][other]["held_out"]["images"] == 16
        int8 = [c for c in report["candidates"] if report["models"][c["name"]]["precision"] == "int8"]
        assert len(int8) == 4 and all("not_shippable" not in c and c["simulation_agreement"] for c in int8)


# --- full acceptance runs (minutes each): `make test-slow` ----------------------------------------


def _report_of(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    Pipeline(recipe, tmp_path / "run").execute()
    return json.loads((tmp_path / "run" / "report.json").read_text())


@pytest.mark.slow
@needs_fmnist
def test_acceptance_flagship_resnet50(tmp_path):
    report = _report_of(REPO / "recipes" / "resnet50_int8.yaml", tmp_path)
    m = report["models"]
    assert report["held_out_images"] == 10_000
    assert m["fp32_torch"]["top1"] >= 0.85
    assert m["fp32_torch"]["top1"] - m["int8_onnx"]["top1"] <= 0.01
    assert m["int8_onnx"]["speedup_vs_fp32_torch"] >= 2.5


@pytest.mark.slow
@needs_fmnist
def test_acceptance_resnet20(tmp_path):
    report = _report_of(REPO / "recipes" / "resnet20_fmnist_int8.yaml", tmp_path)
    m = report["models"]
    assert m["fp32_torch"]["top1"] >= 0.91
    assert m["fp32_torch"]["top1"] - m["int8_onnx"]["top1"] <= 0.003
