"""`deploycraft diagnose TARGET...`: the diagnostics of run folders or recipes, side by side.

A target is a run folder (its trained model by default, or the model of ``--stage``; read only from stages
whose records check out, as `inspect` does) or a recipe (its starting model: the seeded random init or
``model.weights``). A run folder whose diagnose stage completed is not measured again unless asked: its
verified result is taken as it is. ``--checkpoint`` adds the gradient flow of training
checkpoints (a train stage writes ``checkpoint.pt`` after each epoch; with several targets, ``N:PATH`` names
the target). The output folder (``-o``: new, empty, or an earlier output of this command, known by its
diagnose.json, whose ``written_by`` is ``deploycraft diagnose``; checked writable before anything is
measured) gets ``diagnose.json`` (every figure of every target and the comparisons of `diagnostics.compare`),
``diagnose.md`` and the plots, drawn with every target in each.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from deploycraft import diagnostics as dg
from deploycraft.artifacts import atomic_write_text, read_status, verify_stage, write_json
from deploycraft.errors import UserError
from deploycraft.outputs import WRITTEN_BY, check_outside_runs, check_writable_folder, owned_json
from deploycraft.progress import log
from deploycraft.stages.diagnose import DiagnoseConfig, DiagnoseStage, initial_model, recalibration_batches

OUTPUT_RECORD = "diagnose.json"
WRITER = "deploycraft diagnose"  # diagnose.json's first key says who wrote it (outputs.WRITTEN_BY)
OUTPUT_FIX = "choose a new or empty folder you can write to with --output-dir (-o)"


@dataclass
class Target:
    label: str
    source: str
    model: nn.Module
    init: nn.Module | None  # the random initialisation, when the model is not it
    recipe: Any
    settings: DiagnoseConfig
    result: dict[str, Any] | None = None  # taken from a completed diagnose stage
    snapshots: dict[str, nn.Module] = field(default_factory=dict)


def settings_from_options(options: dict[str, Any]) -> DiagnoseConfig:
    """The diagnose stage's config from the command's options (None: the default), every error one line."""
    given = {k: v for k, v in options.items() if v is not None and v != []}
    try:
        return DiagnoseConfig(**given)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        name = {"analyses": "analysis", "lesion-recalibration-images": "recalibrate-images"}.get(name, name)
        raise UserError(
            err["msg"].removeprefix("Value error, ") + f" (got {err.get('input')!r})",
            field=f"--{name}",
            fix="see `deploycraft diagnose --help`",
        ) from None


def _load_run(run_dir: Path, stage: str | None, settings: DiagnoseConfig, recompute: bool) -> Target:
    from deploycraft.models.io import load_model, read_spec
    from deploycraft.recipe import load_recipe

    status = read_status(run_dir)
    models: dict[str, Path] = {}
    diagnosed: dict[str, Any] | None = None
    for st in status.get("stages") or []:
        if not isinstance(st, dict) or not isinstance(st.get("dir"), str) or "/" in st["dir"]:
            continue
        folder = run_dir / "stages" / st["dir"]
        record, problems = verify_stage(folder, str(st.get("key")))
        if record is None:
            log(f"[yellow]  {run_dir}: skipping {st['dir']} ({problems[0]})[/]")
            continue
        out = record["output"]
        if out.get("model"):
            models[record["type"]] = folder / out["model"]
        if record["type"] == "diagnose":
            diagnosed = record
    if not models:
        raise UserError(
            f"{run_dir} holds no completed stage with a model",
            field="TARGET",
            fix="run the recipe first (`deploycraft run`), or give the recipe itself",
        )
    if stage is not None and stage not in models:
        raise UserError(
            f"{run_dir} has no completed {stage} stage with a model (it has {', '.join(models)})",
            field="--stage",
            fix=f"use one of {', '.join(models)}",
        )
    chosen = stage or ("train" if "train" in models else list(models)[-1])
    recipe = load_recipe(run_dir / "recipe.yaml")
    spec = read_spec(models[chosen])
    target = Target(
        label=spec["arch"],
        source=f"run folder {run_dir}, model of the {chosen} stage",
        model=load_model(models[chosen]),
        init=initial_model(spec, recipe.seed),
        recipe=recipe,
        settings=settings,
    )
    # The diagnose stage stands right after train: its result is this model's when train's model is chosen.
    if diagnosed is not None and not recompute and chosen == "train":
        stored = DiagnoseConfig(**diagnosed["config"])
        differ = [f for f in settings.model_fields_set if not _covered(f, getattr(settings, f), getattr(stored, f))]
        if differ:  # the options ask for something the stored diagnosis did not measure: its settings, changed
            given = {f: getattr(settings, f) for f in settings.model_fields_set}
            target.settings = DiagnoseConfig(**{**stored.model_dump(), **given})
            log(f"  {run_dir}: measuring again (its diagnose stage ran with other {', '.join(sorted(differ))})")
            return target
        target.result = copy.deepcopy(diagnosed["output"]["metrics"])
        target.result.pop("plots", None)
        target.settings = DiagnoseConfig(**diagnosed["config"])
        target.source += " (the run's diagnose stage)"
    return target


def _covered(name: str, asked: Any, stored: Any) -> bool:
    """Whether a stored diagnosis measured what an option asks (analyses: a subset of the stored ones)."""
    if name == "analyses":
        return set(asked) <= set(stored)
    return asked == stored


def _load_recipe(path: Path, overrides: list[str], settings: DiagnoseConfig) -> Target:
    from deploycraft.models.io import load_checkpoint
    from deploycraft.models.registry import create_model
    from deploycraft.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    m = recipe.model
    kwargs = {"num_classes": m.num_classes, "in_chans": m.in_chans or recipe.data.channels, **m.kwargs}
    torch.manual_seed(recipe.seed)
    try:
        model = create_model(m.arch, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{m.arch} cannot be built ({exc})", field="model.kwargs", source=str(path)) from None
    init = None
    source = f"recipe {path}, random initialisation (seed {recipe.seed})"
    if m.weights is not None:
        init = initial_model({"arch": m.arch, "kwargs": kwargs}, recipe.seed)
        load_checkpoint(model, Path(m.weights), strict=m.strict, reset_classifier=m.reset_classifier)
        source = f"recipe {path}, checkpoint {m.weights}"
    return Target(m.arch, source, model.eval(), init, recipe, settings)


def load_target(path: Path, overrides: list[str], stage: str | None, settings: DiagnoseConfig, recompute: bool):
    """A run folder (run.json inside) or a recipe file, as a diagnosis target."""
    path = Path(path)
    if path.is_dir():
        if not (path / "run.json").is_file():
            raise UserError(
                f"{path} is not a deploycraft run folder (no run.json)",
                field="TARGET",
                fix="give a run folder made by `deploycraft run` or a recipe YAML",
            )
        if overrides:
            raise UserError("--set applies to recipes, not run folders", field="--set", fix="drop --set")
        return _load_run(path, stage, settings, recompute)
    if stage is not None:
        raise UserError("--stage applies to run folders, not recipes", field="--stage", fix="drop --stage")
    return _load_recipe(path, overrides, settings)


def checkpoints_by_target(specs: list[str], targets: int) -> dict[int, list[Path]]:
    """``--checkpoint`` values: PATH (one target), or N:PATH for the N-th target (1-based) of several."""
    out: dict[int, list[Path]] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and head.isdigit():
            index, path = int(head), Path(rest)
            if not 1 <= index <= targets:
                raise UserError(
                    f"--checkpoint {spec}: there is no target {index} ({targets} given)",
                    field="--checkpoint",
                    fix="number the targets from 1 in the order given",
                )
        elif targets == 1:
            index, path = 1, Path(spec)
        else:
            raise UserError(
                f"--checkpoint {spec}: with {targets} targets, say whose checkpoint it is",
                field="--checkpoint",
                fix="write N:PATH, N the target's position (1 = the first)",
            )
        out.setdefault(index - 1, []).append(path)
    return out


def _checkpoint_snapshots(target: Target, paths: list[Path]) -> dict[str, nn.Module]:
    """Each checkpoint loaded into a copy of the target's model, labelled by its epoch (or file name)."""
    from deploycraft.models.io import load_checkpoint, read_checkpoint

    found = []
    for p in paths:
        obj = read_checkpoint(p, field="--checkpoint")
        epoch = obj.get("epoch") if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) else None
        model = load_checkpoint(copy.deepcopy(target.model), p, strict=True, field="--checkpoint").eval()
        found.append((epoch if epoch is not None else float("inf"), f"epoch {epoch}" if epoch else p.stem, model))
    return {label: model for _, label, model in sorted(found, key=lambda t: t[0])}


def _batches(target: Target) -> tuple[dg.Batches, dg.Batches, str, dg.Batches | None, str | None]:
    """Training and held-out batches, where the training ones come from, and the BN-recalibration batches of
    the lesion study (or None and why; none when the diagnosis is not measured here)."""
    from deploycraft.data import build_data

    s = target.settings
    data = build_data(target.recipe.data, target.recipe.seed)
    val = dg.take_images(data.val_batches(s.batch_size), s.images)
    recalibrate, skipped = recalibration_batches(data, s) if target.result is None else (None, None)
    if data.num_train:
        train = dg.take_images(data.train_epoch(s.batch_size, epoch=20_000, augment=None), s.train_images)
        return train, val, "training split", recalibrate, skipped
    return val, val, "held-out split (no training split)", recalibrate, skipped


def check_output_dir(out: Path) -> None:
    """Missing, empty, or the output of an earlier `deploycraft diagnose` (its diagnose.json says so), and
    writable: nothing else is overwritten, and nothing measured is lost to a folder that cannot be written."""
    check_outside_runs(out, "--output-dir", OUTPUT_FIX)
    if out.is_dir():
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as exc:
            raise UserError(
                f"cannot read {out} ({exc.strerror or exc})", field="--output-dir", fix=OUTPUT_FIX
            ) from None
        if entries and not owned_json(out / OUTPUT_RECORD, WRITER, _earlier_record):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            why = "its diagnose.json was not written by it" if OUTPUT_RECORD in entries else "no diagnose.json"
            raise UserError(
                f"{out} is not empty ({shown}) and is not the output of `deploycraft diagnose` ({why}); "
                "nothing in it is overwritten",
                field="--output-dir",
                fix=OUTPUT_FIX,
            )
    check_writable_folder(out, "--output-dir", OUTPUT_FIX)


def _earlier_record(record: dict[str, Any]) -> bool:
    """diagnose.json as the command wrote it before it was marked (targets, comparison, plots)."""
    targets, plots = record.get("targets"), record.get("plots")
    return (
        set(record) == {"targets", "comparison", "plots"}
        and isinstance(targets, dict)
        and isinstance(plots, dict)
        and bool(targets)
        and all(isinstance(t, dict) and set(t) == {"source", "settings", "result"} for t in targets.values())
    )


def default_output_dir(paths: list[Path], labels: list[str]) -> Path:
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / "diagnose"
    return Path("artifacts") / "diagnose" / "_vs_".join(labels)


def run(
    paths: list[Path],
    output_dir: Path | None,
    settings: DiagnoseConfig,
    checkpoints: list[str] | None = None,
    overrides: list[str] | None = None,
    stage: str | None = None,
    recompute: bool = False,
) -> tuple[Path, str]:
    """Diagnose every target, compare them, write the output folder; returns it and its markdown."""
    if not paths:
        raise UserError("no target", field="TARGET", fix="give run folders or recipes")
    by_target = checkpoints_by_target([str(c) for c in checkpoints or []], len(paths))
    if output_dir is not None:
        check_output_dir(Path(output_dir))  # before any model is loaded or measured
    targets = [load_target(p, overrides or [], stage, settings, recompute) for p in paths]
    labels: list[str] = []
    for t in targets:  # unique labels: resnet56, resnet56-2, ...
        label, n = t.label, 1
        while label in labels:
            n += 1
            label = f"{t.label}-{n}"
        t.label = label
        labels.append(label)
    out = Path(output_dir) if output_dir is not None else default_output_dir(paths, labels)
    if output_dir is None:
        check_output_dir(out)
    for index, ckpts in by_target.items():
        targets[index].snapshots = _checkpoint_snapshots(targets[index], ckpts)
    results: dict[str, dict[str, Any]] = {}
    for t in targets:
        log(f"[bold]diagnose[/] {t.label}: {t.source}")
        s = t.settings
        need_batches = t.result is None or t.snapshots
        recalibrate, skipped = None, None
        if need_batches:
            train, val, source, recalibrate, skipped = _batches(t)
        else:
            train, val, source = [], [], t.result.get("train_source", "")
        if t.result is None:
            snapshots = {"init": t.init} if t.init is not None and "gradients" in s.analyses else {}
            t.result = dg.diagnose(
                t.model,
                train,
                val,
                num_classes=t.recipe.model.num_classes,
                gradient_batches=s.gradient_batches,
                snapshots={**snapshots, **t.snapshots},
                analyses=tuple(s.analyses),
                recalibration_batches=recalibrate,
                recalibration_skipped=skipped,
            )
            if t.init is None and t.result.get("gradient_flow"):
                t.result["gradient_flow"][-1]["label"] = "init"  # the model is its own initialisation
            t.result["arch"], t.result["train_source"] = t.label, source
        elif t.snapshots:
            flows = [dg.gradient_flow(m, train[: s.gradient_batches], label) for label, m in t.snapshots.items()]
            old = t.result.get("gradient_flow") or []
            t.result["gradient_flow"] = [g for g in old if g["label"] == "init"] + flows
            t.result["gradient_flow"] += [g for g in old if g["label"] != "init"]
        results[t.label] = t.result
    comparison = dg.compare(results) if len(results) > 1 else None
    record = {
        WRITTEN_BY: WRITER,
        "targets": {
            t.label: {"source": t.source, "settings": t.settings.model_dump(mode="json"), "result": t.result}
            for t in targets
        },
        "comparison": comparison,
        "plots": {},
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        record["plots"] = dg.write_plots(results, out)
        write_json(out / OUTPUT_RECORD, record)
        text = render_markdown(record)
        atomic_write_text(out / "diagnose.md", text)
    except OSError as exc:  # checked writable before measuring; something changed since
        kept = _keep_elsewhere(record)
        raise UserError(
            f"cannot write the results to {out} ({_why(exc)})"
            + (f"; the measurements are kept in {kept}" if kept else "; the measurements could not be kept"),
            field="--output-dir",
            fix=f"{OUTPUT_FIX}, and run again",
        ) from None
    return out, text


def _keep_elsewhere(record: dict[str, Any]) -> Path | None:
    """Minutes of measurements are not dropped because the output folder failed late: the record goes to a
    new file in the system's temporary folder (a full disk may refuse it too)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix="deploycraft-diagnose-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, default=str)
        return Path(name)
    except OSError:
        return None


def _why(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc.strerror or exc)


def render_markdown(record: dict[str, Any]) -> str:
    """diagnose.md: each target's section as the diagnose stage writes it, the comparison, the plots."""
    lines = ["# deploycraft diagnose", ""]
    for label, t in record["targets"].items():
        section = DiagnoseStage.report_section({"stages": {"diagnose": {**t["result"], "plots": {}}}})
        lines += [f"**{label}**: {t['source']}.", *section[3:], ""]  # the stage's own heading dropped
    c = record.get("comparison")
    if c:
        lines += [
            "## Comparison",
            "",
            "| network | training error | training loss | held-out top-1 |",
            "|---|---|---|---|",
        ]
        for k in c["training_error"]:
            lines.append(
                f"| {k} | {c['training_error'][k] * 100:.2f} % | {c['training_loss'][k]:.4f} | "
                f"{c['held_out_top1'][k] * 100:.2f} % |"
            )
        if c["gradient_span_at_init"]:
            lines += [
                "",
                "| network at init | ‖dL/dW‖ span | ‖dL/dW‖ first/last | ‖dL/dy‖ span | ‖dL/dy‖ first/last |",
                "|---|---|---|---|---|",
            ]
            for k, g in c["gradient_span_at_init"].items():
                lines.append(
                    f"| {k} | {_num(g['weight_grad'])} | {_num(g['weight_grad_first_last'])} | "
                    f"{_num(g['output_grad'])} | {_num(g['output_grad_first_last'])} |"
                )
        for r in c["responses_smaller"]:
            lines += [
                "",
                f"Layer responses: {r['a']}'s std is smaller than {r['b']}'s on {r['a_smaller']} of {r['layers']} "
                f"3x3 layers ({r['fraction'] * 100:.0f} %).",
            ]
    for name, f in record["plots"].items():
        lines += ["", f"![{name.replace('_', ' ')}]({f})"]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"
