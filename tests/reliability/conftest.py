"""Fault injection: a completed tiny run to damage, and the assertions every failure must meet.

A user error exits 2 with one line on stderr (`error: <where>: <what> — fix: <how>`), no traceback;
nothing that was computed is lost and nothing the user owns is touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, smoke_recipe, write_recipe


def one_line_error(proc, *needles: str, after_progress: bool = False) -> str:
    """The single stderr line of a user error (exit 2), checked for each needle.

    ``after_progress``: the error came while a run was going, so stage progress lines come first; the
    error is still one line, the last, and the only one that starts with ``error:``.
    """
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    if after_progress:
        assert [x for x in lines if x.startswith("error:")] == lines[-1:], proc.stderr
    else:
        assert len(lines) == 1, proc.stderr
    line = lines[-1]
    assert line.startswith("error: ") and " — fix: " in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to prove nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stages_of(run: Path) -> dict[str, bool]:
    """{stage type: cached?} of the last run in ``run``."""
    return {s["type"]: s["cached"] for s in json.loads((run / "run.json").read_text())["stages"]}


def stage_dir(run: Path, type_: str) -> Path:
    status = json.loads((run / "run.json").read_text())
    return run / "stages" / next(s["dir"] for s in status["stages"] if s["type"] == type_)


def metrics(run: Path) -> dict:
    """What must not change when a damaged stage is re-run: every model's top-1, the gates' verdicts."""
    report = json.loads((run / "report.json").read_text())
    return {
        "top1": {n: m["top1"] for n, m in report["models"].items()},
        "gates": {g["name"]: g["passed"] for g in report["gates"] if g["name"].startswith("accuracy")},
        "status": report["status"],
    }


RECIPE = smoke_recipe()
RECIPE["stages"][0].update(epochs=6, lr=0.1)  # learns something (about half right), so metrics can differ


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """One completed run of the smoke recipe (the reference), made once; copy it, never change it."""
    base = tmp_path_factory.mktemp("pristine")
    recipe = write_recipe(base / "r.yaml", RECIPE)
    proc = run_cli("run", recipe, "--output-dir", base / "ref" / "run")
    assert proc.returncode == 0, proc.stderr
    return base / "ref" / "run", recipe


@pytest.fixture
def completed(pristine, tmp_path):
    """A private copy of the completed run (in its own parent folder: no sibling to copy from)."""
    ref, recipe = pristine
    run = tmp_path / "own" / "run"
    shutil.copytree(ref, run)
    (run / ".lock").unlink(missing_ok=True)
    return run, recipe
