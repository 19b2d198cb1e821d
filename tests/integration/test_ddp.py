"""Data-parallel runs under torchrun on CPU (gloo): two processes against one, a killed rank, a failing rank.

Kept small (synthetic 16 px images, ResNet-20): the point is the run-folder contract and determinism, which
hold at any size. Each rank runs through ddp_worker.py, whose umask makes any file a rank other than 0
creates visible by its mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, run_cli, smoke_recipe, write_recipe

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
# 577 = 9 x 64 + 1: the last global batch holds one image, so one rank's part of it is empty.
RECIPE = smoke_recipe(
    data={"train_subset": 577, "val_subset": 300},
    stages=[
        {"type": "train", "epochs": 2, "batch_size": 64, "lr": 0.05, "eval_each_epoch": True},
        {"type": "quantize", "num_calibration": 32},
        {"type": "export"},
        {"type": "verify", "batch_sizes": [1], "repeats": 3, "warmup": 1, "max_accuracy_drop": 1.0},
    ],
)


def torchrun(*args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER)] + [
        str(a) for a in args
    ]


def launch(*args, env: dict | None = None, timeout: int = 600, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun(*args, nproc=nproc),
        cwd=REPO,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shape(obj):
    """The structure of a report: keys and list lengths, with values reduced to their kind."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    if isinstance(obj, bool) or obj is None:
        return type(obj).__name__
    return "number" if isinstance(obj, (int, float)) else type(obj).__name__


def train_stage(run: Path) -> Path:
    return next((run / "stages").glob("*-train-*"))


def train_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(train_stage(run) / "model" / "weights.pt", weights_only=True)


def assert_written_by_rank0(run: Path) -> None:
    """Rank 0 runs with umask 022, the others with 077: a file another rank created lacks group/other read."""
    paths = [p for p in run.rglob("*")]
    assert paths
    foreign = [str(p.relative_to(run)) for p in paths if p.stat().st_mode & 0o044 != 0o044]
    assert not foreign, f"written by a rank other than 0: {foreign[:5]}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(root / "recipe.yaml", RECIPE)
    one, two = root / "one" / "run", root / "two" / "run"  # separate parents: no stage reused across them
    proc = run_cli("run", recipe, "--output-dir", one, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch("run", recipe, "--output-dir", two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(root=root, recipe=recipe, one=one, two=two, stderr=proc.stderr)


def test_two_processes_end_with_the_report_of_one(runs):
    one = json.loads((runs.one / "report.json").read_text())
    two = json.loads((runs.two / "report.json").read_text())
    # a faster deployable is named or not by the latencies each run measured: the one part whose presence
    # depends on timing (seen under load: named in one run, not in the other)
    notes = [r.pop("faster_alternative") for r in (one, two)]
    assert all(n is None or {"name", "top1", "drop", "budget"} <= set(n) for n in notes), notes
    assert shape(two) == shape(one)
    headings = [
        [line for line in (r / "report.md").read_text().splitlines() if line.startswith("#")]
        for r in (runs.one, runs.two)
    ]
    assert headings[0] == headings[1]
    assert one["stages"]["train"]["world_size"] == 1 and two["stages"]["train"]["world_size"] == 2
    assert [h["world_size"] for h in two["stages"]["train"]["history"]] == [2, 2]
    status = json.loads((runs.two / "run.json").read_text())
    assert status["status"] == "completed" and status["world_size"] == 2 and status["backend"] == "gloo"
    assert "data-parallel: 2 process(es), gloo" in runs.stderr
    assert_written_by_rank0(runs.two)


def test_sharded_evaluation_counts_every_image_once(runs):
    """Each rank evaluates every other batch and the counts are summed: the same top-1 as verify's, which
    rank 0 computes alone on the same model."""
    report = json.loads((runs.two / "report.json").read_text())
    assert report["stages"]["train"]["history"][-1]["val_top1"] == report["models"]["fp32_torch"]["top1"]


def test_killed_rank_resumes_bit_identical(runs, tmp_path):
    """SIGKILL rank 1 during epoch 2; the same command resumes from epoch 1's checkpoint and ends with the
    weights of the uninterrupted 2-process run (two runs of one seed and world size are bit-identical)."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    child = subprocess.Popen(
        torchrun("run", runs.recipe, "--output-dir", out),
        cwd=REPO,
        env={**ENV, "DEPLOYCRAFT_TEST_PIDS": str(pids)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and child.poll() is None:
        marks = list(out.glob("stages/*-train-*/checkpoint.json"))
        if marks and json.loads(marks[0].read_text())["epoch"] >= 1:
            os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    _, stderr = child.communicate(timeout=120)
    assert killed, "training finished before rank 1 could be killed"
    assert child.returncode != 0
    assert len(error_lines(stderr)) <= 1, stderr[-3000:]
    assert not (train_stage(out) / "stage.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] in ("failed", "interrupted"), stderr[-3000:]
    proc = launch("run", runs.recipe, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming train after epoch" in proc.stderr
    reference, resumed = train_weights(runs.two), train_weights(out)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert_written_by_rank0(out)


def test_failure_on_one_rank_stops_every_rank_with_one_line(runs, tmp_path):
    """A fault on rank 1 in epoch 2: one line naming rank 1 and the cause, run.json says so; then one
    process resumes the checkpoint two processes wrote (any world size resumes it)."""
    out = tmp_path / "run"
    proc = launch("run", runs.recipe, "--output-dir", out, env={"DEPLOYCRAFT_TEST_FAULT": "1:1:2"}, timeout=300)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: rank 1: stage train failed: RuntimeError: injected fault on rank 1")
    assert "run the same command again to resume" in lines[0]
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("rank 1: stage train failed")
    assert not (train_stage(out) / "stage.json").exists()
    assert json.loads((train_stage(out) / "checkpoint.json").read_text())["epoch"] == 1  # epoch 1 is kept
    proc = run_cli("run", runs.recipe, "--output-dir", out, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming train after epoch 1/2 (checkpoint of 2 process(es), now 1)" in proc.stderr
    history = json.loads((out / "report.json").read_text())["stages"]["train"]["history"]
    assert [h["world_size"] for h in history] == [2, 1]


def test_qat_runs_data_parallel(tmp_path):
    """method: qat under torchrun: rank 0 calibrates and sends the simulation, every rank fine-tunes it with
    DDP (KD from the FP32 model, logits and the stage features tapped in the simulation's graph; the BNs live,
    bn_fold: after), rank 0 alone exports, checks and writes."""
    recipe = smoke_recipe(
        target="onnxruntime-cpu",
        data={"train_subset": 256, "val_subset": 128},
        stages=[
            {"type": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "eval_each_epoch": False},
            {"type": "quantize", "num_calibration": 32, "method": "qat",
             "qat": {"epochs": 1, "batch_size": 64, "bn_fold": "after",
                     "distill": {"control": False, "feature_weight": 0.5}}},
            {"type": "export"},
            {"type": "verify", "batch_sizes": [1], "repeats": 3, "warmup": 1, "max_accuracy_drop": 1.0},
        ],
    )  # fmt: skip
    path = write_recipe(tmp_path / "qat.yaml", recipe)
    out = tmp_path / "run"
    proc = launch("run", path, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    qat = report["stages"]["quantize"]["targets"]["onnxruntime-cpu"]["qat"]
    assert [h["world_size"] for h in qat["history"]] == [2] and qat["feature_weight"] == 0.5
    assert qat["bn_fold"] == "after" and qat["live_bn"] == 21  # every rank trained the BNs live, then folded
    assert qat["top1_qat"] == pytest.approx(qat["history"][-1]["val_top1"])
    assert "int8_onnx" in report["models"]
    assert_written_by_rank0(out)
