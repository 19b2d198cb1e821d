"""Point 2: --output-dir is missing, empty or a deploycraft run folder; anything else is refused before
any write, and a user's files are never deleted or overwritten."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.reliability.conftest import one_line_error, snapshot


def test_folder_with_user_files_is_refused_untouched(pristine, tmp_path):
    _, recipe = pristine
    target = tmp_path / "P"
    (target / "deploy").mkdir(parents=True)
    (target / "deploy" / "service.yaml").write_text("x\n")
    (target / "report.md").write_text("my notes\n")
    before = snapshot(target)
    line = one_line_error(run_cli("run", recipe, "-o", target), "--output-dir", "not a deploycraft run folder")
    assert "report.md" in line or "deploy" in line
    assert snapshot(target) == before
    assert sorted(p.name for p in target.iterdir()) == ["deploy", "report.md"]


def test_file_as_output_dir(pristine, tmp_path):
    _, recipe = pristine
    f = tmp_path / "afile"
    f.write_text("mine\n")
    one_line_error(run_cli("run", recipe, "-o", f), "--output-dir", "is a file")
    assert f.read_text() == "mine\n"


def test_output_dir_below_a_file(pristine, tmp_path):
    _, recipe = pristine
    f = tmp_path / "afile"
    f.write_text("mine\n")
    one_line_error(run_cli("run", recipe, "-o", f / "run"), "--output-dir", "is a file")
    assert f.read_text() == "mine\n"


def test_unwritable_output_dir(pristine):
    _, recipe = pristine
    # /proc refuses new folders even to root, like a read-only mount does.
    one_line_error(run_cli("run", recipe, "-o", "/proc/deploycraft-test/run"), "--output-dir", "cannot write")


def test_run_folder_of_another_recipe_is_refused(completed, tmp_path):
    run, _ = completed
    from tests.conftest import smoke_recipe, write_recipe

    other = write_recipe(tmp_path / "other.yaml", smoke_recipe(name="other"))
    before = snapshot(run)
    one_line_error(run_cli("run", other, "-o", run), "holds a run of recipe 'smoke'")
    assert snapshot(run) == before


def test_empty_folder_is_used(pristine, tmp_path):
    _, recipe = pristine
    target = tmp_path / "empty"
    target.mkdir()
    proc = run_cli("run", recipe, "-o", target)
    assert proc.returncode == 0, proc.stderr
    assert (target / "report.json").is_file()


def test_files_added_to_deploy_are_kept(completed):
    run, recipe = completed
    (run / "deploy" / "service.yaml").write_text("x\n")
    proc = run_cli("run", recipe, "-o", run)
    assert proc.returncode == 0, proc.stderr
    kept = list(run.glob("deploy.kept-*/service.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == "x\n"
    assert "service.yaml" in proc.stderr
    assert not (run / "deploy" / "service.yaml").exists()


def test_folder_with_a_foreign_run_json_is_refused_untouched(pristine, tmp_path):
    """A run.json alone does not make a run folder: deploycraft's names its recipe and a run state."""
    _, recipe = pristine
    target = tmp_path / "mine"
    target.mkdir()
    (target / "run.json").write_text('{"experiment": "mine"}\n')
    (target / "report.md").write_text("my notes\n")
    (target / "recipe.yaml").write_text("my: recipe\n")
    before = snapshot(target)
    one_line_error(run_cli("run", recipe, "-o", target), "--output-dir", "run.json that deploycraft did not write")
    assert snapshot(target) == before
    (target / "run.json").write_text("not json\n")  # unreadable, and no stages/ folder beside it
    before = snapshot(target)
    one_line_error(run_cli("run", recipe, "-o", target), "--output-dir", "did not write")
    assert snapshot(target) == before


def test_a_run_folder_with_an_unreadable_run_json_resumes(completed):
    run, recipe = completed
    (run / "run.json").write_text("{trunc")  # a run killed while writing it
    proc = run_cli("run", recipe, "-o", run)
    assert proc.returncode == 0, proc.stderr
    assert '"completed"' in (run / "run.json").read_text()


def test_outputs_inside_a_run_folders_deploy_or_stages_are_refused(completed, tmp_path):
    """`run -o`, `diagnose -o` and `bench --json` inside another run's deploy/ or stages/ would put files
    there that its next run moves aside and `inspect` calls not shipped: refused before any work."""
    run, recipe = completed
    before = snapshot(run)
    one_line_error(run_cli("run", recipe, "-o", run / "deploy" / "nested"), "--output-dir", "inside deploy/")
    one_line_error(run_cli("diagnose", run, "-o", run / "stages" / "diag"), "--output-dir", "inside stages/")
    onnx = next((run / "deploy").glob("*.onnx"))
    one_line_error(run_cli("bench", onnx, "--json", run / "deploy" / "b.json"), "--json", "inside deploy/")
    # where the file would land decides: through a link into deploy/ it is refused ...
    link = tmp_path / "to-deploy"
    link.symlink_to(run / "deploy", target_is_directory=True)
    one_line_error(run_cli("bench", onnx, "--json", link / "b.json"), "--json", "inside deploy/")
    assert snapshot(run) == before
    # ... and a path that only passes through deploy/ on its way out (deploy/../bench.json) is not
    out = run / "deploy" / ".." / "bench.json"
    proc = run_cli("bench", onnx, "--json", out, "--repeats", "3", "--warmup", "1", "-r", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert (run / "bench.json").is_file()
    (run / "bench.json").unlink()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # a link to itself: one line, not a traceback
    one_line_error(run_cli("bench", onnx, "--json", loop / "b.json"), "--json", "link loop")
