"""The benchmark scripts' own logic (benchmarks/ is not a package: loaded from its file), on stub timings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peers_rounds_visit_the_models_in_a_fresh_order_and_keep_each_models_times(monkeypatch):
    peers = _load("quantizer_peers")
    orders = []

    def fake_measure(runners, make_input, batch_sizes, **_):
        orders.append(list(runners))
        return {n: {b: SimpleNamespace(p50=float(n[1:]) * b) for b in batch_sizes} for n in runners}

    monkeypatch.setattr(peers, "measure", fake_measure)
    runners = {f"m{i}": object() for i in range(1, 7)}
    times = peers.timed_rounds(runners, None, [1, 64], repeats=40)
    assert len(orders) == 20 and orders[0] == list(runners)  # 10 rounds per batch size, the first in order
    assert all(sorted(o) == sorted(runners) for o in orders)
    followers = {o[o.index("m1") + 1] for o in orders if o[-1] != "m1"}
    assert len(followers) > 1  # m1 is not always followed by the same model
    assert times["m3"][64] == [3.0 * 64] * 10  # each model's own times, whatever its place in the round


def test_peers_twin_is_the_shipped_file_on_its_runtime():
    peers = _load("quantizer_peers")
    twin = peers.twin_of
    assert twin({"file": "deploy/model_int8_openvino.onnx", "runtime": "openvino"}) == (
        "deploycraft model_int8_openvino on openvino"
    )
    assert twin({"file": "deploy/model_int8.onnx", "runtime": "onnxruntime"}) == "deploycraft model_int8 on onnxruntime"
    fp32 = {"file": "deploy/model_fp32.onnx", "runtime": "openvino", "openvino_precision_hint": "bf16"}
    assert twin(fp32) == "FP32 on openvino, bf16"
    assert twin({**fp32, "openvino_precision_hint": "f32"}) == "FP32 on openvino"


def test_peers_paired_top1_counts_the_images_only_one_model_gets_right():
    import numpy as np

    peers = _load("quantizer_peers")
    a = np.array([True] * 61 + [False] * 78 + [True] * 500)
    b = np.array([False] * 61 + [True] * 78 + [True] * 500)
    r = peers.mcnemar(a, b)
    assert (r["images"], r["only_first_right"], r["only_second_right"]) == (639, 61, 78)
    assert r["p_value"] == pytest.approx(0.175, abs=0.001)  # exact binomial: 2 P(X <= 61), X ~ B(139, 1/2)
    assert peers.mcnemar(b, a)["p_value"] == r["p_value"]
    assert peers.mcnemar(a, a)["p_value"] == 1.0
    assert peers.mcnemar(np.array([True] * 10), np.array([False] * 10))["p_value"] == pytest.approx(2 / 2**10)


def test_qat_vs_ptq_rows_hold_within_a_tenth_of_a_point(tmp_path):
    qvp = _load("qat_vs_ptq")

    def run(name, ptq, qat, method="qat"):
        d = tmp_path / name
        d.mkdir()
        t = {"qat": {"epochs": 2, "teacher": "the FP32 model", "top1_fp32": 0.92, "top1_ptq": ptq, "top1_qat": qat}}
        t["held_out"] = {"top1_deployed": qat}
        report = {"recipe": name, "stages": {"quantize": {"method": method, "target": "x", "targets": {"x": t}}}}
        (d / "report.json").write_text(json.dumps(report))
        return d

    assert qvp.rows(run("a", 0.9200, 0.9191))[0]["holds"]  # 0.09 points below: within
    assert not qvp.rows(run("b", 0.9200, 0.9189))[0]["holds"]  # 0.11 below
    try:
        qvp.rows(run("c", 0.92, 0.92, method="ptq"))
    except qvp.NoQAT as exc:
        assert "no finished QAT" in str(exc)
    else:
        raise AssertionError("a PTQ run has no QAT row")


def test_agreement_finds_the_quantize_stage_and_the_model_it_quantized(tmp_path):
    agreement = _load("agreement")
    for name, model in (("00-init-a", True), ("01-train-b", True), ("02-prune-c", True), ("03-distill-d", False)):
        (tmp_path / "stages" / name / ("model" if model else "other")).mkdir(parents=True)
        if model:
            (tmp_path / "stages" / name / "model" / "spec.json").write_text("{}")
    (tmp_path / "stages" / "04-quantize-e").mkdir()
    (tmp_path / "stages" / "05-export-f" / "model").mkdir(parents=True)
    (tmp_path / "stages" / "05-export-f" / "model" / "spec.json").write_text("{}")
    qdir, model = agreement.quantized_input(tmp_path)
    assert qdir.name == "04-quantize-e" and model == tmp_path / "stages" / "02-prune-c" / "model"
    (tmp_path / "stages" / "04-quantize-e").rename(tmp_path / "stages" / "04-verify-e")
    with pytest.raises(LookupError, match="no quantize stage"):
        agreement.quantized_input(tmp_path)
