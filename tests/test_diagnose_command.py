"""`deploycraft diagnose`: run folders and recipes, reuse of the diagnose stage, checkpoints, comparisons,
and one-line errors. The CLI runs in-process (typer's CliRunner over the real app)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploycraft.cli import app
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe
from tests.conftest import REPO, smoke_recipe, write_recipe

TRAIN = {"type": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "eval_each_epoch": False}
SMALL = ["--images", "32", "--train-images", "32", "--batch-size", "16", "--gradient-batches", "1"]


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc") / "run"
    diag = {"type": "diagnose", "images": 32, "train_images": 32, "gradient_batches": 1, "batch_size": 16}
    Pipeline(build_recipe(smoke_recipe(stages=[TRAIN, diag])), out).execute()
    return out


def test_run_folder_reuses_its_diagnose_stage(run_dir):
    code, stdout, stderr = _invoke("diagnose", run_dir)
    assert code == 0, stderr
    out = run_dir / "diagnose"
    record = json.loads((out / "diagnose.json").read_text())
    (target,) = record["targets"].values()
    assert "the run's diagnose stage" in target["source"] and target["settings"]["images"] == 32
    stage = json.loads((run_dir / "report.json").read_text())["stages"]["diagnose"]
    assert target["result"]["lesion"] == stage["lesion"]
    assert set(record["plots"]) == {"gradient_flow", "layer_responses", "skip_usage", "lesion"}
    assert all((out / f).is_file() for f in record["plots"].values())
    assert "Lesion study" in stdout and (out / "diagnose.md").read_text() in stdout
    assert record["comparison"] is None


def test_checkpoint_adds_its_epoch_to_the_gradient_flow(run_dir, tmp_path):
    (ckpt,) = (run_dir / "stages").glob("*-train-*/checkpoint.pt")
    code, _, stderr = _invoke("diagnose", run_dir, "-c", ckpt, "-o", tmp_path / "out")
    assert code == 0, stderr
    (target,) = json.loads((tmp_path / "out" / "diagnose.json").read_text())["targets"].values()
    flows = target["result"]["gradient_flow"]
    assert [g["label"] for g in flows] == ["init", "epoch 1", "final"]
    # The checkpoint of the last epoch holds the final weights: the same gradients.
    assert flows[1]["layers"] == flows[2]["layers"]
    # With two targets, N:PATH says whose checkpoint it is.
    code, _, stderr = _invoke("diagnose", run_dir, run_dir, "-c", f"2:{ckpt}", "-o", tmp_path / "two")
    assert code == 0, stderr
    targets = json.loads((tmp_path / "two" / "diagnose.json").read_text())["targets"]
    assert [[g["label"] for g in t["result"]["gradient_flow"]] for t in targets.values()] == [
        ["init", "final"],
        ["init", "epoch 1", "final"],
    ]


def test_recompute_and_stage_choice(run_dir, tmp_path):
    code, _, stderr = _invoke("diagnose", run_dir, "--recompute", "-a", "skip", *SMALL, "-o", tmp_path / "a")
    assert code == 0, stderr
    (target,) = json.loads((tmp_path / "a" / "diagnose.json").read_text())["targets"].values()
    assert "diagnose stage" not in target["source"] and "gradient_flow" not in target["result"]
    assert len(target["result"]["skip_usage"]) == 9
    code, _, stderr = _invoke("diagnose", run_dir, "--stage", "init", "-a", "lesion", *SMALL, "-o", tmp_path / "b")
    assert code == 0, stderr
    (target,) = json.loads((tmp_path / "b" / "diagnose.json").read_text())["targets"].values()
    assert "init stage" in target["source"] and len(target["result"]["lesion"]["units"]) == 9


def test_lesion_with_bn_recalibration_measures_again(run_dir, tmp_path):
    """An option the run's diagnose stage did not use is measured, not silently dropped."""
    out = tmp_path / "r"
    code, stdout, stderr = _invoke("diagnose", run_dir, "-a", "lesion", "--recalibrate-images", 32, "-o", out)
    assert code == 0, stderr
    (target,) = json.loads((out / "diagnose.json").read_text())["targets"].values()
    assert "diagnose stage" not in target["source"] and target["settings"]["lesion_recalibration_images"] == 32
    # Measured again with the stored diagnosis's settings, changed only where an option was given.
    assert target["settings"]["images"] == 32 and target["settings"]["batch_size"] == 16
    assert target["settings"]["analyses"] == ["lesion"] and set(target["result"]) >= {"lesion", "lesion_summary"}
    assert "gradient_flow" not in target["result"] and target["result"]["held_out"]["images"] == 32
    lesion, summary = target["result"]["lesion"], target["result"]["lesion_summary"]
    assert lesion["recalibration_images"] == 32 and all("top1_recalibrated" in u for u in lesion["units"])
    assert summary["non_downsampling"]["recalibrated"]["units"] == 7
    assert "| other, BN re-estimated | 7 |" in stdout and "re-estimated on 32 training images" in stdout
    # The stored diagnosis is still taken when the options agree with it (analyses: a subset of its own).
    code, _, stderr = _invoke("diagnose", run_dir, "--images", 32, "-a", "lesion", "-o", tmp_path / "same")
    (target,) = json.loads((tmp_path / "same" / "diagnose.json").read_text())["targets"].values()
    assert code == 0 and "the run's diagnose stage" in target["source"]


def test_two_recipes_compared(tmp_path):
    data = {"dataset": "synthetic", "image_size": 16, "channels": 3, "train_subset": 64, "val_subset": 32}
    a = write_recipe(tmp_path / "a.yaml", smoke_recipe(model={"arch": "resnet20"}, data=data, stages=[TRAIN]))
    b = write_recipe(tmp_path / "b.yaml", smoke_recipe(model={"arch": "plain20"}, data=data, stages=[TRAIN]))
    out = tmp_path / "cmp"
    code, stdout, stderr = _invoke("diagnose", a, b, "-a", "gradients", "-a", "responses", *SMALL, "-o", out)
    assert code == 0, stderr
    record = json.loads((out / "diagnose.json").read_text())
    assert list(record["targets"]) == ["resnet20", "plain20"]
    c = record["comparison"]
    (pair,) = c["responses_smaller"]
    assert pair["a"] == "resnet20" and pair["b"] == "plain20" and pair["layers"] == 19
    assert set(c["gradient_span_at_init"]) == {"resnet20", "plain20"}
    # An untrained recipe model is its own initialisation: one gradient flow, labelled init.
    assert [g["label"] for g in record["targets"]["plain20"]["result"]["gradient_flow"]] == ["init"]
    assert "## Comparison" in stdout and "3x3 layers" in stdout
    # The same folder again is the output of an earlier diagnose: replaced, not refused.
    code, _, stderr = _invoke("diagnose", a, "-a", "skip", *SMALL, "-o", out)
    assert code == 0, stderr


@pytest.mark.parametrize(
    "args, field",
    [
        (["--images", "0"], "--images"),
        (["-a", "lesions"], "--analysis"),
        (["--stage", "prune"], "--stage"),
        (["--set", "seed=1"], "--set"),
        (["--recalibrate-images", "-1"], "--recalibrate-images"),
        (["--recalibrate-images", "1"], "--recalibrate-images"),
        (["--recalibrate-images", "8", "-a", "skip"], "--recalibrate-images"),
    ],
)
def test_bad_options_are_one_line(run_dir, tmp_path, args, field):
    code, stdout, stderr = _invoke("diagnose", run_dir, *args, "-o", tmp_path / "o")
    assert code == 2 and field in stderr and "fix:" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_bad_targets_and_output_folders(run_dir, tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    code, _, stderr = _invoke("diagnose", run_dir, "-o", tmp_path / "user")
    assert code == 2 and "--output-dir" in stderr and (tmp_path / "user" / "notes.txt").read_text() == "mine"
    code, _, stderr = _invoke("diagnose", tmp_path / "user")
    assert code == 2 and "not a deploycraft run folder" in stderr
    code, _, stderr = _invoke("diagnose", run_dir, run_dir, "-c", "x.pt")
    assert code == 2 and "--checkpoint" in stderr and "N:PATH" in stderr
    code, _, stderr = _invoke("diagnose", run_dir, run_dir, "-c", "3:x.pt")
    assert code == 2 and "no target 3" in stderr
    code, _, stderr = _invoke("diagnose", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in stderr


def _one_line(stderr: str, after_progress: bool = False) -> str:
    """The one error line; after progress lines (the command was under way) it is the last and the only one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if line.startswith("error:")] and lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error:") for line in stderr.splitlines()) == 1, stderr
    return lines[0]


def test_a_folder_is_reused_only_when_diagnose_wrote_it(run_dir, tmp_path):
    """A diagnose.json the user wrote does not make the folder ours: nothing in it is overwritten."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "diagnose.json").write_text('{"my": "notes"}')
    (user / "diagnose.md").write_text("mine")
    code, _, stderr = _invoke("diagnose", run_dir, "-o", user)
    line = _one_line(stderr)
    assert code == 2 and "--output-dir" in line and "not written by it" in line and "new or empty folder" in line
    assert (user / "diagnose.md").read_text() == "mine" and (user / "diagnose.json").read_text() == '{"my": "notes"}'
    # A folder the command wrote says so in its diagnose.json, and is replaced by the next diagnose.
    out = tmp_path / "ours"
    assert _invoke("diagnose", run_dir, "-o", out)[0] == 0
    assert json.loads((out / "diagnose.json").read_text())["written_by"] == "deploycraft diagnose"
    assert _invoke("diagnose", run_dir, "-o", out)[0] == 0
    # The command's outputs from before the mark are recognised by their shape.
    earlier = tmp_path / "earlier"
    shutil.copytree(Path(REPO) / "docs" / "results" / "diagnose_highway", earlier)
    assert "written_by" not in json.loads((earlier / "diagnose.json").read_text())
    code, _, stderr = _invoke("diagnose", run_dir, "-o", earlier)
    assert code == 0, stderr
    assert json.loads((earlier / "diagnose.json").read_text())["written_by"] == "deploycraft diagnose"


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_an_unwritable_output_folder_is_refused_before_measuring(run_dir, tmp_path, monkeypatch):
    from deploycraft import diagnostics

    def measured(*args, **kwargs):
        raise AssertionError("measured before the output folder was checked")

    monkeypatch.setattr(diagnostics, "diagnose", measured)
    (tmp_path / "file").write_text("mine")
    for out, needle in (
        ("/proc/deploycraft-nope", "cannot create /proc/deploycraft-nope"),
        (tmp_path / "file" / "sub", "is a file"),
        (tmp_path / "file", "is a file"),
    ):
        code, _, stderr = _invoke("diagnose", run_dir, "--recompute", *SMALL, "-o", out)
        line = _one_line(stderr)
        assert code == 2 and "--output-dir" in line and str(out) in line and needle in line
    assert (tmp_path / "file").read_text() == "mine"
    # The check leaves nothing behind: the folders it made to test them are gone again.
    code, _, stderr = _invoke("diagnose", run_dir, "--stage", "prune", "-o", tmp_path / "new" / "deep")
    assert code == 2 and "--stage" in stderr and not (tmp_path / "new").exists()


def test_a_late_write_failure_is_one_line(run_dir, tmp_path, monkeypatch):
    from deploycraft import diagnostics

    def refuse(results, folder):
        raise PermissionError(13, "Permission denied", str(folder / "lesion.png"))

    monkeypatch.setattr(diagnostics, "write_plots", refuse)
    code, _, stderr = _invoke("diagnose", run_dir, "-o", tmp_path / "out")
    line = _one_line(stderr, after_progress=True)
    assert code == 2 and "--output-dir" in line and "cannot write the results" in line and "Permission denied" in line
    assert "lesion.png" in line
    # the measurements are not lost: the record went to a file the line names
    kept = Path(line.split("the measurements are kept in ")[1].split(" ")[0].rstrip(";,"))
    try:
        record = json.loads(kept.read_text())
        assert record["targets"] and all(t["result"] for t in record["targets"].values())
    finally:
        kept.unlink()
