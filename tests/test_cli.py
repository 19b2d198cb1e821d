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


def _schema_in_process(*args):
    from typer.testing import CliRunner

    from deploycraft.cli import app

    result = CliRunner().invoke(app, ["schema", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_schema_output_replaces_only_its_own_file(tmp_path):
    recipe = write_recipe(tmp_path / "mine.yaml", smoke_recipe())
    before = recipe.read_text()
    (tmp_path / "notes.json").write_text('{"title": "mine"}\n')
    (tmp_path / "file").write_text("mine")
    for out, needle in (
        (recipe, "mine.yaml exists and was not written by `deploycraft schema`"),
        (tmp_path / "notes.json", "notes.json exists and was not written by `deploycraft schema`"),
        (tmp_path, f"{tmp_path} is a folder"),
        (tmp_path / "file" / "x.json", f"{tmp_path / 'file'} is a file"),
        ("/proc/deploycraft-nope/x.json", "cannot create /proc/deploycraft-nope"),
    ):
        code, stdout, stderr = _schema_in_process("-o", out)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith("error: --output: ") and needle in lines[0] and "fix:" in lines[0]
    assert recipe.read_text() == before and (tmp_path / "notes.json").read_text() == '{"title": "mine"}\n'
    out = tmp_path / "new" / "recipe.schema.json"  # a missing folder is made
    assert _schema_in_process("-o", out)[0] == 0
    assert "stages" in json.loads(out.read_text())["properties"]
    out.write_text(out.read_text().replace('"Recipe name;', '"Older text;'))  # an earlier version's: replaced
    assert _schema_in_process("-o", out)[0] == 0
    assert "Older text" not in out.read_text()


def test_models_lists_params_and_macs_of_one_family():
    proc = run_cli("models", "--family", "wrn")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_40_4"}
    assert "0.69 M" in rows["wrn_16_2"] and "0.101 G" in rows["wrn_16_2"]


@pytest.mark.parametrize("size", ["-3", "0", "1025"])
def test_models_refuses_a_size_that_is_no_resolution(size):
    line = _one_line_error(run_cli("models", "--family", "wrn", "--size", size))
    assert line.startswith(f"error: --size: {size} is not an input resolution") and "8 to 1024" in line


def test_models_marks_a_size_too_small_for_a_model():
    proc = run_cli("models", "--family", "densenet", "--size", "8")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert rows["densenet121"].split()[-1] == "n/a" and rows["densenet_bc_100_12"].endswith(" G")
    assert "too small an input" in proc.stdout


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


def _tiny_onnx(tmp_path, model):
    import torch

    from deploycraft.onnx_io import export_onnx
    from deploycraft.quant.graph import fold_bn

    path = tmp_path / "m.onnx"
    meta = {"deploycraft.input": {"channels": 3, "image_size": 16}}
    export_onnx(fold_bn(model), torch.randn(2, 3, 16, 16), path, metadata=meta)
    return path


def _bench_in_process(*args):
    """`deploycraft bench` in this process (typer's CliRunner over the real app), so that a test can patch it."""
    from typer.testing import CliRunner

    from deploycraft.cli import app

    result = CliRunner().invoke(app, ["bench", *map(str, args), "-r", "onnxruntime", "--repeats", "2", "--warmup", "0"])
    return result.exit_code, result.stdout, result.stderr


def test_bench_json_is_checked_before_timing(tmp_path, tiny_resnet, monkeypatch):
    from deploycraft import benchmarking

    model = _tiny_onnx(tmp_path, tiny_resnet)

    def timed(*args, **kwargs):
        raise AssertionError("timed before --json was checked")

    monkeypatch.setattr(benchmarking, "measure", timed)
    (tmp_path / "recipe.yaml").write_text("mine: 1\n")
    (tmp_path / "notes.json").write_text('{"threads": 4, "mine": true}\n')  # JSON, but not bench's
    (tmp_path / "file").write_text("mine")
    for out, needle in (
        (tmp_path, f"{tmp_path} is a folder"),
        (tmp_path / "recipe.yaml", "recipe.yaml exists and was not written by `deploycraft bench`"),
        (tmp_path / "notes.json", "notes.json exists and was not written by `deploycraft bench`"),
        (tmp_path / "file" / "x.json", f"{tmp_path / 'file'} is a file"),
        ("/proc/deploycraft-nope/x.json", "cannot create /proc/deploycraft-nope"),
    ):
        code, stdout, stderr = _bench_in_process(model, "--json", out)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith("error: --json: ") and needle in lines[0] and "fix:" in lines[0]
        assert not stdout.strip()
    assert (tmp_path / "recipe.yaml").read_text() == "mine: 1\n" and "mine" in (tmp_path / "notes.json").read_text()


def test_bench_json_makes_its_folder_and_replaces_only_its_own_file(tmp_path, tiny_resnet):
    model = _tiny_onnx(tmp_path, tiny_resnet)
    out = tmp_path / "new" / "deep" / "bench.json"
    code, stdout, stderr = _bench_in_process(model, "--json", out)
    assert code == 0, stderr
    first = json.loads(out.read_text())
    assert first["written_by"] == "deploycraft bench" and set(first["results"]) == {f"{model} @onnxruntime"}
    code, _, stderr = _bench_in_process(model, "-b", "2", "--json", out)  # its own file: replaced
    assert code == 0, stderr
    assert "2" in json.loads(out.read_text())["results"][f"{model} @onnxruntime"]
    # A file bench wrote before the mark is known by its keys, and replaced too.
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({k: v for k, v in first.items() if k != "written_by"}))
    code, _, stderr = _bench_in_process(model, "--json", earlier)
    assert code == 0, stderr
    assert json.loads(earlier.read_text())["written_by"] == "deploycraft bench"
    # the earliest bench wrote no runtimes list
    earlier.write_text(json.dumps({k: first[k] for k in ("threads", "input", "results") if k in first}))
    code, _, stderr = _bench_in_process(model, "--json", earlier)
    assert code == 0, stderr


def test_bench_json_write_failure_is_one_line_after_the_timings(tmp_path, tiny_resnet, monkeypatch):
    from deploycraft import benchmarking

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(benchmarking, "write_json", refuse)
    code, stdout, stderr = _bench_in_process(_tiny_onnx(tmp_path, tiny_resnet), "--json", tmp_path / "b.json")
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr and len(lines) == 1, stderr
    assert "--json" in lines[0] and "Permission denied" in lines[0] and "printed above" in lines[0]
    assert "batch 1:" in stdout


def test_bench_names_a_fixed_batch_before_timing(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    from deploycraft import benchmarking

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 1, 1])],
    )
    path = tmp_path / "b2.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    real = benchmarking.measure
    monkeypatch.setattr(benchmarking, "measure", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    for args, batch in (((), 1), (("-b", "2", "-b", "4"), 4)):
        code, stdout, stderr = _bench_in_process(path, *args)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
        assert lines[0].startswith("error: --batch: ") and "batch fixed at 2 (its input is 2x3x8x8)" in lines[0]
        assert f"cannot run batch {batch}" in lines[0] and "give --batch 2" in lines[0]
    monkeypatch.setattr(benchmarking, "measure", real)
    code, stdout, stderr = _bench_in_process(path, "-b", "2")
    assert code == 0 and "batch 2:" in stdout, stderr


def test_bench_missing_file_is_a_user_error(tmp_path):
    line = _one_line_error(run_cli("bench", tmp_path / "nope.onnx"))
    assert "does not exist" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run"], "Missing argument"),
        (["bench", "m.onnx", "--batch", "abc"], "Invalid value for '--batch'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    """A missing argument or a value of the wrong type: one line naming the command, exit 2 (no box)."""
    proc = run_cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "deploycraft" in lines[0] and needle in lines[0] and "--help" in lines[0]
