"""Tests generated from the registry: every registered model builds, trains, is deterministic in
eval, exports to ONNX without BatchNormalization and matches torch on ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

from deploycraft.models import create_model, list_models, model_info
from deploycraft.models.profile import count_params
from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.quant.graph import fold_bn
from deploycraft.runtime.ort import OrtRunner
from tests.conftest import randomize_bn, run_cli

ALL = list_models()
# Exporting and checking these takes tens of seconds each; they run with `-m slow`.
HEAVY_SUFFIXES = (
    "1001",
    "101_64x4d",
    "101_32x8d",
    "101_2",
    "50_2",
    "152",
    "29_16x64d",
    "29_8x64d",
    "_190_40",
    "_250_24",
    "densenet161",
    "densenet201",
    "_a270",
    "272_a200_bottleneck",
    "2x96d",
    "wrn_28_10",
)
HEAVY = {n for n in ALL if n.endswith(HEAVY_SUFFIXES)}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10)


def _input(name: str, batch: int = 2) -> torch.Tensor:
    # 32 px is enough for every stem (ImageNet layouts reduce it to 1x1 in the last stage).
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _maybe_slow(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.mark.parametrize("name", _maybe_slow(ALL))
def test_forward_backward(name):
    model = _build(name).train()
    out = model(_input(name))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", _maybe_slow(ALL))
def test_eval_is_deterministic(name):
    model = _build(name).eval()
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", _maybe_slow(ALL))
def test_onnx_export_without_batchnorm_matches_torch(name, tmp_path):
    model = _build(name).eval()
    randomize_bn(model)
    x = _input(name, batch=3)
    path = tmp_path / f"{name}.onnx"
    export_onnx(fold_bn(model), x[:2], path)
    assert op_counts(path).get("BatchNormalization", 0) == 0
    with torch.no_grad():
        ref = model(x).numpy()
    assert relative_error(OrtRunner(path)(x.numpy()), ref) < 1e-4


def test_models_command_lists_every_model():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == set(ALL)
    for name in ALL:
        assert " M" in rows[name] and rows[name].rstrip().endswith("G")
    assert "25.56 M" in rows["resnet50"] and "4.089 G" in rows["resnet50"]  # torchvision's ResNet-50


def test_registry_entries_have_family_and_style():
    for name in ALL:
        info = model_info(name)
        assert info.family and info.input_style in ("imagenet", "cifar")
        with torch.device("meta"):  # construction only: no weights initialised
            assert count_params(create_model(name, num_classes=10)) > 0
