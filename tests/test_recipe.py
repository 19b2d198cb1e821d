"""Recipe schema: valid recipes load, every kind of bad input becomes one UserError naming the field."""

from __future__ import annotations

import pytest

from deploycraft.errors import UserError
from deploycraft.recipe import apply_override, build_recipe, json_schema, load_recipe
from tests.conftest import REPO, smoke_recipe, write_recipe


def test_shipped_recipes_are_valid():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        assert r.stages, path


def test_defaults_fill_in():
    r = build_recipe({"name": "x", "model": {"arch": "resnet20"}, "stages": [{"type": "train"}]})
    assert r.data.dataset == "fashion-mnist"
    assert r.stages[0].epochs == 1 and r.stages[0].momentum == 0.9


def _error(raw) -> UserError:
    with pytest.raises(UserError) as info:
        build_recipe(raw, "r.yaml")
    return info.value


def test_unknown_key_names_the_field():
    raw = smoke_recipe()
    raw["stages"][0]["epoch"] = 3
    err = _error(raw)
    assert err.field == "stages.0.epoch"
    assert "unknown key" in err.message and "remove it" in err.fix


def test_wrong_type_names_the_field():
    raw = smoke_recipe()
    raw["stages"][0]["epochs"] = "three"
    err = _error(raw)
    assert err.field == "stages.0.epochs" and "'three'" in err.message


def test_unknown_model_suggests():
    err = _error(smoke_recipe(model={"arch": "resnet21"}))
    assert err.field == "model.arch" and "resnet20" in err.message


def test_missing_checkpoint(tmp_path):
    err = _error(smoke_recipe(model={"arch": "resnet20", "weights": str(tmp_path / "nope.pt")}))
    assert err.field == "model.weights" and "does not exist" in err.message


def test_missing_imagefolder(tmp_path):
    err = _error(smoke_recipe(data={"dataset": "imagefolder", "root": str(tmp_path / "none")}))
    assert err.field == "data.root"


@pytest.mark.parametrize("in_chans, channels", [(3, 1), (1, 3), (4, 3)])
def test_model_in_chans_must_match_the_data(in_chans, channels):
    err = _error(smoke_recipe(model={"arch": "resnet20", "in_chans": in_chans}, data={"channels": channels}))
    assert err.field == "model.in_chans" and f"data.channels is {channels}" in err.message
    assert build_recipe(smoke_recipe(model={"arch": "resnet20", "in_chans": channels}, data={"channels": channels}))


def test_teacher_in_chans_must_match_the_data(tmp_path):
    weights = tmp_path / "t.pt"
    weights.write_bytes(b"x")
    raw = smoke_recipe(data={"channels": 1})
    teacher = {"arch": "resnet20", "weights": str(weights), "in_chans": 3}
    raw["stages"].insert(1, {"type": "distill", "teacher": teacher})
    err = _error(raw)
    assert err.field == "stages.1.teacher.in_chans" and "data.channels is 1" in err.message


def test_a_teacher_with_a_reset_classifier_is_refused(tmp_path):
    weights = tmp_path / "t.pt"
    weights.write_bytes(b"x")
    raw = smoke_recipe()
    raw["stages"].insert(
        1, {"type": "distill", "teacher": {"arch": "resnet20", "weights": str(weights), "reset_classifier": True}}
    )
    err = _error(raw)
    assert err.field == "stages.1.teacher.reset_classifier" and "teaches nothing" in err.message


@pytest.mark.parametrize("key", ["num_classes", "in_chans", "weights"])
def test_model_fields_are_refused_in_kwargs(key):
    err = _error(smoke_recipe(model={"arch": "resnet20", "kwargs": {key: 5, "shortcut": "A"}}))
    assert err.field == "model.kwargs" and key in err.message and f"model.{key}" in err.fix


@pytest.mark.parametrize("seed", [-(2**40) - 1, 2**40 + 1, 2**64])
def test_seed_is_bounded(seed):
    err = _error(smoke_recipe(seed=seed))
    assert err.field == "seed"
    for ok in (2**40, -1, 202412011200):  # negative and date-like seeds worked before the bound came
        assert build_recipe(smoke_recipe(seed=ok)).seed == ok


def test_stage_order():
    raw = smoke_recipe()
    raw["stages"] = [raw["stages"][1], raw["stages"][0]]
    err = _error(raw)
    assert err.field == "stages.1" and "cannot come after quantize" in err.message and "train ->" in err.fix


def test_verify_must_be_last():
    raw = smoke_recipe()
    raw["stages"] = [raw["stages"][0], raw["stages"][3], raw["stages"][2]]
    assert "cannot come after verify" in _error(raw).message


def test_duplicate_stage():
    raw = smoke_recipe()
    raw["stages"].insert(1, {"type": "train"})
    assert "second train stage" in _error(raw).message


def test_untrained_model_is_rejected():
    raw = smoke_recipe()
    raw["stages"] = raw["stages"][1:]
    err = _error(raw)
    assert err.field == "model.weights" and "untrained" in err.message


@pytest.mark.parametrize("train", [None, {"enabled": False}, {"epochs": 0}])
def test_a_reset_classifier_no_stage_trains_is_rejected(tmp_path, train):
    """A checkpoint's classifier dropped and a new one started, with no training after it: the run would ship
    a classifier at chance."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")  # the schema checks that the file exists; its content is preflight's
    raw = smoke_recipe(model={"weights": str(weights), "reset_classifier": True})
    if train is None:
        del raw["stages"][0]
    else:
        raw["stages"][0].update(train)
    err = _error(raw)
    assert err.field == "model.reset_classifier" and "untrained classifier" in err.message
    assert "train stage" in err.fix


def test_a_reset_classifier_trained_by_train_or_distill_is_accepted(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    raw = smoke_recipe(model={"weights": str(weights), "reset_classifier": True})
    assert build_recipe(raw).model.reset_classifier  # the train stage fine-tunes it
    raw["stages"][0] = {"type": "distill", "epochs": 1, "teacher": {"arch": "resnet20", "weights": str(weights)}}
    assert build_recipe(raw).stages[0].type == "distill"  # distillation from a teacher trains it too
    raw["stages"][:1] = [{"type": "prune", "channel_ratio": 0.2}, {"type": "distill", "epochs": 1}]
    assert _error(raw).field == "model.reset_classifier"  # without a teacher the teacher is that model itself


def test_unknown_stage_type():
    raw = smoke_recipe()
    raw["stages"][1]["type"] = "quantise"
    err = _error(raw)
    assert err.field == "stages.1" and "quantize" in err.fix


def test_literal_choices_listed():
    raw = smoke_recipe(target="coreml")
    err = _error(raw)
    assert err.field == "target" and "tensorrt" in err.fix


def test_quantize_target_moved_to_the_top_level():
    raw = smoke_recipe()
    raw["stages"][1]["target"] = "tensorrt"
    err = _error(raw)
    assert err.field == "stages.1.target" and "top level" in err.fix and "tensorrt" in err.fix


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("name: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "mapping"),
        ("name: x\nname: y\n", "duplicate key"),
        ("name: !!python/object/apply:os.system ['echo pwned']\n", "not allowed"),
        ("model: !!python/name:builtins.print\n", "not allowed"),
    ],
)
def test_bad_yaml(tmp_path, text, needle):
    path = write_recipe(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_by_index_and_type():
    raw = smoke_recipe()
    apply_override(raw, "stages.0.epochs=3")
    apply_override(raw, "stages.quantize.calibrator=max")
    apply_override(raw, "data.image_size=24")
    apply_override(raw, "stages.verify.batch_sizes=[1, 4]")
    apply_override(raw, "model.weights=null")
    r = build_recipe(raw)
    assert r.stages[0].epochs == 3
    assert r.stages[1].calibrator == "max"
    assert r.data.image_size == 24
    assert r.stages[3].batch_sizes == [1, 4]
    assert r.model.weights is None


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("-2e+1", -20.0), ("1.5e3", 1500.0)])
def test_floats_with_an_exponent_are_numbers_in_files_and_overrides(tmp_path, text, value):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and JSON, and users, read it as a number."""
    raw = smoke_recipe(data={"mean": ["M", 0.5, 0.5]})
    path = write_recipe(tmp_path / "r.yaml", raw)
    path.write_text(path.read_text().replace("- M", f"- {text}"))
    assert load_recipe(path).data.mean == [value, 0.5, 0.5]
    raw = smoke_recipe()
    apply_override(raw, f"stages.train.lr={text.lstrip('-')}")
    assert build_recipe(raw).stages[0].lr == abs(value)
    # what is no number stays a string: a name, a version, a hex integer
    for other, expected in (("1e", "1e"), ("e3", "e3"), ("1e3x", "1e3x"), ("0x1e3", 0x1E3), ("12", 12)):
        apply_override(raw, f"description={other}")
        assert raw["description"] == expected


def test_the_run_folder_recipe_reads_back_as_written():
    """A string that looks like such a float (a description '1e3') is quoted in the run folder's recipe.yaml."""
    from deploycraft.recipe import dump_yaml, parse_yaml

    data = {"description": "1e3", "mean": [1e-10, 5e-4], "name": "2.5E-1"}
    assert parse_yaml(dump_yaml(data), "recipe.yaml") == data


@pytest.mark.parametrize(
    "assignment, needle",
    [
        ("stages.9.epochs=1", "out of range"),
        ("stages.prune.amount=1", "no single stage"),
        ("noequals", "has no '='"),
        ("name.sub=1", "is a value"),
    ],
)
def test_bad_overrides(assignment, needle):
    with pytest.raises(UserError, match=needle):
        apply_override(smoke_recipe(), assignment)


def test_override_of_unknown_field_is_rejected_by_schema():
    raw = smoke_recipe()
    apply_override(raw, "stages.train.epochz=2")
    assert _error(raw).field == "stages.0.epochz"


def test_json_schema_documents_every_field():
    schema = json_schema()
    defs = {**schema["$defs"], "Recipe": schema}
    for name, d in defs.items():
        for field, prop in d.get("properties", {}).items():
            if field == "type":
                continue
            assert prop.get("description"), f"{name}.{field} has no description"


def test_recipe_reference_is_current():
    from deploycraft.recipe_docs import render

    assert (REPO / "docs" / "recipe.md").read_text() == render(), (
        "run: python -m deploycraft.recipe_docs > docs/recipe.md"
    )


def test_a_fixed_export_batch_is_refused_with_the_reason():
    """export.dynamic_batch: false always failed at run time (every file is checked at several batch
    sizes): the recipe is refused up front, naming the field."""
    raw = smoke_recipe()
    raw["stages"][2]["dynamic_batch"] = False
    err = _error(raw)
    assert err.field == "stages.2.dynamic_batch" and "fixed batch cannot pass through the chain" in err.message
