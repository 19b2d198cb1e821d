"""Command line: parse, load the recipe, call the pipeline, print a summary. Nothing else lives here.

Exit codes: 0 success, 1 a verification gate or an internal check failed, 2 bad input (one line on
stderr naming the field and the fix, never a traceback). Under torchrun the line starts with the rank
that failed, and only the first rank to fail prints one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import typer

from deploycraft import __version__
from deploycraft.errors import GateFailure, StageFailure, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="deploycraft: skip-connection CNNs from a trained model to a verified INT8 artifact.",
)

SetOption = typer.Option(None, "--set", "-s", help="Override a recipe field: path=value (e.g. stages.train.epochs=3).")


def _fail(exc: UserError, world=None) -> None:
    _say(world, "error: ", exc.one_line())
    raise typer.Exit(2)


def _say(world, lead: str, message: str) -> None:
    """Print one line (naming the rank in a data-parallel run) unless another rank of the run failed first."""
    if world is None or world.claim_failure(message):
        typer.echo(f"{lead}{world.label if world is not None else ''}{message}", err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deploycraft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """deploycraft: train or load -> quantize -> export -> verify, driven by one YAML recipe."""
    # One message, one line, also where stderr is a file or a pipe (rich wraps those at 80 columns): set
    # here rather than in progress.py, whose code is part of every stage's fingerprint.
    from deploycraft import progress

    progress.console.soft_wrap = True


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/resnet50_int8.yaml."),
    set_: List[str] | None = SetOption,
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Run folder (default artifacts/<name>/<run id>/)."
    ),
) -> None:
    """Run every stage of RECIPE; a re-run resumes from the last completed stage. Under `torchrun
    --nproc-per-node N -m deploycraft run RECIPE` training and distillation run data-parallel on N processes."""
    from deploycraft.distributed import PeerFailure, Terminated, interruptible, launch
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import load_recipe

    finished = False
    pipeline = None
    with launch() as world:
        try:
            r = load_recipe(recipe, set_ or [])
            pipeline = Pipeline(r, output_dir, source=str(recipe), world=world)
            with interruptible():
                pipeline.execute()
            finished = True
            if world.is_main:
                _summary(pipeline.run.root)
        except PeerFailure:
            world.linger()  # another rank failed first and said so; the launcher stops this one
            raise typer.Exit(1) from None
        except UserError as exc:
            _fail(exc, world)
        except GateFailure as exc:
            typer.echo(f"verification failed: {exc}", err=True)
            _summary(pipeline.run.root)
            raise typer.Exit(1) from None
        except StageFailure as exc:
            _say(world, "error: ", f"{exc} — fix: run the same command again to resume; if it fails again, report it")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            if world.is_main and world.failure() is None:
                ended = pipeline.finished if pipeline is not None else None
                if finished or ended:  # while its folder was released or the summary printed: the run is complete
                    typer.echo(
                        f"{what} after the run {ended or 'completed'}: its results are in {pipeline.run.root}", err=True
                    )
                else:
                    typer.echo(f"{what}: run the same command again to resume from the last completed stage", err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None


def _summary(run_dir: Path) -> None:
    report = run_dir / "report.md"
    if report.is_file():
        typer.echo(report.read_text())
    typer.echo(f"run folder: {run_dir}")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML."), set_: List[str] | None = SetOption) -> None:
    """Check a recipe without running it: the schema, then the files and models it names (as `run` does)."""
    from deploycraft.preflight import Preflight
    from deploycraft.recipe import load_recipe

    try:
        r = load_recipe(recipe, set_ or [])
        Preflight(r, network=False).run()
    except UserError as exc:
        _fail(exc)
    typer.echo(f"{recipe}: valid ({r.name}: {' -> '.join(s.type for s in r.stages if s.enabled)})")


@app.command()
def schema(
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Write to this file (a new file, its folder created if missing, or one an earlier `schema -o` wrote).",
    ),
) -> None:
    """Print the recipe's JSON Schema (every field, its type, default and description)."""
    from deploycraft.artifacts import atomic_write_text
    from deploycraft.outputs import check_output_file, write_error
    from deploycraft.recipe import is_schema_file, json_schema

    text = json.dumps(json_schema(), indent=2)
    if not output:
        typer.echo(text)
        return
    try:
        check_output_file(output, "--output", "deploycraft schema", is_schema_file, example="recipe.schema.json")
        try:
            atomic_write_text(output, text + "\n")
        except OSError as exc:
            raise write_error(output, exc, "--output") from None
    except UserError as exc:
        _fail(exc)


MIN_SIZE, MAX_SIZE = 8, 1024  # data.image_size's bounds


@app.command()
def models(
    family: str | None = typer.Option(None, help="Only this family (resnet, preact, densenet, ...)."),
    size: int | None = typer.Option(None, help="Input resolution for MACs (default: 224 ImageNet, 32 CIFAR)."),
) -> None:
    """List the registered architectures with parameters and MACs."""
    import torch

    from deploycraft.models.profile import count_macs, count_params
    from deploycraft.models.registry import create_model, list_models, model_info

    if size is not None and not MIN_SIZE <= size <= MAX_SIZE:
        _fail(
            UserError(
                f"{size} is not an input resolution",
                field="--size",
                fix=f"give a side length from {MIN_SIZE} to {MAX_SIZE} pixels (data.image_size's range), or leave "
                "--size out for each model's default",
            )
        )
    names = list_models(family)
    if not names:
        _fail(
            UserError(f"no models in family {family!r}", field="--family", fix="run `deploycraft models` to list all")
        )
    w = max(len(n) for n in names) + 2
    typer.echo(f"{'model':<{w}}{'family':<12}{'input':>6}{'classes':>9}{'params':>12}{'MACs':>11}")
    too_small = False
    for name in names:
        info = model_info(name)
        res = size if size is not None else (32 if info.input_style == "cifar" else 224)
        classes = 10 if info.input_style == "cifar" else 1000
        with torch.device("meta"):  # shapes only: no weights initialised, no arithmetic done
            m = create_model(name, num_classes=classes)
        try:
            macs = f"{count_macs(m, (3, res, res)) / 1e9:>9.3f} G"
        except RuntimeError:  # its downsampling leaves nothing of so small an input
            macs, too_small = f"{'n/a':>9}  ", True
        typer.echo(f"{name:<{w}}{info.family:<12}{res:>6}{classes:>9}{count_params(m) / 1e6:>10.2f} M{macs}")
    if too_small:
        typer.echo(
            f"n/a: {size}x{size} pixels are too small an input for the model (its downsampling leaves no pixels)"
        )


@app.command()
def inspect(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Print what a run folder holds: stages, model widths, MACs and params, deployables."""
    from deploycraft.inspect import describe

    try:
        typer.echo(describe(run_dir))
    except UserError as exc:
        _fail(exc)


@app.command()
def diagnose(
    targets: List[Path] = typer.Argument(..., metavar="RUN_DIR|RECIPE...", help="Run folders or recipes to diagnose."),
    output_dir: Path | None = typer.Option(
        None,
        "--output-dir",
        "-o",
        help="Output folder (default RUN_DIR/diagnose for one run folder, else artifacts/diagnose/<names>).",
    ),
    stage: str | None = typer.Option(
        None, "--stage", help="Run folder: diagnose the model of this stage (default: train's, else the last)."
    ),
    checkpoint: List[str] | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="A training checkpoint (an epoch's checkpoint.pt) whose gradient flow to add; N:PATH for the N-th target.",
    ),
    analysis: List[str] | None = typer.Option(
        None, "--analysis", "-a", help="gradients, responses, skip or lesion (repeat; default all)."
    ),
    images: int | None = typer.Option(None, help="Held-out images for responses, skip usage, lesions (default 2000)."),
    train_images: int | None = typer.Option(None, help="Training images for the training error (default 2000)."),
    gradient_batches: int | None = typer.Option(None, help="Batches the gradient norms are averaged over (default 4)."),
    batch_size: int | None = typer.Option(None, help="Images per batch (default 128)."),
    recalibrate_images: int | None = typer.Option(
        None,
        help="Lesions: also with every BN's statistics re-estimated on this many training images after each "
        "deletion (default 0: off).",
    ),
    recompute: bool = typer.Option(False, help="Measure again even where the run folder has a diagnose stage."),
    set_: List[str] | None = SetOption,
) -> None:
    """Gradient flow, layer responses, skip usage and lesions of run folders or recipes, compared side by side."""
    from deploycraft import diagnose_command

    try:
        settings = diagnose_command.settings_from_options(
            {
                "analyses": analysis,
                "images": images,
                "train_images": train_images,
                "gradient_batches": gradient_batches,
                "batch_size": batch_size,
                "lesion_recalibration_images": recalibrate_images,
            }
        )
        out, text = diagnose_command.run(
            targets, output_dir, settings, checkpoint or [], set_ or [], stage=stage, recompute=recompute
        )
    except UserError as exc:
        _fail(exc)
    typer.echo(text)
    typer.echo(f"output folder: {out}")


@app.command()
def bench(
    models_: List[Path] = typer.Argument(
        None, metavar="MODEL.onnx|MODEL.pt2...", help="ONNX files and AOTInductor packages to compare."
    ),
    batch: List[int] = typer.Option([1], "--batch", "-b", help="Batch sizes."),
    runtime: List[str] = typer.Option(
        None, "--runtime", "-r", help="onnxruntime and/or openvino (default: every one installed)."
    ),
    peak: bool = typer.Option(False, "--peak", help="Also measure the machine's conv ceiling (GMAC/s)."),
    threads: int | None = typer.Option(None, help="Intra-op threads (default: physical cores)."),
    repeats: int = typer.Option(100, help="Timed runs per model and batch size."),
    warmup: int = typer.Option(10, help="Untimed runs first."),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Also write the results to this JSON file (a new file, its folder created if missing, or one an "
        "earlier bench wrote; checked before timing).",
    ),
) -> None:
    """Time ONNX models side by side on every CPU runtime, and AOTInductor packages on the device they were
    compiled for (CUDA events on a GPU); interleaved, ratios are within one run."""
    from deploycraft.benchmarking import bench_onnx, check_json_output, write_results

    try:
        if json_out:
            check_json_output(json_out)
        text, results = bench_onnx(models_ or [], batch, threads, repeats, warmup, runtime or None, peak)
    except UserError as exc:
        _fail(exc)
    typer.echo(text)
    if json_out:
        try:
            write_results(json_out, results)
        except UserError as exc:
            _fail(exc)


def _kind(exc: BaseException) -> set[str]:
    """The class names of a command-line parsing exception (click's, which typer vendors in newer releases:
    matched by name, not by import)."""
    return {c.__name__ for c in type(exc).__mro__}


def entrypoint() -> None:
    """The console script: every error one line, usage errors (a missing argument, a value of the wrong
    type) included, where click would draw them in a box."""
    try:
        code = app(standalone_mode=False)
    except UserError as exc:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(2)
    except Exception as exc:
        kind = _kind(exc)
        if "ClickException" not in kind and "Abort" not in kind:
            raise
        ctx = getattr(exc, "ctx", None)
        if "NoArgsIsHelpError" in kind:  # `deploycraft` alone: its help
            typer.echo(ctx.get_help() if ctx is not None else exc.format_message(), err=True)
            sys.exit(2)
        if "Abort" in kind:
            typer.echo("aborted", err=True)
            sys.exit(1)
        text = " ".join(exc.format_message().split())
        if "UsageError" in kind:
            command = ctx.command_path if ctx is not None else "deploycraft"
            typer.echo(f"error: {command}: {text} — fix: see `{command} --help`", err=True)
        else:
            typer.echo(f"error: {text}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entrypoint()
