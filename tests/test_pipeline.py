"""The staged pipeline: run folder contract, caching, resuming after a failure or a kill, gates."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import deploycraft.artifacts as af
from deploycraft.artifacts import sha256_file
from deploycraft.errors import GateFailure, StageFailure
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe
from deploycraft.stages import STAGES
from tests.conftest import REPO, run_cli, smoke_recipe, write_recipe


def _run(raw, out):
    return Pipeline(build_recipe(raw), out).execute()


def _with_ceiling() -> dict:
    raw = smoke_recipe()
    raw["stages"][3]["ceiling"] = True
    return raw


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    ctx = _run(_with_ceiling(), out)
    return ctx, out


def test_run_folder_contract(smoke_run):
    _, out = smoke_run
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "smoke" and report["status"] == "passed"
    assert set(report["models"]) >= {"fp32_torch", "fp32_onnx", "int8_onnx"}
    from deploycraft.runtime import available

    if available("openvino"):  # every ONNX deployable also runs on OpenVINO
        assert {"fp32_onnx@openvino", "int8_onnx@openvino"} <= set(report["models"])
        assert report["models"]["int8_onnx@openvino"]["backend"] == "openvino"
    assert report["main"] == "int8_onnx"  # the target's INT8 file on its own runtime ships
    assert report["fastest_fp32"]["1"] in report["models"]
    assert report["headline"] and report["headline"][0]["speedup_vs_fastest_fp32"] > 0
    assert report["ceiling"]["onnxruntime:int8"]["gmacs"] > 0
    assert 0 < report["models"]["int8_onnx"]["ceiling_fraction"] < 2
    for name, m in report["models"].items():
        for key in (
            "path",
            "format",
            "precision",
            "backend",
            "top1",
            "latency_ms",
            "throughput_ips",
            "batch_size",
            "macs",
            "params",
        ):
            assert key in m, (name, key)
        assert 0 <= m["top1"] <= 1
        assert set(m["latency_ms"]) >= {"p50", "p90", "p99"}
        assert (out / m["path"]).is_file()
    assert report["models"]["int8_onnx"]["precision"] == "int8"
    assert all("passed" in g and "value" in g and "limit" in g for g in report["gates"])
    md = (out / "report.md").read_text()
    assert "| INT8 ONNX **(shipped)** |" in md and "## Gates" in md
    # the headline names the fastest FP32 runtime ("slower" where a busy machine makes INT8 lose)
    assert re.search(r"× (faster|slower) than the fastest FP32 runtime", md)
    assert (out / "plots" / "accuracy_vs_latency.png").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_manifest_hashes_every_file(smoke_run):
    _, out = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["versions"]) >= {"python", "torch", "onnx", "onnxruntime", "deploycraft"}
    assert manifest["hardware"]["cpu_model"] and "cpu_flags" in manifest["hardware"]
    listed = {f["path"]: f for f in manifest["files"]}
    shipped = (
        "report.json",
        "report.md",
        "deploy/model_int8.onnx",
        "deploy/model_fp32.onnx",
        "recipe.yaml",
        "deploy/deployable.json",
        "deploy/triton/smoke/config.pbtxt",
        "deploy/triton/smoke/1/model.onnx",
    )
    for rel in shipped:
        assert rel in listed, rel
        assert listed[rel]["sha256"] == sha256_file(out / rel)
    assert manifest["input"]["image_size"] == 16


def test_shipped_deployable_and_triton_repository(smoke_run):
    """deploy/ says which file ships on which runtime, and holds a Triton model repository for it that
    Triton's own ModelConfig protobuf parses."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is a dev dependency")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, out = smoke_run
    desc = json.loads((out / "deploy" / "deployable.json").read_text())
    assert (
        desc["model"] == "int8_onnx" and desc["runtime"] == "onnxruntime" and desc["file"] == "deploy/model_int8.onnx"
    )
    assert desc["measured"]["top1"] is not None and desc["input"]["image_size"] == 16
    config = text_format.Parse((out / "deploy/triton/smoke/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "smoke" and config.backend == "onnxruntime" and config.max_batch_size == 1
    assert list(config.input[0].dims) == [3, 16, 16] and config.input[0].name == "input"
    assert list(config.output[0].dims) == [10] and config.output[0].name == "logits"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.HasField("dynamic_batching")
    assert sha256_file(out / "deploy/triton/smoke/1/model.onnx") == sha256_file(out / "deploy/model_int8.onnx")


def test_second_run_is_cached(smoke_run):
    ctx, out = smoke_run
    before = json.loads((out / "report.json").read_text())
    started = time.time()
    _run(_with_ceiling(), out)
    status = json.loads((out / "run.json").read_text())
    assert all(s["cached"] for s in status["stages"])
    after = json.loads((out / "report.json").read_text())
    assert after["models"]["int8_onnx"]["top1"] == before["models"]["int8_onnx"]["top1"]
    assert time.time() - started < 30


def test_changed_stage_reruns_only_what_follows(smoke_run):
    _, out = smoke_run
    raw = smoke_recipe()
    raw["stages"][1]["calibrator"] = "max"
    other = out.parent / "other"
    _run(raw, other)  # a sibling run folder of the same recipe name
    stages = {s["type"]: s["cached"] for s in json.loads((other / "run.json").read_text())["stages"]}
    assert stages == {"init": True, "train": True, "quantize": False, "export": False, "verify": False}


def test_failed_stage_resumes_from_last_completed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []

    def boom(self, ctx, workdir):
        calls.append(1)
        raise RuntimeError("simulated crash in export")

    monkeypatch.setattr(STAGES["export"], "run", boom)
    with pytest.raises(StageFailure, match="stage export failed: RuntimeError: simulated crash"):
        _run(smoke_recipe(), out)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and "simulated crash" in status["error"]
    assert not (out / "report.json").exists()
    monkeypatch.undo()
    _run(smoke_recipe(), out)
    stages = {s["type"]: s["cached"] for s in json.loads((out / "run.json").read_text())["stages"]}
    assert stages == {"init": True, "train": True, "quantize": True, "export": False, "verify": False}
    assert calls == [1]


def test_a_full_disk_is_one_user_error_and_the_run_resumes(tmp_path, monkeypatch):
    import errno

    from deploycraft.errors import UserError

    out = tmp_path / "run"

    def full(self, ctx, workdir):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "model_fp32.onnx"))

    monkeypatch.setattr(STAGES["export"], "run", full)
    with pytest.raises(UserError, match="stage export: No space left on device while writing to") as info:
        _run(smoke_recipe(), out)
    assert info.value.exit_code == 2 and "resumes from the last completed stage" in info.value.one_line()
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and "traceback" not in status
    monkeypatch.undo()
    _run(smoke_recipe(), out)
    stages = {s["type"]: s["cached"] for s in json.loads((out / "run.json").read_text())["stages"]}
    assert stages == {"init": True, "train": True, "quantize": True, "export": False, "verify": False}


def test_ctrl_c_while_the_run_writes_its_own_records_resumes(tmp_path, monkeypatch):
    """A Ctrl-C after the last stage, while run.json and the manifest are written: one line, exit 130,
    run.json "interrupted", and the same command finishes the run without running any stage again."""
    from typer.testing import CliRunner

    import deploycraft.pipeline as pipeline_module
    from deploycraft.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe())
    out = tmp_path / "run"
    real = pipeline_module.write_manifest

    def ctrl_c(run, meta, files):
        if meta["status"] == "completed":
            raise KeyboardInterrupt
        return real(run, meta, files)

    monkeypatch.setattr(pipeline_module, "write_manifest", ctrl_c)
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted: run the same command again to resume" in result.output
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert "finished" not in json.loads((out / "run.json").read_text())
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "completed" and all(s["cached"] for s in status["stages"])
    assert run_cli("inspect", out).returncode == 0
    # deploy/ had landed before the stop, its manifest not: the files are still known as shipped, not kept
    assert not list(out.glob("deploy.kept-*")) and not (out / ".shipping.json").exists()


def test_a_teacher_checkpoint_rewritten_in_place_reruns_distill(tmp_path):
    """The content of a file a stage's settings name joins its key: the same path with other weights is
    another teacher (the review's case: a run reused the old distillation after the file changed)."""
    from deploycraft.models import create_model

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save(create_model("resnet20", num_classes=10).state_dict(), teacher)
    raw = smoke_recipe()
    raw["stages"] = [
        raw["stages"][0],
        {"type": "distill", "epochs": 1, "batch_size": 64, "teacher": {"arch": "resnet20", "weights": str(teacher)}},
    ]
    out = tmp_path / "run"

    def cached():
        return {s["type"]: s["cached"] for s in json.loads((out / "run.json").read_text())["stages"]}

    _run(raw, out)
    _run(raw, out)
    assert cached() == {"init": True, "train": True, "distill": True}
    torch.manual_seed(2)
    torch.save(create_model("resnet20", num_classes=10).state_dict(), teacher)
    _run(raw, out)
    assert cached() == {"init": True, "train": True, "distill": False}


def test_a_recipe_without_verify_ships_nothing(tmp_path):
    """Nothing unverified ships: without a verify stage the run completes, its files stay under stages/,
    deploy/ is left out, and the report says "not verified" rather than "passed"."""
    raw = smoke_recipe()
    out = tmp_path / "run"
    _run(raw, out)  # verified first: deploy/ filled, the accuracy-vs-latency plot drawn
    assert (out / "deploy").is_dir() and (out / "plots" / "accuracy_vs_latency.png").is_file()
    raw["stages"] = raw["stages"][:3]  # train, quantize, export
    (out / ".deploy-new").mkdir()
    (out / ".deploy-new" / "model_int8.onnx").write_bytes(b"half copied by a stopped run")
    _run(raw, out)
    assert not (out / ".deploy-new").exists()  # no unverified copy lingers either
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "not verified" and report["shipped"] is False and report["plots"] == []
    assert not (out / "deploy").exists()
    (out / ".deploy-new").mkdir()  # again, under the same recipe: nothing is withdrawn, nothing ships
    (out / ".deploy-new" / "model_int8.onnx").write_bytes(b"half copied by a stopped run")
    _run(raw, out)
    assert not (out / ".deploy-new").exists()
    text = (out / "report.md").read_text()
    assert "the recipe has no verify stage" in text and "Accuracy vs latency" not in text
    assert not (out / "plots" / "accuracy_vs_latency.png").exists()  # the earlier run's plot is not shown
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert run_cli("inspect", out).returncode == 0


def test_a_changed_recipe_that_fails_leaves_no_earlier_report_as_current(tmp_path, monkeypatch):
    """The earlier recipe's report, manifest and deploy/ are withdrawn when a changed recipe starts: a run
    that then fails does not leave them looking like its own (the files stay under stages/)."""
    out = tmp_path / "run"
    raw = smoke_recipe()
    _run(raw, out)
    changed = smoke_recipe()
    changed["stages"][3]["repeats"] = 6

    def boom(self, ctx, workdir):
        raise RuntimeError("simulated crash in verify")

    monkeypatch.setattr(STAGES["verify"], "run", boom)
    with pytest.raises(StageFailure):
        _run(changed, out)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    for gone in ("report.md", "report.json", "manifest.json", "deploy", "plots/accuracy_vs_latency.png"):
        assert not (out / gone).exists(), gone
    monkeypatch.undo()
    _run(raw, out)  # the earlier recipe again: everything reused, its results back
    status = json.loads((out / "run.json").read_text())
    assert all(s["cached"] for s in status["stages"]) and (out / "deploy").is_dir() and (out / "report.md").is_file()


def test_new_weights_under_the_same_recipe_withdraw_the_earlier_results(tmp_path, monkeypatch):
    """The same recipe text with other inputs (here the checkpoint model.weights names, rewritten in place):
    the stages run again, so the earlier report, manifest and deploy/ are withdrawn before the first of them,
    and a run that then fails does not leave them looking like its own."""
    from deploycraft.models import create_model

    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(create_model("resnet20", num_classes=10).state_dict(), weights)
    raw = smoke_recipe(model={"weights": str(weights)})
    out = tmp_path / "run"
    _run(raw, out)
    assert (out / "deploy").is_dir() and (out / "report.md").is_file()
    torch.manual_seed(2)
    torch.save(create_model("resnet20", num_classes=10).state_dict(), weights)

    def boom(self, ctx, workdir):
        raise RuntimeError("simulated crash in train")

    monkeypatch.setattr(STAGES["train"], "run", boom)
    with pytest.raises(StageFailure):
        _run(raw, out)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    for gone in ("report.md", "report.json", "manifest.json", "deploy", "plots/accuracy_vs_latency.png"):
        assert not (out / gone).exists(), gone
    monkeypatch.undo()
    _run(raw, out)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "completed" and (out / "deploy").is_dir() and (out / "report.md").is_file()
    assert run_cli("inspect", out).returncode == 0


def test_a_stop_while_earlier_results_are_withdrawn_reads_interrupted(tmp_path, monkeypatch):
    """Ctrl-C while a changed recipe's run withdraws the earlier deploy/: run.json says "interrupted", not the
    earlier run's "completed" beside a half-removed deploy/, and the same command finishes the run."""
    from deploycraft.pipeline import Pipeline as P

    out = tmp_path / "run"
    _run(smoke_recipe(), out)
    changed = smoke_recipe()
    changed["stages"][3]["repeats"] = 6

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_retire_deploy", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _run(changed, out)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert "repeats: 6" not in (out / "recipe.yaml").read_text()  # the next run sees the change and withdraws
    monkeypatch.undo()
    _run(changed, out)
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert run_cli("inspect", out).returncode == 0


def test_a_stop_after_the_records_are_written_reports_a_completed_run(tmp_path, monkeypatch):
    """Ctrl-C while the finished run releases its folder: run.json and the manifest are already complete, so
    the CLI says the run completed (exit 130 for the stop) and inspect agrees."""
    from typer.testing import CliRunner

    from deploycraft.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe())
    out = tmp_path / "run"
    real = af.RunDir.unlock

    def ctrl_c(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(af.RunDir, "unlock", ctrl_c)
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted after the run completed: its results are in" in result.output
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    monkeypatch.undo()
    assert run_cli("inspect", out).returncode == 0


def test_settings_the_chosen_method_ignores_do_not_rerun_a_stage(smoke_run, tmp_path):
    """PTQ ignores the QAT settings (and only the percentile calibrator reads ``percentile``): changing them
    reuses the quantize stage; changing one it reads does not."""
    from deploycraft.stages.quantize import QuantizeStage

    _, out = smoke_run
    run = tmp_path / "run"
    import shutil

    shutil.copytree(out, run)
    (run / ".lock").unlink(missing_ok=True)
    raw = _with_ceiling()
    raw["stages"][1]["qat"] = {"epochs": 5, "lr": 0.5}
    _run(raw, run)
    assert {s["type"]: s["cached"] for s in json.loads((run / "run.json").read_text())["stages"]}["quantize"]
    cfg = build_recipe(raw).stage("quantize")
    key = QuantizeStage.key_config(cfg)
    assert "qat" not in key and ("percentile" in key) == (cfg.calibrator == "percentile")
    assert "qat" in QuantizeStage.key_config(cfg.model_copy(update={"method": "qat"}))


def test_failure_text_that_looks_like_markup_is_recorded(tmp_path, monkeypatch):
    """gloo's "[/path/pair.cc:537] Connection closed by peer" is no closing tag: run.json and log.txt get it."""

    def boom(self, ctx, workdir):
        raise RuntimeError("[/src/gloo/pair.cc:537] Connection closed by peer")

    monkeypatch.setattr(STAGES["init"], "run", boom)
    with pytest.raises(StageFailure, match="Connection closed by peer"):
        _run(smoke_recipe(), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    assert "[/src/gloo/pair.cc:537] Connection closed by peer" in (tmp_path / "run" / "log.txt").read_text()


def test_gate_failure_exits_1_and_says_why(tmp_path):
    raw = smoke_recipe()
    raw["stages"][3]["min_speedup"] = 1000.0
    path = write_recipe(tmp_path / "r.yaml", raw)
    proc = run_cli("run", path, "--output-dir", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert "gate speedup" in proc.stderr and "limit 1000" in proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    # nothing unverified ships: no deploy/, the report says so, the files stay in stages/
    assert not (tmp_path / "run" / "deploy").exists() and report["shipped"] is False
    assert "Nothing shipped" in (tmp_path / "run" / "report.md").read_text()
    assert all(m["path"].startswith("stages/") for m in report["models"].values() if m["format"] != "torch")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not [f for f in manifest["files"] if f["path"].startswith("deploy/")]
    # the gate met on a re-run (only verify runs again): deploy/ is filled
    del raw["stages"][3]["min_speedup"]
    path = write_recipe(tmp_path / "r.yaml", raw)
    proc = run_cli("run", path, "--output-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "deploy" / "deployable.json").is_file()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["shipped"] is True


def test_gate_failure_raises_in_process(tmp_path):
    raw = smoke_recipe()
    raw["stages"][3]["max_latency_ms"] = 1e-6
    with pytest.raises(GateFailure, match="latency_p50"):
        _run(raw, tmp_path / "run")


KILL_RECIPE = smoke_recipe(
    data={"train_subset": 1536, "val_subset": 256},
    stages=[{"type": "train", "epochs": 3, "batch_size": 64, "lr": 0.05, "eval_each_epoch": True}],
)
KILL_RECIPE["model"]["weights"] = None


def _train_result(out):
    stage = next((out / "stages").glob("*-train-*"))
    record = json.loads((stage / "stage.json").read_text())
    weights = torch.load(stage / "model" / "weights.pt", weights_only=True)
    return record["output"]["metrics"]["history"], weights


def _run_until_first_epoch(path, out, stderr):
    """`deploycraft run` in a child process, returned once its training has checkpointed its first epoch
    (with that checkpoint), still running."""
    child = subprocess.Popen(
        [sys.executable, "-m", "deploycraft", "run", str(path), "--output-dir", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        found = list((out / "stages").glob("*-train-*/checkpoint.pt")) if (out / "stages").is_dir() else []
        if found and torch.load(found[0], weights_only=True)["epoch"] >= 1:
            return child, found[0]
        time.sleep(0.2)
    raise AssertionError("training finished before it could be stopped")


def test_killed_training_resumes_with_identical_result(tmp_path):
    """SIGKILL after the first epoch checkpoint; the same command resumes and ends bit-identical."""
    path = write_recipe(tmp_path / "r.yaml", KILL_RECIPE)
    ref_out, out = tmp_path / "a" / "run", tmp_path / "b" / "run"  # separate parents: no sibling reuse
    proc = run_cli("run", path, "--output-dir", ref_out)
    assert proc.returncode == 0, proc.stderr
    child, ckpt = _run_until_first_epoch(path, out, subprocess.DEVNULL)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (ckpt.parent / "stage.json").exists()
    proc = run_cli("run", path, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming train after epoch" in proc.stderr
    ref_hist, ref_w = _train_result(ref_out)
    hist, w = _train_result(out)
    assert [h["val_top1"] for h in hist] == [h["val_top1"] for h in ref_hist]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in ref_hist]
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


def test_sigterm_during_training_is_an_interruption_and_resumes(tmp_path):
    """SIGTERM (a scheduler's stop) on a run alone: exit 143 with the "terminated" line, run.json says
    interrupted (not "running"), and the same command resumes after the last epoch checkpoint."""
    path = write_recipe(tmp_path / "r.yaml", KILL_RECIPE)
    out = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as log:  # a file, not a pipe nobody reads while it trains
        child, _ = _run_until_first_epoch(path, out, log)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert child.returncode == 143, stderr
    assert "terminated (SIGTERM): run the same command again" in stderr and "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    proc = run_cli("run", path, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming train after epoch" in proc.stderr


def test_a_calibration_file_rewritten_in_place_reruns_the_stages_that_read_it(tmp_path):
    """The cache keys of the stages that read the calibration images (quantize, verify) hold the named
    file's content, not only its path: a file rewritten in place re-runs them, and only them."""
    import numpy as np

    from deploycraft.pipeline import calibration_digest

    path = tmp_path / "calib.npz"
    raw = smoke_recipe(data={"calibration": str(path)})
    np.savez(path, images=np.zeros((16, 3, 16, 16), np.uint8), labels=np.zeros(16, np.int64))
    first = calibration_digest(build_recipe(raw))
    assert first is not None and calibration_digest(build_recipe(smoke_recipe())) is None
    out = tmp_path / "run"
    _run(raw, out)
    np.savez(path, images=np.full((16, 3, 16, 16), 200, np.uint8), labels=np.zeros(16, np.int64))
    assert calibration_digest(build_recipe(raw)) != first
    _run(raw, out)
    stages = {s["type"]: s["cached"] for s in json.loads((out / "run.json").read_text())["stages"]}
    assert stages == {"init": True, "train": True, "quantize": False, "export": False, "verify": False}
    assert [s.reads_calibration for s in (STAGES["train"], STAGES["quantize"], STAGES["prune"])] == [False, True, True]


TRAIN_ONLY = smoke_recipe(
    data={"train_subset": 128, "val_subset": 64},
    stages=[{"type": "train", "epochs": 3, "batch_size": 64, "lr": 0.05, "eval_each_epoch": False}],
)


def _count_train_epochs(monkeypatch) -> list[int]:
    from deploycraft.data import DataModule

    epochs: list[int] = []
    real = DataModule.train_epoch

    def counted(self, batch_size, epoch, *args, **kwargs):
        epochs.append(epoch)
        return real(self, batch_size, epoch, *args, **kwargs)

    monkeypatch.setattr(DataModule, "train_epoch", counted)
    return epochs


def test_an_evaluation_that_fails_after_the_last_epoch_loses_no_training(tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its evaluation: when that fails (a broken held-out image) the
    re-run resumes after the last epoch, evaluates, and ends as an uninterrupted run, training nothing again."""
    from deploycraft.errors import UserError
    from deploycraft.stages import train as train_module

    _run(TRAIN_ONLY, tmp_path / "a" / "run")
    ref_hist, ref_w = _train_result(tmp_path / "a" / "run")
    assert "val_top1" in ref_hist[-1] and "val_top1" not in ref_hist[0]

    def broken(*args, **kwargs):
        raise UserError("cannot decode image val/x.png", field="data.val_split")

    out = tmp_path / "b" / "run"
    monkeypatch.setattr(train_module, "top1", broken)
    with pytest.raises(UserError, match="cannot decode"):
        _run(TRAIN_ONLY, out)
    (ckpt,) = (out / "stages").glob("*-train-*/checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3
    monkeypatch.undo()
    trained = _count_train_epochs(monkeypatch)
    _run(TRAIN_ONLY, out)
    assert trained == []
    hist, w = _train_result(out)
    timeless = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert timeless(hist) == timeless(ref_hist)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)


def test_a_broken_held_out_image_is_named_before_training(tmp_path, monkeypatch):
    """The train stage decodes every held-out image before its first epoch: a broken one costs no training."""
    from deploycraft.errors import UserError
    from tests.data.test_datasets import make_imagefolder

    root = make_imagefolder(tmp_path / "data", per_class=3)
    (root / "val" / "dog" / "broken.png").write_bytes((root / "val" / "dog" / "0.png").read_bytes()[:60])
    raw = smoke_recipe(
        model={"arch": "resnet20", "num_classes": 2},
        data={"dataset": "imagefolder", "root": str(root), "train_subset": None, "val_subset": None},
        stages=TRAIN_ONLY["stages"],
    )
    trained = _count_train_epochs(monkeypatch)
    with pytest.raises(UserError) as info:
        _run(raw, tmp_path / "run")
    assert info.value.field == "data.val_split" and str(root / "val" / "dog" / "broken.png") in info.value.message
    assert trained == [] and not list((tmp_path / "run" / "stages").glob("*-train-*/checkpoint.pt"))
