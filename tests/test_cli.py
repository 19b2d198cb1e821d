"""The command line as a user meets it: exit codes, one-line errors, no traceback, no run folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, smoke_recipe, write_recipe


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


BAD = {
    "unknown_key": (lambda r: r["stages"][0].update(epochz=2), "stages.0.epochz"),
    "wrong_type": (lambda r: r["stages"][0].update(epochs="many"), "stages.0.epochs"),
    "unknown_model": (lambda r: r["model"].update(arch="resnet19"), "model.arch"),
    "missing_weights": (lambda r: r["model"].update(weights="/nonexistent/w.pt"), "model.weights"),
    "missing_folder": (lambda r: r["data"].update(dataset="imagefolder", root="/nonexistent/data"), "data.root"),
    "bad_order": (lambda r: r["stages"].reverse(), "stages.1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_exits_2_without_run_folder(tmp_path, case):
    mutate, field = BAD[case]
    raw = smoke_recipe()
    mutate(raw)
    path = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "run"
    line = _one_line_error(run_cli("run", path, "--output-dir", out))
    assert field in line and "fix:" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("name: [x\n", "invalid YAML"),
        ("name: !!python/object/apply:os.system ['touch PWNED']\nmodel: {arch: resnet20}\n", "not allowed"),
    ],
)
def test_bad_yaml_exits_2_and_executes_nothing(tmp_path, text, needle):
    path = write_recipe(tmp_path / "r.yaml", text)
    line = _one_line_error(run_cli("run", path, "--output-dir", tmp_path / "run", cwd=tmp_path))
    assert needle in line
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "run").exists()


def test_bad_override_exits_2(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", smoke_recipe())
    line = _one_line_error(run_cli("validate", path, "--set", "stages.7.epochs=1"))
    assert "out of range" in line


def test_validate_and_schema(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", smoke_recipe())
    proc = run_cli("validate", path, "--set", "stages.train.epochs=2")
    assert proc.returncode == 0 and "valid" in proc.stdout
    proc = run_cli("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert "stages" in schema["properties"]


def test_models_lists_params_and_macs_of_one_family():
    proc = run_cli("models", "--family", "wrn")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_40_4"}
    assert "0.69 M" in rows["wrn_16_2"] and "0.101 G" in rows["wrn_16_2"]


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("deploycraft ")


def test_bench_compares_onnx_files(tmp_path, tiny_resnet):
    import torch

    from deploycraft.onnx_io import export_onnx
    from deploycraft.quant.graph import fold_bn

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    meta = {"deploycraft.input": {"channels": 3, "image_size": 16}}
    export_onnx(fold_bn(tiny_resnet), torch.randn(2, 3, 16, 16), a, metadata=meta)
    export_onnx(fold_bn(tiny_resnet), torch.randn(2, 3, 16, 16), b, metadata=meta)
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", a, b, "-b", "1", "-b", "4", "--repeats", "5", "--warmup", "1", "-r", "onnxruntime", "--json", out
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch 4:" in proc.stdout and "x vs first" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{a} @onnxruntime", f"{b} @onnxruntime"} and results[f"{a} @onnxruntime"]["4"]["p50"] > 0


def test_bench_missing_file_is_a_user_error(tmp_path):
    line = _one_line_error(run_cli("bench", tmp_path / "nope.onnx"))
    assert "does not exist" in line
