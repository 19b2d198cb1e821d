"""The diagnose stage: its place in the chain, its run-folder outputs and report section, its cache."""

from __future__ import annotations

import json

import pytest

from deploycraft.errors import UserError
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import ORDER_TEXT, build_recipe
from deploycraft.stages.diagnose import initial_model
from tests.conftest import smoke_recipe

DIAGNOSE = {"type": "diagnose", "images": 64, "train_images": 64, "gradient_batches": 2, "batch_size": 32}


def _recipe(*stages):
    return smoke_recipe(
        stages=[{"type": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "eval_each_epoch": False}, *stages]
    )


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose") / "run"
    ctx = Pipeline(build_recipe(_recipe(DIAGNOSE)), out).execute()
    return ctx, out


def test_the_stage_stands_between_train_and_prune():
    assert "train -> diagnose -> prune" in ORDER_TEXT
    build_recipe(_recipe(DIAGNOSE, {"type": "prune", "channel_ratio": 0.2}))
    with pytest.raises(UserError, match="diagnose cannot come after prune"):
        build_recipe(_recipe({"type": "prune", "channel_ratio": 0.2}, DIAGNOSE))
    raw = _recipe(DIAGNOSE)
    raw["stages"].reverse()
    with pytest.raises(UserError, match="train cannot come after diagnose"):
        build_recipe(raw)


@pytest.mark.parametrize(
    "change, match",
    [({"analyses": ["lesions"]}, "stages.1.analyses.0"), ({"images": 0}, "stages.1.images"), ({"extra": 1}, "extra")],
)
def test_config_is_strict(change, match):
    with pytest.raises(UserError, match=match.replace(".", r"\.")):
        build_recipe(_recipe({**DIAGNOSE, **change}))


def test_recalibration_batches_join_a_lone_last_image_and_say_when_they_cannot_be():
    from types import SimpleNamespace

    import torch

    from deploycraft.stages.diagnose import DiagnoseConfig, recalibration_batches

    def epoch(batch_size, epoch, augment):
        for _ in range(3):
            yield torch.zeros(batch_size, 1, 4, 4), torch.zeros(batch_size, dtype=torch.long)

    data = SimpleNamespace(num_train=100, train_epoch=epoch)
    batches, why = recalibration_batches(data, DiagnoseConfig(batch_size=4, lesion_recalibration_images=9))
    assert [len(y) for _, y in batches] == [4, 5] and why is None  # 4 + 4 + 1: the single image joins
    batches, _ = recalibration_batches(data, DiagnoseConfig(batch_size=4, lesion_recalibration_images=10))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert recalibration_batches(data, DiagnoseConfig(batch_size=4)) == (None, None)
    none, why = recalibration_batches(
        SimpleNamespace(num_train=0), DiagnoseConfig(batch_size=4, lesion_recalibration_images=8)
    )
    assert none is None and "no training split" in why
    with pytest.raises(ValueError, match="at least 2 images"):
        DiagnoseConfig(lesion_recalibration_images=1)
    with pytest.raises(ValueError, match="leave out"):
        DiagnoseConfig(analyses=["skip"], lesion_recalibration_images=8)


def test_a_skipped_recalibration_is_reported():
    from deploycraft.stages.diagnose import DiagnoseStage

    d = {
        "arch": "resnet20",
        "train": {"top1": 0.5, "loss": 1.0, "images": 8},
        "held_out": {"top1": 0.5, "images": 8},
        "train_source": "held-out split (no training split)",
        "lesion": {"units": [{"kind": "block"}]},
        "lesion_summary": {
            "base_top1": 0.5,
            "chance": 0.1,
            "non_downsampling": {"units": 0},
            "downsampling": {"units": 0},
        },
        "lesion_recalibration_skipped": "no training split to re-estimate the BN statistics on",
    }
    text = "\n".join(DiagnoseStage.report_section({"stages": {"diagnose": d}}))
    assert "asked for but not measured: no training split" in text and 'BN re-estimated"' not in text


def test_outputs_report_and_plots(diagnosed):
    ctx, out = diagnosed
    report = json.loads((out / "report.json").read_text())
    d = report["stages"]["diagnose"]
    assert d["arch"] == "resnet20" and d["held_out"]["images"] == 64 and d["train"]["images"] == 64
    assert [g["label"] for g in d["gradient_flow"]] == ["init", "final"]
    assert d["gradient_flow"][0]["images"] == 64  # two batches of 32
    assert len(d["layer_responses"]) == 19 and len(d["skip_usage"]) == 9 and d["highway_gates"] == []
    assert len(d["lesion"]["units"]) == 9 and d["lesion_summary"]["downsampling"]["units"] == 2
    (stage_dir,) = (out / "stages").glob("*-diagnose-*")
    assert json.loads((stage_dir / "diagnose.json").read_text())["lesion"] == d["lesion"]
    md = (out / "report.md").read_text()
    assert "## Diagnosis" in md and "Lesion study" in md and "| init |" in md
    # No verify stage: the models section says so instead of a table of unmeasured rows.
    assert "Not measured: this run has no verify stage" in md and "nan" not in md
    assert set(d["plots"]) == {"gradient_flow", "layer_responses", "skip_usage", "lesion"}
    for path in d["plots"].values():
        assert f"]({path})" in md and (out / path).stat().st_size > 10_000
    # The model passes on unchanged: the current model is still the train stage's.
    assert ctx.model_dir == ctx.stage_dirs["train"] / "model"


def test_init_snapshot_is_the_init_stage_model(diagnosed):
    """Gradient flow "at initialisation" is measured on the same weights the init stage started from."""
    import torch

    from deploycraft.models.io import load_model, read_spec

    ctx, _ = diagnosed
    init_dir = ctx.stage_dirs["init"] / "model"
    rebuilt = initial_model(read_spec(init_dir), ctx.recipe.seed)
    started = load_model(init_dir)
    for (k, a), b in zip(rebuilt.state_dict().items(), started.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert initial_model({"arch": "resnet20", "kwargs": {}, "widths": {"fc": {}}}, 0) is None


def test_changing_only_the_diagnosis_reruns_only_it(diagnosed, tmp_path):
    _, out = diagnosed
    Pipeline(build_recipe(_recipe({**DIAGNOSE, "analyses": ["skip"]})), out).execute()
    status = json.loads((out / "run.json").read_text())
    ran = {s["type"]: s["cached"] for s in status["stages"]}
    assert ran == {"init": True, "train": True, "diagnose": False}
    d = json.loads((out / "report.json").read_text())["stages"]["diagnose"]
    assert "lesion" not in d and "gradient_flow" not in d and len(d["skip_usage"]) == 9
    assert set(d["plots"]) == {"skip_usage"}
