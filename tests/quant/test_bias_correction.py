"""Empirical bias correction: after the pass every corrected layer's mean output on the calibration images is the
float model's, the file computes what the corrected simulation computes, and the setting reaches the stage."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.data.transforms import prepare_batch
from deploycraft.deployables import QuantSettings, build_deployable
from deploycraft.models import create_model
from deploycraft.quant.bias_correction import _channel_means, correct_biases, correctable, in_float
from deploycraft.runtime.ort import OrtRunner
from deploycraft.stages.train import TrainConfig, train_epochs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=512, val_subset=128))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    train_epochs(
        model,
        data,
        TrainConfig(epochs=2, batch_size=64, lr=0.05, eval_each_epoch=False),
        tmp_path_factory.mktemp("t"),
        0,
    )
    return model.eval(), data


def _shifts(qmodel, batches, reference):
    """Per layer, the largest per-channel difference of the quantized model's mean output from the float model's
    (``reference``, the model before correction: the correction moves the float model's biases too)."""
    layers = correctable(reference)
    with in_float(reference):
        ref = _channel_means(reference, batches, layers)
    got = _channel_means(qmodel, batches, correctable(qmodel))
    return {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref}


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "openvino-cpu"])
def test_every_corrected_layer_ends_with_the_float_mean(trained, tmp_path, target):
    model, data = trained
    images, _ = data.calibration_images(128)
    batches = [prepare_batch(images[i : i + 64], data.spec) for i in range(0, 128, 64)]
    # 4-bit weights shift the means visibly
    plain = build_deployable(
        model, "int8", tmp_path / "a.onnx", data.sample_input(2), target=target,
        settings=QuantSettings(weight_bits=4), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    before = _shifts(plain.module, batches, plain.module)
    corrected = copy.deepcopy(plain.module)
    removed = correct_biases(corrected, batches, show=False)
    after = _shifts(corrected, batches, plain.module)
    assert set(removed) == set(before) == set(after) and len(after) == 21  # the convs; not the classifier
    assert "fc" not in removed and list(removed)[0] == "conv1"
    assert max(before.values()) > 0.05
    assert max(after.values()) < 0.01, max(after.items(), key=lambda kv: kv[1])
    # the biases moved, nothing else did
    a, b = plain.module.state_dict(), corrected.state_dict()
    assert {k for k in a if not torch.equal(a[k], b[k])} == {f"{n}.bias" for n in removed}


def test_the_file_computes_the_corrected_simulation(trained, tmp_path):
    model, data = trained
    images, _ = data.calibration_images(128)
    settings = QuantSettings(bias_correction=True)
    built = build_deployable(
        model, "int8", tmp_path / "c.onnx", data.sample_input(2), settings=settings,
        calibration=(images, data.spec), show=False,
    )  # fmt: skip
    x = data.sample_input(64)
    with torch.no_grad():
        sim = built.module(x).numpy()
    out = OrtRunner(tmp_path / "c.onnx")(x.numpy())
    assert (sim.argmax(1) == out.argmax(1)).mean() >= 0.98
    assert np.abs(sim - out).max() < 0.05 * np.abs(sim).max()
    plain = build_deployable(
        model, "int8", tmp_path / "p.onnx", data.sample_input(2), calibration=(images, data.spec), show=False
    )
    changed = [k for k, v in plain.module.state_dict().items() if not torch.equal(v, built.module.state_dict()[k])]
    assert changed and all(k.endswith(".bias") for k in changed)


def test_the_recipe_setting_reaches_the_calibration_and_the_report():
    from deploycraft.stages.quantize import QuantizeConfig, QuantizeStage

    assert QuantizeConfig(bias_correction=True).settings_for("onnxruntime-cpu").bias_correction
    assert not QuantizeConfig().settings_for("onnxruntime-cpu").bias_correction
    q = {"calibrator": "percentile", "percentile": 99.99, "calibration": "x", "target": "t", "targets": {}}
    lines = QuantizeStage.report_section({"stages": {"quantize": {**q, "bias_correction": True}}})
    assert "biases corrected for the mean shift of each layer's output" in "\n".join(lines)
    assert "biases corrected" not in "\n".join(QuantizeStage.report_section({"stages": {"quantize": q}}))
