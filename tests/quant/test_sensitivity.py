"""Per-quantizer sensitivity and fallback: auto. Labels are the float model's own predictions, so float
top-1 is 100 % and every point lost is the quantization's; one layer is made the weak spot (2-bit weights)."""

from __future__ import annotations

import onnx
import pytest
import torch

from deploycraft.config import DataConfig
from deploycraft.data import build_data
from deploycraft.deployables import QuantSettings, build_deployable, check_int8_execution, export_deployable
from deploycraft.quant import sensitivity
from deploycraft.quant.modules import ActQuantizer

WEAK = "layer2.0.conv2"


@pytest.fixture(scope="module")
def data():
    return build_data(DataConfig(dataset="synthetic", image_size=16, channels=3, train_subset=256, val_subset=64))


@pytest.fixture()
def setup(tiny_resnet, data, tmp_path):
    images, _ = data.calibration_images(64)
    built = build_deployable(
        tiny_resnet, "int8", tmp_path / "int8.onnx", data.sample_input(2), target="onnxruntime-cpu",
        settings=QuantSettings(layer_bits=((WEAK, 2),)), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    x, _, _ = sensitivity.training_sample(data, 128, "stages.quantize.fallback")
    with torch.no_grad():
        y = tiny_resnet(x).argmax(1)
    return built, x, y


def test_units_are_every_quantizer_in_forward_order(setup):
    built, _, _ = setup
    us = sensitivity.units(built.module)
    weights = [u.name for u in us if u.kind == "weight"]
    assert weights[0] == "conv1" and weights[-1] == "fc" and WEAK in weights
    acts = [u for u in us if u.kind == "activation"]
    assert len(acts) == sum(isinstance(m, ActQuantizer) for m in built.module.modules())
    assert acts[0].layer is None and all(a.layer for a in acts[1:])


def test_the_weak_layer_ranks_first_and_the_simulation_is_left_as_found(setup):
    built, x, y = setup
    before = built.module(x[:8])
    result = sensitivity.analyse(built.module, x, y)
    assert result["top1_float"] == 1.0 and result["top1_quantized"] < 0.9
    assert len(result["units"]) == len(sensitivity.units(built.module))
    assert sensitivity.ranking(result)[0] == WEAK
    weak = next(r for r in result["units"] if r["unit"] == WEAK)
    assert weak["drop_alone"] > 0.05 and weak["gain_in_float"] > 0.05
    assert torch.equal(built.module(x[:8]), before)


def test_fallback_auto_keeps_the_weak_layer_at_8_bits_and_ends_within_budget(setup, tmp_path):
    built, x, y = setup
    result = sensitivity.analyse(built.module, x, y)
    choice = sensitivity.choose_fallback(built.module, result, x, y, budget=0.03, max_units=8)
    assert choice["chosen"][0] == WEAK and choice["within_budget"]
    assert choice["top1_after"] >= 1.0 - 0.03
    actions = sensitivity.apply_fallback(built.module, choice["chosen"])
    assert actions[0] == {"unit": WEAK, "kind": "weight", "action": "2 -> 8 bits"}
    assert built.module.get_submodule(WEAK).bits == 8


@pytest.mark.parametrize("budget", [0.0, 0.05])
def test_fallback_keeps_the_shortest_prefix_of_the_ranking_found_by_bisection(tiny_resnet, data, tmp_path, budget):
    import math

    images, _ = data.calibration_images(64)
    built = build_deployable(
        tiny_resnet, "int8", tmp_path / "int3.onnx", data.sample_input(2), target="onnxruntime-cpu",
        settings=QuantSettings(weight_bits=3), calibration=(images, data.spec), show=False,
    )  # fmt: skip
    x, _, _ = sensitivity.training_sample(data, 128, "stages.quantize.fallback")
    with torch.no_grad():
        y = tiny_resnet(x).argmax(1)
    before = built.module(x[:8])
    result = sensitivity.analyse(built.module, x, y)
    low = [u.name for u in sensitivity.units(built.module) if u.kind == "weight" and u.module.bits < 8]
    ranked = sensitivity.fallback_order(result, set(low))
    max_units = len(ranked)
    assert max_units >= 6
    choice = sensitivity.choose_fallback(built.module, result, x, y, budget=budget, max_units=max_units)
    step = {s["units"]: s for s in choice["steps"]}
    n = len(choice["chosen"])
    assert choice["chosen"] == ranked[:n]  # a prefix of the ranking
    assert len(choice["steps"]) <= 2 + math.ceil(math.log2(max_units))  # not one evaluation per unit
    assert step[0]["top1"] < 1.0 and step[n]["top1"] == choice["top1_after"]
    assert choice["drop"] == pytest.approx(choice["top1_float"] - choice["top1_after"])
    assert choice["drop_bound"] > choice["drop"] or choice["drop"] == 0  # a bound, above the drop seen
    if choice["within_budget"]:
        assert choice["drop_bound"] <= budget
        if n:  # one unit fewer was tried and is outside the budget
            assert step[n - 1]["drop_bound"] > budget
    else:
        assert n == max_units
    assert torch.equal(built.module(x[:8]), before)  # the choice worked on copies


def test_the_drop_bound_counts_only_the_images_the_two_models_disagree_on():
    right_float = torch.ones(100, dtype=torch.bool)
    right = right_float.clone()
    right[:3] = False  # 3 images right in float only
    assert sensitivity.drop_bound(right_float, right, 0.5) == pytest.approx((0.03, 0.03))
    sd = ((3 - 9 / 100) / 100**2) ** 0.5
    assert sensitivity.drop_bound(right_float, right, 0.95) == pytest.approx((0.03, 0.03 + 1.6449 * sd), abs=1e-4)
    right_float[50:56] = False  # 6 more images on which both are wrong: nothing changes
    right[50:56] = False
    assert sensitivity.drop_bound(right_float, right, 0.95)[1] == pytest.approx(0.03 + 1.6449 * sd, abs=1e-4)
    right[60] = False  # one disagreement each way: no drop, but not sure of it either
    right_float[61] = False
    right[:3] = True
    drop, bound = sensitivity.drop_bound(right_float, right, 0.95)
    assert drop == 0 and bound == pytest.approx(1.6449 * 2**0.5 / 100, abs=1e-4)


def test_a_layer_kept_in_float_exports_and_the_int8_proof_counts_it_out(setup, data, tmp_path):
    built, _, _ = setup
    module = built.module
    sensitivity.apply_fallback(module, [WEAK])  # 2 -> 8 bits first
    sensitivity.apply_fallback(module, [WEAK])  # then float
    assert not module.get_submodule(WEAK).quantize_weight
    path = tmp_path / "fallback.onnx"
    export_deployable(module, "int8", path, data.sample_input(2), "onnxruntime-cpu", ranges=built.ranges)
    proof = check_int8_execution(path, "onnxruntime-cpu", module, tmp_path)
    assert proof["int8_convs"] >= proof["expected_int8_convs"] == proof["convs"] - 1
    inits = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert f"{WEAK}.weight_scale" not in inits


def test_no_training_split_is_one_clear_error(tmp_path):
    from deploycraft.errors import UserError

    data = build_data(DataConfig(dataset="synthetic", image_size=16, channels=3))
    data.train = None
    with pytest.raises(UserError) as e:
        sensitivity.training_sample(data, 10, "stages.quantize.fallback")
    assert e.value.field == "stages.quantize.fallback"


def test_the_quantize_stage_reports_sensitivity_and_fallback_with_costs(tmp_path):
    import json

    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    raw = smoke_recipe(target="onnxruntime-cpu")
    raw["stages"][0]["epochs"] = 4
    raw["stages"][1].update(
        weight_bits=2,
        fallback="auto",
        fallback_budget=0.02,
        fallback_max_layers=3,
        sensitivity_images=64,
        fallback_images=128,
    )
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sens = report["stages"]["quantize"]["targets"]["onnxruntime-cpu"]["sensitivity"]
    assert sens["images"] == 64 and "training split" in sens["source"]
    fb = sens["fallback"]
    assert 1 <= len(fb["chosen"]) <= 3 and [a["unit"] for a in fb["actions"]] == fb["chosen"]
    assert set(fb["costs"]["per_unit"]) == set(fb["chosen"]) and fb["costs"]["batch_sizes"] == [1]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Fallback (auto, budget 2.00 pt)" in md and f"| {fb['chosen'][0]} |" in md
    n = len(fb["chosen"])
    assert n >= 2, "the table's all-together row needs two kept quantizers: make the fixture's budget tighter"
    assert fb["costs"]["group"] == n + 1 and f"timed at most {n + 1} files at a time" in md
    # the file with every kept quantizer, timed too
    assert set(fb["costs"]["all"]["latency_ms"]) == {"1"} and f"| **all {n} together** (the PTQ file" in md
    assert (tmp_path / "run" / sens["plot"]).is_file() and f"]({sens['plot']})" in md


def test_lsq_leaves_the_scales_of_quantizers_kept_in_float_as_buffers(setup):
    """A scale the forward never uses must not become a parameter (DDP would stop on it in QAT)."""
    import torch.nn as nn

    from deploycraft.stages.quantize import _learn_scales

    built, _, _ = setup
    module = built.module
    act = next(u for u in sensitivity.units(module) if u.kind == "activation" and u.layer)
    sensitivity.apply_fallback(module, [WEAK, WEAK, act.name])  # 2 -> 8 bits, then float; the activation float
    _learn_scales(module, True)
    try:
        assert not isinstance(module.get_submodule(WEAK).weight_scale, nn.Parameter)
        assert not isinstance(module.get_submodule(act.name).scale, nn.Parameter)
        assert isinstance(module.get_submodule("layer1.0.conv1").weight_scale, nn.Parameter)
    finally:
        _learn_scales(module, False)


def test_fallback_costs_are_timed_a_few_files_at_a_time_each_against_its_own_base():
    """53 sessions in one process made the flagship's batch-64 costs unreliable: the cost table now times at
    most ``group`` files beside their own run of the file without fallback, the previous group's sessions gone."""
    from types import SimpleNamespace

    from deploycraft.stages.quantize import grouped_costs

    alive = []

    class Session:
        def __init__(self, f):
            self.f = f
            alive.append(f)

        def __del__(self):
            alive.remove(self.f)

    calls = []

    def fake_measure(runners, make_input, batch_sizes, **_):
        assert len(alive) == len(runners) <= 3 + 1 and "none" in runners
        calls.append(list(runners))
        slow = 10.0 * len(calls)  # each group runs on a slower machine than the one before
        return {
            name: {bs: SimpleNamespace(p50=slow * bs + (0 if name == "none" else int(name[1:]))) for bs in batch_sizes}
            for name in runners
        }

    files = {"none": "base.onnx", **{f"u{i}": f"{i}.onnx" for i in range(1, 8)}}
    deltas, base = grouped_costs(Session, files, None, [1, 64], group=3, measure_fn=fake_measure)
    assert [c[1:] for c in calls] == [["u1", "u2", "u3"], ["u4", "u5", "u6"], ["u7"]]
    assert deltas == {f"u{i}": {"1": float(i), "64": float(i)} for i in range(1, 8)}  # against its own group's base
    assert base == {"1": 20.0, "64": 1280.0}  # the median of the groups' bases
    assert alive == []


def test_the_fallback_orders_weights_below_8_bits_by_the_error_each_brings_alone():
    """Beside 8-bit activations, leaving one 4-bit layer in float moves the total error by noise; the error
    it brings alone orders the candidates (the flagship's `layer1.0.downsample.0` came last by the first)."""

    def row(unit, kind, mse_alone, mse_in_float):
        r = {"unit": unit, "kind": kind, "mse_alone": mse_alone, "mse_in_float": mse_in_float}
        return {**r, "drop_alone": 0.0, "gain_in_float": 0.0}

    result = {
        "units": [
            row("act_quant_1", "activation", 900.0, 900.0),
            row("a", "weight", 0.1, 1800.0),
            row("b", "weight", 2.3, 1870.0),
            row("c", "weight", 0.5, 1000.0),
        ]
    }
    assert sensitivity.fallback_order(result, {"a", "b"}) == ["b", "a"]
    # no weights below 8 bits: every quantizer is a candidate, by the error removed when it alone is in float
    assert sensitivity.fallback_order(result, set()) == sensitivity.ranking(result) == ["act_quant_1", "c", "a", "b"]
