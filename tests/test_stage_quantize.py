"""The quantize stage with method: qat inside a run: KD (logits and stage features) and plain-QAT control
reported, the PTQ file kept beside the shipped QAT file, both with one graph, here with 4-bit weights and the
BNs trained live (bn_fold: after); bad QAT settings are one clear error."""

from __future__ import annotations

import json

import onnx
import pytest

from deploycraft.errors import UserError
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe
from tests.conftest import smoke_recipe

QAT_STAGE = {
    "type": "quantize",
    "num_calibration": 64,
    "method": "qat",
    "weight_bits": 4,
    "qat": {
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.005,
        "bn_fold": "after",
        "distill": {"control": True, "feature_weight": 0.5},
    },
}


def _qat_recipe() -> dict:
    raw = smoke_recipe()
    raw["stages"][1] = QAT_STAGE
    return raw


def test_qat_run_reports_kd_and_control(tmp_path):
    out = tmp_path / "run"
    Pipeline(build_recipe(_qat_recipe()), out).execute()
    report = json.loads((out / "report.json").read_text())
    qat = report["stages"]["quantize"]["qat"]
    assert qat["distill"] and qat["teacher"] == "the FP32 model being quantized" and qat["feature_weight"] == 0.5
    for key in ("top1_fp32", "top1_ptq", "top1_qat", "top1_qat_control"):
        assert 0.0 <= qat[key] <= 1.0
    assert [h["epoch"] for h in qat["history"]] == [1] and [h["epoch"] for h in qat["control_history"]] == [1]
    stage = next((out / "stages").glob("*-quantize-*"))
    ptq, shipped = stage / qat["ptq_file"], stage / "model_int8.onnx"
    assert ptq.is_file() and shipped.is_file()
    types = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    assert types(ptq) == types(shipped)
    md = (out / "report.md").read_text()
    assert "QAT: 1 epoch(s)" in md and "plain QAT (control)" in md
    assert qat["bn_fold"] == "after" and qat["live_bn"] == 21 and qat["frozen_bn"] == 0
    assert "BN trained with batch statistics in 21 conv(s) and folded at the end" in md
    assert "QAT with KD (logits and stage features, feature weight 0.5, soft-target weight 0.9, T 4)" in md
    q = report["stages"]["quantize"]
    assert q["weight_bits"]["8"] == ["conv1", "fc"] and len(q["weight_bits"]["4"]) == 20
    assert q["int4_initializers"] >= 20 and "Weights: 4 bits in 20 layer(s)" in md
    h = q["held_out"]
    assert h["images"] == 128 and h["top1_sim"] == pytest.approx(qat["top1_qat"])
    assert h["top1_fp32"] == pytest.approx(qat["top1_fp32"]) and h["sim_vs_deployed"] >= 0.9
    assert all(0.0 <= h[k] <= 1.0 for k in ("fp32_vs_sim", "fp32_vs_deployed", "top1_deployed"))
    assert "top-1 agreement FP32–simulated" in md
    # The shipped 4-bit file ran through verify on ONNX Runtime, its size beside accuracy and latency.
    assert report["models"]["int8_onnx"]["bytes"] == shipped.stat().st_size


def test_qat_settings_are_strict():
    raw = _qat_recipe()
    raw["stages"][1]["qat"]["distill"]["teacher"] = "somebody"
    with pytest.raises(UserError) as err:
        build_recipe(raw)
    assert "stages.1.qat.distill.teacher" in str(err.value) or "qat.distill.teacher" in str(err.value)


def test_auto_leaves_out_a_runtime_but_not_a_recipe_error(tmp_path, monkeypatch):
    """target: auto skips a runtime whose file cannot be built (said in the log), but a UserError (a bad QAT
    setting, a diverged fine-tuning) is the recipe's to fix on every runtime: it ends the run as one error."""
    from deploycraft.runtime import cpu_runtimes
    from deploycraft.stages.quantize import QuantizeStage

    if len(cpu_runtimes()) < 2:
        pytest.skip("needs ONNX Runtime and OpenVINO (target auto builds one file per CPU runtime)")
    real = QuantizeStage._build

    def failing(kind):
        def build(self, ctx, model, target, *args):
            if target == "openvino-cpu":
                raise kind("openvino-cpu cannot take this network")
            return real(self, ctx, model, target, *args)

        return build

    raw = smoke_recipe(target="auto")
    raw["stages"] = raw["stages"][:2]  # train and quantize are enough
    monkeypatch.setattr(QuantizeStage, "_build", failing(RuntimeError))
    out = tmp_path / "a" / "run"  # separate parents: a finished sibling stage would be copied in
    Pipeline(build_recipe(raw), out).execute()
    assert "openvino-cpu: left out of auto" in (out / "log.txt").read_text()
    stage = next((out / "stages").glob("*-quantize-*"))
    assert (stage / "model_int8.onnx").is_file() and not (stage / "model_int8_openvino.onnx").exists()

    monkeypatch.setattr(QuantizeStage, "_build", failing(UserError))
    with pytest.raises(UserError, match="cannot take this network"):
        Pipeline(build_recipe(raw), tmp_path / "b" / "run").execute()


def test_auto_keeps_a_file_whose_other_runtime_cannot_run_it(tmp_path, monkeypatch):
    """target: auto compares each INT8 file on the other CPU runtime too; where that runtime cannot run it
    (OpenVINO and some PyramidNet files), the file stays, checked on its own runtime, and only that pairing
    is recorded as not compared (verify then does not ship it there)."""

    from deploycraft.runtime import cpu_runtimes
    from deploycraft.stages.quantize import QuantizeStage

    if len(cpu_runtimes()) < 2:
        pytest.skip("needs ONNX Runtime and OpenVINO (target auto builds one file per CPU runtime)")

    def cannot(self, ctx, model, qmodel, target, path, runtime, *args):
        raise RuntimeError(f"{runtime}: Argument shapes are inconsistent.")

    raw = smoke_recipe(target="auto")
    raw["stages"] = raw["stages"][:2]
    monkeypatch.setattr(QuantizeStage, "_check_elsewhere", cannot)
    out = tmp_path / "run"
    Pipeline(build_recipe(raw), out).execute()
    stage = next((out / "stages").glob("*-quantize-*"))
    assert (stage / "model_int8.onnx").is_file() and (stage / "model_int8_openvino.onnx").is_file()
    targets = json.loads((out / "report.json").read_text())["stages"]["quantize"]["targets"]
    other = targets["onnxruntime-cpu"]["other_runtimes"]["openvino"]
    assert "Argument shapes are inconsistent" in other["error"] and other["shortfalls"]
    assert "not compared" in (out / "log.txt").read_text()


def test_reduce_range_auto_follows_the_machines_int8_kernels(monkeypatch):
    """auto: 7-bit weights for a CPU target where this machine's INT8 kernels saturate u8 x s8 pair sums
    (x86 without VNNI), 8-bit elsewhere and for TensorRT; explicit values win. The machine's answer joins the
    quantize key, so a run folder moved between such CPUs quantizes again."""
    import deploycraft.stages.quantize as q
    from deploycraft.recipe import build_recipe
    from deploycraft.stages.quantize import QuantizeConfig, QuantizeStage
    from tests.conftest import smoke_recipe

    keys = {}
    for saturates in (True, False):
        monkeypatch.setattr(q, "u8s8_pairs_saturate", lambda s=saturates: s)
        auto = QuantizeConfig()
        assert auto.reduce_range == "auto"
        assert auto.settings_for("onnxruntime-cpu").reduce_range is saturates
        assert auto.settings_for("openvino-cpu").reduce_range is saturates
        assert auto.settings_for("tensorrt").reduce_range is False
        assert QuantizeConfig(reduce_range=False).settings_for("onnxruntime-cpu").reduce_range is False
        assert QuantizeConfig(reduce_range=True).settings_for("tensorrt").reduce_range is True
        recipe = build_recipe(smoke_recipe())
        keys[saturates] = QuantizeStage.derived(recipe, recipe.stage("quantize"))
        explicit = smoke_recipe()
        explicit["stages"][1]["reduce_range"] = True
        recipe = build_recipe(explicit)
        assert "u8s8_pairs_saturate" not in QuantizeStage.derived(recipe, recipe.stage("quantize"))
    assert keys[True] != keys[False]
    with pytest.raises(ValueError):
        QuantizeConfig(reduce_range="sometimes")
