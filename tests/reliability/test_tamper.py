"""Point 1 and 3 of the integrity issue: damaged stage outputs are found, re-run and never shipped.

Each case damages one file of a completed run, re-runs the same command and checks that the damaged
stage and every stage after it ran again, that the report has the untouched run's metrics, and that
deploy/ and the manifest hold intact files only.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploycraft.artifacts import sha256_file
from tests.conftest import run_cli
from tests.reliability.conftest import metrics, stage_dir, stages_of

ORDER = ["init", "train", "quantize", "export", "verify"]


def _zero_int8_weights(path):
    proto = onnx.load(str(path))
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4:
            t.CopyFrom(numpy_helper.from_array(np.zeros(tuple(t.dims), np.int8), t.name))
    onnx.save(proto, str(path))  # still a valid ONNX file


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _garbage(path):
    path.write_text("{ this is not json")


def _escape_record(path):
    """A crafted stage.json whose artifact climbs out of the run folder (digest recomputed)."""
    from deploycraft.artifacts import _record_digest

    record = json.loads(path.read_text())
    record["output"]["artifacts"]["int8_onnx"]["path"] = "../../../../../../etc/passwd"
    record["files"]["../../../../../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    record["digest"] = _record_digest(record)
    path.write_text(json.dumps(record))


CASES = {
    # name: (stage, file in the stage folder, damage)
    "zeroed_int8_weights": ("quantize", "model_int8.onnx", _zero_int8_weights),
    "truncated_fp32_onnx": ("export", "model_fp32.onnx", _truncate),
    "bit_flip_trained_weights": ("train", "model/weights.pt", _flip_bit),
    "truncated_trained_weights": ("train", "model/weights.pt", _truncate),
    "deleted_int8_onnx": ("quantize", "model_int8.onnx", lambda p: p.unlink()),
    "garbage_stage_record": ("quantize", "stage.json", _garbage),
    "deleted_stage_record_of_train": ("train", "stage.json", lambda p: p.unlink()),
    "record_path_escapes": ("quantize", "stage.json", _escape_record),
    "edited_metrics_in_record": (
        "export",
        "stage.json",
        lambda p: p.write_text(p.read_text().replace('"rtol"', '"rtoll"')),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_stage_is_rerun_never_shipped(completed, case):
    run, recipe = completed
    type_, rel, damage = CASES[case]
    before = metrics(run)
    shipped = {p.name: sha256_file(p) for p in (run / "deploy").glob("*.onnx")}
    damage(stage_dir(run, type_) / rel)
    proc = run_cli("run", recipe, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    cached = stages_of(run)
    first = ORDER.index(type_)
    assert [cached[t] for t in ORDER[first:]] == [False] * (len(ORDER) - first), cached
    assert all(cached[t] for t in ORDER[:first]), cached
    assert metrics(run) == before
    # What ships is what an untouched run ships, byte for byte, and the manifest says so.
    assert {p.name: sha256_file(p) for p in (run / "deploy").glob("*.onnx")} == shipped
    manifest = {f["path"]: f["sha256"] for f in json.loads((run / "manifest.json").read_text())["files"]}
    for p in (run / "deploy").rglob("*"):
        if p.is_file():
            assert manifest[str(p.relative_to(run))] == sha256_file(p)
    assert "/etc/passwd" not in (run / "manifest.json").read_text()


def test_damage_is_named_by_file(completed):
    run, recipe = completed
    _zero_int8_weights(stage_dir(run, "quantize") / "model_int8.onnx")
    proc = run_cli("run", recipe, "--output-dir", run)
    assert proc.returncode == 0
    assert "quantize" in proc.stderr and "model_int8.onnx changed since it was written" in proc.stderr


def test_sibling_run_never_adopts_a_damaged_stage(completed):
    run, recipe = completed
    before = metrics(run)
    _zero_int8_weights(stage_dir(run, "quantize") / "model_int8.onnx")
    sibling = run.parent / "sibling"
    proc = run_cli("run", recipe, "--output-dir", sibling)
    assert proc.returncode == 0, proc.stderr
    assert stages_of(sibling) == {"init": True, "train": True, "quantize": False, "export": False, "verify": False}
    assert metrics(sibling) == before
    assert "not reusing" in proc.stderr
    # The other run's damaged folder is left as it was: a run never writes into a sibling.
    assert not (stage_dir(run, "quantize") / "stage.json").is_file() or stages_of(run)["quantize"] is not None


def test_intact_sibling_stages_are_copies_not_links(completed):
    run, recipe = completed
    sibling = run.parent / "sibling"
    assert run_cli("run", recipe, "--output-dir", sibling).returncode == 0
    assert all(stages_of(sibling).values())
    for p in (sibling / "stages").rglob("*"):
        if p.is_file():
            assert os.stat(p).st_nlink == 1, p


def test_editing_a_deployed_file_leaves_the_cache_alone(completed):
    run, recipe = completed
    deployed = run / "deploy" / "model_int8.onnx"
    source = stage_dir(run, "quantize") / "model_int8.onnx"
    before = sha256_file(source)
    assert os.stat(deployed).st_nlink == 1
    _truncate(deployed)
    assert sha256_file(source) == before
    proc = run_cli("run", recipe, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr
    assert all(stages_of(run).values())  # the cache is intact: nothing re-runs
    assert sha256_file(run / "deploy" / "model_int8.onnx") == before  # a verified copy ships again
    kept = list(run.glob("deploy.kept-*/model_int8.onnx"))  # the edited file is not thrown away
    assert len(kept) == 1 and kept[0].stat().st_size < deployed.stat().st_size


def test_inspect_names_damage_without_crashing(completed):
    run, _ = completed
    _truncate(stage_dir(run, "train") / "model" / "weights.pt")
    (stage_dir(run, "export") / "stage.json").write_text("garbage")
    (stage_dir(run, "quantize") / "model_int8.onnx").unlink()
    proc = run_cli("inspect", run)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("DAMAGED") == 3


def test_inspect_checks_deploy_against_the_manifest(completed):
    run, _ = completed
    proc = run_cli("inspect", run)
    assert proc.returncode == 0 and "deploy/model_int8.onnx" in proc.stdout
    assert "DAMAGED" not in proc.stdout and "NOT SHIPPED" not in proc.stdout
    _flip_bit(run / "deploy" / "model_int8.onnx")
    (run / "deploy" / "notes.txt").write_text("mine\n")
    proc = run_cli("inspect", run)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "deploy/model_int8.onnx" in x)
    assert "DAMAGED: differs from manifest.json" in line
    assert "NOT SHIPPED" in next(x for x in proc.stdout.splitlines() if "deploy/notes.txt" in x)


def test_inspect_names_shipped_files_that_are_gone(completed):
    run, _ = completed
    (run / "deploy" / "model_int8.onnx").unlink()
    proc = run_cli("inspect", run)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "deploy/model_int8.onnx" in x)
    assert "MISSING" in line
    shutil.rmtree(run / "deploy")
    proc = run_cli("inspect", run)
    assert proc.returncode == 0 and "deploy/ is MISSING" in proc.stdout


def test_garbage_run_json(completed):
    run, recipe = completed
    (run / "run.json").write_text("\x00\x01 not json")
    proc = run_cli("inspect", run)
    assert proc.returncode == 0 and "unknown" in proc.stdout
    proc = run_cli("run", recipe, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr
    assert all(stages_of(run).values())


def test_interrupted_run_resumes_after_damage_to_its_checkpoint(completed):
    """A killed training leaves a checkpoint; damaged, it is never resumed from (training starts over)."""
    run, recipe = completed
    train = stage_dir(run, "train")
    (train / "stage.json").unlink()  # as if killed before the stage finished
    _flip_bit(train / "checkpoint.pt")
    proc = run_cli("run", recipe, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.pt is damaged" in proc.stderr and "starting over" in proc.stderr
    assert stages_of(run)["train"] is False
