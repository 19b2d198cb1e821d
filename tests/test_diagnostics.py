"""Diagnostics: gradient flow, layer responses, skip usage, Highway gates and lesions, on tiny models.

The registry-generated test runs the whole diagnosis on the smallest CIFAR-layout model of every model
class of every registered family; the others check each measurement against a direct computation.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycraft import diagnostics as dg
from deploycraft.models import create_model, list_models, model_info
from deploycraft.models.profile import count_params
from deploycraft.pruning import remove_blocks
from tests.conftest import randomize_bn

SHAPE = (3, 16, 16)
FAMILIES = sorted({model_info(n).family for n in list_models()})


def _batches(n: int = 8, batch: int = 4, shape=SHAPE, seed: int = 0) -> dg.Batches:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n // batch)
    ]


def _model(name: str = "resnet20", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, **kwargs)
    randomize_bn(m)
    return m.eval()


def _smallest_per_class(family: str) -> list[str]:
    """The CIFAR-layout model with the fewest parameters for each model class of ``family`` (built on meta)."""
    best: dict[str, tuple[int, str]] = {}
    for name in list_models(family):
        if model_info(name).input_style != "cifar":
            continue
        with torch.device("meta"):
            m = create_model(name, num_classes=10)
        key, params = type(m).__name__, count_params(m)
        if key not in best or params < best[key][0]:
            best[key] = (params, name)
    return sorted(name for _, name in best.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose_runs_on_every_family(family):
    names = _smallest_per_class(family)
    assert names, f"family {family} has no CIFAR-layout model"
    for name in names:
        model = _model(name)
        batches = _batches(4, 4)
        result = dg.diagnose(model, batches, batches, num_classes=10, gradient_batches=1, show=False)
        json.dumps(result)  # JSON-ready
        (g,) = result["gradient_flow"]
        assert g["label"] == "final" and len(g["layers"]) == sum(
            isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()
        )
        assert all(math.isfinite(r["weight_grad"]) for r in g["layers"])
        assert result["lesion"]["units"], f"{name}: nothing to delete"
        assert all(0 <= u["top1"] <= 1 for u in result["lesion"]["units"])
        assert result["lesion_summary"]["chance"] == pytest.approx(0.1)
        has_adds = any(isinstance(m, dg.ResidualAdd) for m in model.modules())
        assert bool(result["skip_usage"]) == has_adds
        assert all(r["ratio"] >= 0 for r in result["skip_usage"])
        assert bool(result["highway_gates"]) == (family == "highway")


def test_plots_of_two_networks(tmp_path):
    batches = _batches(8, 4, (3, 32, 32))
    results = {
        name: dg.diagnose(
            _model(name),
            batches,
            batches,
            num_classes=10,
            gradient_batches=1,
            snapshots={"init": _model(name)},
            show=False,
        )
        for name in ("resnet20", "highway_conv")
    }
    plots = dg.write_plots(results, tmp_path)
    assert set(plots) == {"gradient_flow", "layer_responses", "skip_usage", "lesion"}
    assert all((tmp_path / f).stat().st_size > 10_000 for f in plots.values())
    assert dg.write_plots({"x": {"num_classes": 10}}, tmp_path / "none") == {}


def test_gradient_flow_matches_autograd_and_leaves_the_model_alone():
    model = _model()
    batches = _batches(8, 4)
    stats = model.bn1.running_mean.clone()
    flow = dg.gradient_flow(model, batches, "x")
    assert torch.equal(model.bn1.running_mean, stats) and not model.training
    # Direct computation: the same network with BN on batch statistics, dropout-free, two batches averaged.
    ref = create_model("resnet20", num_classes=10)
    ref.load_state_dict(model.state_dict())
    ref.train()
    norms = {"conv1": 0.0, "layer2.0.conv2": 0.0, "fc": 0.0}
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for n in norms:
            norms[n] += float(ref.get_submodule(n).weight.grad.norm()) / len(batches)
    rows = {r["name"]: r for r in flow["layers"]}
    for n, v in norms.items():
        assert rows[n]["weight_grad"] == pytest.approx(v, rel=1e-4)
    names = [r["name"] for r in flow["layers"]]
    assert names[0] == "conv1" and names[-1] == "fc" and names.index("layer1.0.conv1") < names.index("layer2.0.conv1")
    assert flow["weight_grad"]["first_last_ratio"] == pytest.approx(
        rows["conv1"]["weight_grad"] / rows["fc"]["weight_grad"]
    )


def test_zero_initialised_branches_have_zero_weight_gradients_but_output_gradients():
    """With every residual branch's last BN at 0 (Goyal et al. 2017) no gradient reaches the branch weights
    at init: they are counted as zero layers, and the output gradients still flow through the skips."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)  # zero_init_residual by default
    flow = dg.gradient_flow(model, _batches(4, 4), "init")
    assert flow["weight_grad"]["zero_layers"] == 18  # conv1 and conv2 of all nine blocks
    assert flow["output_grad"]["zero_layers"] == 18
    rows = {r["name"]: r for r in flow["layers"]}
    assert rows["conv1"]["output_grad"] > 0 and rows["fc"]["output_grad"] > 0
    assert rows["layer3.2.conv2"]["weight_grad"] == 0 and rows["layer3.0.downsample.0"]["weight_grad"] > 0


def test_layer_responses_are_the_std_after_bn():
    model = _model()
    batches = _batches(8, 4)
    rows = dg.layer_responses(model, batches)
    assert len(rows) == 19  # every 3x3 conv of ResNet-20 (stem + 18), the option-B projections are 1x1
    row = next(r for r in rows if r["name"] == "layer2.1.conv2")
    assert row["bn"] == "layer2.1.bn2"
    seen = []
    h = model.layer2[1].bn2.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    assert row["std"] == pytest.approx(float(torch.cat(seen).double().std(unbiased=False)), rel=1e-6)


def test_preact_units_list_only_convs_followed_by_bn():
    rows = dg.layer_responses(_model("preact_resnet20"), _batches(4, 4))
    assert rows and all(r["name"].endswith("conv1") for r in rows)  # conv2 feeds the add directly


def test_skip_usage_is_zero_for_zero_branches_and_matches_the_norms():
    torch.manual_seed(0)
    zero = create_model("resnet20", num_classes=10).eval()  # every branch ends in a BN with weight 0
    assert all(r["ratio"] == 0 for r in dg.skip_usage(zero, _batches(4, 4)))
    model = _model()
    batches = _batches(8, 4)
    rows = dg.skip_usage(model, batches)
    assert [r["name"] for r in rows][:3] == ["layer1.0", "layer1.1", "layer1.2"] and len(rows) == 9
    seen = []
    h = model.layer3[2].add.register_forward_pre_hook(lambda _m, args: seen.append(args))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    ratios = torch.cat([b.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1) for b, s in seen])
    assert rows[-1]["ratio"] == pytest.approx(float(ratios.mean()), rel=1e-6)


def test_highway_gates_start_near_sigmoid_of_the_gate_bias():
    """Srivastava et al. 2015: b_T = -2 makes T close to sigmoid(-2) = 0.12 at init, for every layer."""
    torch.manual_seed(0)
    model = create_model("highway_conv", num_classes=10, gate_bias=-2.0).eval()
    rows = dg.highway_gates(model, _batches(8, 4, (3, 32, 32)))
    assert len(rows) == 6 and all(r["units"] in (32, 64, 128) for r in rows)
    for r in rows:
        assert abs(r["mean"] - 1 / (1 + math.exp(2))) < 0.08
        assert r["unit_mean_min"] <= r["mean"] <= r["unit_mean_max"] and r["units_open"] == 0


def test_deleting_an_identity_block_equals_removing_it():
    model = _model()
    x = torch.randn(4, *SHAPE)
    units = {u.name: u for u in dg.lesion_units(model, x[:2])}
    assert len(units) == 9 and [n for n, u in units.items() if u.downsampling] == ["layer2.0", "layer3.0"]
    assert not units["layer2.0"].identity_skip and units["layer2.1"].identity_skip
    with torch.no_grad(), dg.lesioned(model, units["layer2.1"]):
        lesioned = model(x)
    with torch.no_grad():
        intact = model(x)
        removed = remove_blocks(_model(), ["layer2.1"])(x)
    torch.testing.assert_close(lesioned, removed)
    assert not torch.allclose(lesioned, intact)
    with torch.no_grad():
        torch.testing.assert_close(model(x), intact)  # the hooks are gone


def test_deleting_a_plain_layer_replaces_conv_and_bn_by_the_identity():
    model = _model("plain20")
    x = torch.randn(4, *SHAPE)
    units = dg.lesion_units(model, x[:2])
    assert len(units) == 18 and all(u.kind == "layer" for u in units)  # every 3x3 conv but the stem
    assert [u.name for u in units if u.downsampling] == ["layer2.0.conv1", "layer3.0.conv1"]
    unit = next(u for u in units if u.name == "layer1.1.conv2")
    assert unit.bn == "layer1.1.bn2" and unit.identity_skip
    block = model.layer1[1]
    h = torch.rand(2, 16, 8, 8)  # a block's input is a ReLU output
    with torch.no_grad(), dg.lesioned(model, unit):
        lesioned = block(h)
    with torch.no_grad():
        expected = torch.relu(block.bn1(block.conv1(h)))
    torch.testing.assert_close(lesioned, expected)
    down = next(u for u in units if u.name == "layer2.0.conv1")
    with torch.no_grad(), dg.lesioned(model, down):
        out = model(x)  # the stride-2 16->32 layer becomes subsampling + zero channels
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_lesion_study_and_summary():
    model = _model()
    batches = _batches(16, 8)
    study = dg.lesion_study(model, batches, show=False)
    base = dg.evaluate(model, batches)["top1"]
    assert study["base_top1"] == base and study["images"] == 16 and len(study["units"]) == 9
    for u in study["units"]:
        assert u["drop"] == pytest.approx(base - u["top1"])
    summary = dg.lesion_summary(
        {
            "base_top1": 0.9,
            "units": [
                {"name": f"b{i}", "drop": d, "top1": 0.9 - d, "downsampling": down}
                for i, (d, down) in enumerate(((0.01, False), (0.03, False), (0.02, False), (0.3, True)))
            ],
        },
        10,
    )
    assert summary["non_downsampling"] == {
        "units": 3,
        "median_drop": 0.02,
        "max_drop": 0.03,
        "worst": "b1",
        "min_top1": pytest.approx(0.87),
        "median_top1": pytest.approx(0.88),
    }
    assert summary["downsampling"]["max_drop"] == 0.3 and summary["chance"] == 0.1
    assert "recalibrated" not in summary["non_downsampling"] and "base_top1_recalibrated" not in summary


def _bn_state(model: nn.Module) -> list:
    return [
        (n, m.training, m.momentum, {k: v.clone() for k, v in m.state_dict().items()})
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]


def test_recalibrated_bn_averages_the_batches_keeps_dropout_off_and_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.9), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[2].momentum = 0.3
    calib = _batches(12, 4)
    before = _bn_state(model)
    with dg.recalibrated_bn(model, calib) as m:
        assert not any(x.training for x in m.modules())  # evaluated in eval mode
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in calib])
        torch.testing.assert_close(model[2].running_mean, means.mean(0))  # equal batches: the plain mean
        var = torch.stack([model[0](x).var((0, 2, 3), unbiased=True) for x, _ in calib]).mean(0)
        torch.testing.assert_close(model[2].running_var, var)  # dropout was off: the conv's output itself
    after = _bn_state(model)
    assert [(n, t, mom) for n, t, mom, _ in after] == [(n, t, mom) for n, t, mom, _ in before]
    for (_, _, _, a), (_, _, _, b) in zip(after, before, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    model.train()
    with dg.recalibrated_bn(model, calib):
        pass
    assert all(x.training for x in model.modules())  # modes restored as they were, train included


def test_recalibrated_bn_weighs_each_image_alike():
    """A short last batch counts by its images: the re-estimated mean is the mean over all images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gen = torch.Generator().manual_seed(1)
    full, short = torch.randn(8, 3, 16, 16, generator=gen), torch.randn(1, 3, 16, 16, generator=gen) + 5
    with dg.recalibrated_bn(model, [(full, torch.zeros(8)), (short, torch.zeros(1))]):
        expected = model[0](torch.cat([full, short])).mean((0, 2, 3))
        torch.testing.assert_close(model[1].running_mean, expected)


def test_lesion_study_with_bn_recalibration_matches_a_direct_computation():
    import copy

    model = _model()
    batches = _batches(16, 8)
    calib = _batches(24, 8, seed=1)
    state = copy.deepcopy(model.state_dict())
    study = dg.lesion_study(model, batches, show=False, recalibrate=calib)
    for k, v in model.state_dict().items():  # the model is left as it was
        torch.testing.assert_close(v, state[k])
    assert study["recalibration_images"] == 24

    def direct(unit=None):
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        ref.train()
        with torch.no_grad(), dg.lesioned(ref, unit) if unit is not None else contextlib.nullcontext():
            for x, _ in calib:
                ref(x)
            return dg.evaluate(ref, batches)["top1"]

    assert study["base_top1_recalibrated"] == direct()
    units = dg.lesion_units(model, batches[0][0][:2])
    for u, row in zip(units, study["units"], strict=True):
        assert row["top1_recalibrated"] == direct(u)
        assert row["drop_recalibrated"] == pytest.approx(study["base_top1_recalibrated"] - row["top1_recalibrated"])
        assert row["top1"] == pytest.approx(study["base_top1"] - row["drop"])
    # Re-estimating the (randomised) BN statistics changes what the deletions cost: a second measurement.
    assert any(r["top1_recalibrated"] != r["top1"] for r in study["units"])
    summary = dg.lesion_summary(study, 10)
    rec = summary["non_downsampling"]["recalibrated"]
    rows = [r for r in study["units"] if not r["downsampling"]]
    assert rec["units"] == len(rows) and rec["max_drop"] == max(r["drop_recalibrated"] for r in rows)
    assert summary["base_top1_recalibrated"] == study["base_top1_recalibrated"]


def test_compare_counts_layers_with_smaller_responses():
    def fake(stds, train_top1):
        return {
            "train": {"top1": train_top1, "loss": 1.0},
            "held_out": {"top1": 0.5},
            "layer_responses": [{"std": s} for s in stds],
            "gradient_flow": [
                {
                    "label": "init",
                    "weight_grad": {"span": 3.0, "first_last_ratio": 2.0},
                    "output_grad": {"span": 4.0, "first_last_ratio": 1.0},
                }
            ],
        }

    out = dg.compare({"resnet": fake([1, 2, 3, 4], 0.9), "plain": fake([2, 1, 4, 5], 0.8)})
    assert out["responses_smaller"] == [{"a": "resnet", "b": "plain", "layers": 4, "a_smaller": 3, "fraction": 0.75}]
    assert out["training_error"] == {"resnet": pytest.approx(0.1), "plain": pytest.approx(0.2)}
    assert out["gradient_span_at_init"]["plain"]["weight_grad"] == 3.0


def test_take_images_cuts_the_last_batch():
    got = dg.take_images(iter(_batches(16, 4)), 10)
    assert [len(y) for _, y in got] == [4, 4, 2]


def test_a_skipped_recalibration_is_recorded_with_the_lesion_only():
    batches = _batches(n=4)
    why = "no training split to re-estimate the BN statistics on"
    lesion = dg.diagnose(
        _model(), batches, batches, num_classes=10, analyses=("lesion",), show=False, recalibration_skipped=why
    )
    assert lesion["lesion_recalibration_skipped"] == why and "top1_recalibrated" not in lesion["lesion"]["units"][0]
    other = dg.diagnose(
        _model(), batches, batches, num_classes=10, analyses=("skip",), show=False, recalibration_skipped=why
    )
    assert "lesion_recalibration_skipped" not in other
