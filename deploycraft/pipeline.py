"""Runs a recipe's stages in order, caching each completed stage by content hash, and resumes.

Each stage's key is a hash of the previous stage's key (hence of everything before it), its own
config, the data config and fingerprint, the seed and the code version. A stage folder with a
``stage.json`` is complete: a re-run finds it (in this run folder, or in a sibling run folder of
the same recipe name) and skips the stage. A stage without it is re-run; the train stage also keeps
per-epoch checkpoints in its folder and continues from the last completed epoch.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from deploycraft import artifacts as af
from deploycraft.data.transforms import input_spec
from deploycraft.errors import GateFailure, UserError
from deploycraft.models.io import load_checkpoint, load_model, save_model
from deploycraft.models.registry import create_model
from deploycraft.progress import log, set_log_file
from deploycraft.recipe import Recipe
from deploycraft.stages import STAGES, StageOutput

DEFAULT_BASE = Path("artifacts")


def default_run_dir(recipe: Recipe, base: Path = DEFAULT_BASE) -> Path:
    return base / recipe.name / af.sha256_json(recipe.model_dump(mode="json"))[:10]


def data_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What identifies the data beyond its config: file digests, or the ImageFolder's file list."""
    d = recipe.data
    if d.dataset == "fashion-mnist":
        from deploycraft.data.fashion_mnist import FILES

        return {"fashion-mnist": FILES}
    if d.dataset == "imagefolder":
        out = {}
        for split in (d.train_split, d.val_split):
            folder = Path(d.root) / split
            if folder.is_dir():
                files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
                out[split] = af.sha256_json(files)
        return out
    return {"synthetic": True}


class RunContext:
    def __init__(self, recipe: Recipe, run: af.RunDir):
        self.recipe = recipe
        self.run = run
        self.model_dir: Path | None = None  # the current float model (spec.json + weights.pt)
        self.reference_dir: Path | None = None  # the FP32 model before pruning: the accuracy reference
        self.artifacts: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.stage_dirs: dict[str, Path] = {}

    @cached_property
    def data(self):
        from deploycraft.data import build_data

        return build_data(self.recipe.data, self.recipe.seed)

    @property
    def device(self) -> str:
        """The torch device for training: the recipe's, with auto resolved to cuda when a GPU is visible."""
        wanted = self.recipe.device
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "device is cuda but torch sees no GPU",
                field="device",
                fix="set device: cpu (or auto), or install a CUDA build of torch on a GPU machine",
            )
        return wanted

    @property
    def in_chans(self) -> int:
        return self.recipe.model.in_chans or self.recipe.data.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.recipe.data.image_size, self.recipe.data.image_size)

    def load_model(self, folder: Path | None = None) -> torch.nn.Module:
        return load_model(folder or self.model_dir)

    def artifact_path(self, name: str) -> Path:
        return self.run.root / self.artifacts[name]["path"]

    def apply(self, type_: str, stage_dir: Path, out: StageOutput) -> None:
        if out.model is not None:
            self.model_dir = stage_dir / out.model
            if type_ in ("init", "train"):
                self.reference_dir = self.model_dir
        for name, art in out.artifacts.items():
            self.artifacts[name] = {**art, "path": str((stage_dir / art["path"]).relative_to(self.run.root))}
        self.results[type_] = out.metrics
        self.stage_dirs[type_] = stage_dir


def _init_model(recipe: Recipe, in_chans: int, workdir: Path) -> StageOutput:
    """The starting model: seeded random init, or the user's checkpoint."""
    m = recipe.model
    kwargs = {"num_classes": m.num_classes, "in_chans": in_chans, **m.kwargs}
    torch.manual_seed(recipe.seed)
    try:
        model = create_model(m.arch, **kwargs)
    except TypeError as exc:
        raise UserError(
            f"{m.arch} does not accept these arguments ({exc})",
            field="model.kwargs",
            fix="remove the arguments the architecture does not take",
        ) from None
    except ValueError as exc:
        raise UserError(str(exc), field="model.kwargs", fix="use values the architecture accepts") from None
    source = "random init (He et al.)"
    if m.weights is not None:
        load_checkpoint(model, Path(m.weights), strict=m.strict, reset_classifier=m.reset_classifier)
        source = f"checkpoint {m.weights}"
    save_model(model, workdir / "model", m.arch, kwargs)
    return StageOutput(model="model", metrics={"source": source, "arch": m.arch, **kwargs})


def _find_cached(run: af.RunDir, name: str) -> Path | None:
    """A completed stage folder with this name: in this run folder, else in another run folder.

    Keys hash everything a stage depends on, so a stage completed by any recipe is reusable: other
    runs of the same recipe name are searched, and all of artifacts/ when the run lives there.
    """
    own = run.stages / name
    if (own / "stage.json").is_file():
        return own
    root = run.root.resolve()
    candidates = set(root.parent.glob(f"*/stages/{name}/stage.json"))
    base = DEFAULT_BASE.resolve()
    if root.parent.parent == base:
        candidates |= set(base.glob(f"*/*/stages/{name}/stage.json"))
    for marker in sorted(candidates):
        if marker.parent.parent.parent != root:
            return marker.parent
    return None


def _adopt(src: Path, dst: Path) -> None:
    """Bring a completed stage from a sibling run: hard links, so no space is spent."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=_link)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Pipeline:
    def __init__(self, recipe: Recipe, output_dir: Path | None = None, source: str | None = None):
        self.recipe = recipe
        self.run = af.RunDir(output_dir or default_run_dir(recipe))
        self.source = source

    def preflight(self) -> None:
        """Checks that need the file system, before anything is created."""
        d = self.recipe.data
        if d.dataset == "fashion-mnist":
            from deploycraft.data import fashion_mnist

            fashion_mnist.locate(d.root, d.download)
        for st in self.recipe.stages:
            if st.type not in STAGES:
                raise UserError(
                    f"stage type {st.type!r} is not available in this version",
                    field="stages",
                    fix=f"use one of {', '.join(STAGES)}",
                )

    def execute(self) -> RunContext:
        self.preflight()
        run = self.run
        run.create()
        run.lock()
        set_log_file(run.root / "log.txt")
        ctx = RunContext(self.recipe, run)
        status: dict[str, Any] = {"recipe": self.recipe.name, "status": "running", "started": time.time(), "stages": []}
        af.atomic_write_text(
            run.root / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        )
        af.write_json(run.root / "run.json", status)
        log(f"[bold]deploycraft run[/] {self.recipe.name} -> {run.root}")
        if self.recipe.threads:
            torch.set_num_threads(self.recipe.threads)
        try:
            self._run_stages(ctx, status)
            gate_failures = self._finish(ctx)
        except BaseException as exc:
            status["status"] = "failed"
            status["error"] = exc.one_line() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (UserError, KeyboardInterrupt)):
                status["traceback"] = traceback.format_exc()
            af.write_json(run.root / "run.json", status)
            run.unlock()
            set_log_file(None)
            raise
        status["status"] = "failed" if gate_failures else "completed"
        status["finished"] = time.time()
        if gate_failures:
            status["error"] = "; ".join(gate_failures)
        af.write_json(run.root / "run.json", status)
        af.write_manifest(
            run,
            {
                "recipe": self.recipe.name,
                "status": status["status"],
                "stages": status["stages"],
                "input": input_spec(self.recipe.data).to_dict(),
            },
        )
        run.unlock()
        set_log_file(None)
        if gate_failures:
            raise GateFailure("; ".join(gate_failures))
        return ctx

    def _keys(self) -> tuple[str, dict]:
        r = self.recipe
        base = {
            "code": af.code_version(),
            "seed": r.seed,
            "data": r.data.model_dump(mode="json"),
            "data_fingerprint": data_fingerprint(r),
        }
        model = r.model.model_dump(mode="json")
        if r.model.weights is not None:
            model["weights_sha256"] = af.sha256_file(Path(r.model.weights))
        return af.sha256_json({**base, "model": model, "in_chans": r.model.in_chans or r.data.channels}), base

    def _run_stages(self, ctx: RunContext, status: dict) -> None:
        key, base = self._keys()
        steps: list[tuple[str, Any]] = [("init", None)] + [(s.type, s) for s in self.recipe.stages]
        for index, (type_, cfg) in enumerate(steps):
            if cfg is not None:
                if not cfg.enabled:
                    log(f"[dim]- {type_}: disabled[/]")
                    continue
                key = af.sha256_json({**base, "previous": key, "stage": cfg.model_dump(mode="json")})
            stage_dir = self.run.stage_dir(index, type_, key)
            cached = _find_cached(self.run, stage_dir.name)
            if cached is not None and af.read_json(cached / "stage.json").get("key") != key:
                cached = None  # a 48-bit prefix collision: never reuse another stage's result
            if cached is not None:
                if cached != stage_dir:
                    _adopt(cached, stage_dir)
                record = af.read_json(stage_dir / "stage.json")
                out = StageOutput(**record["output"])
                ctx.apply(type_, stage_dir, out)
                status["stages"].append({"type": type_, "key": key, "dir": stage_dir.name, "cached": True})
                log(f"[green]✓[/] {type_} [dim](cached: {stage_dir.name})[/]")
                continue
            stage_dir.mkdir(parents=True, exist_ok=True)
            log(f"[bold cyan]▶ {type_}[/]")
            started = time.time()
            if cfg is None:
                out = _init_model(self.recipe, ctx.in_chans, stage_dir)
            else:
                out = STAGES[type_](cfg).run(ctx, stage_dir)
            duration = time.time() - started
            ctx.apply(type_, stage_dir, out)
            record = {
                "type": type_,
                "key": key,
                "config": cfg.model_dump(mode="json") if cfg else None,
                "code": af.code_version(),
                "started": started,
                "duration_s": round(duration, 2),
                "output": asdict(out),
            }
            af.write_json(stage_dir / "stage.json", record)  # written last: marks the stage complete
            status["stages"].append(
                {"type": type_, "key": key, "dir": stage_dir.name, "cached": False, "duration_s": round(duration, 2)}
            )
            af.write_json(self.run.root / "run.json", status)
            log(f"[green]✓[/] {type_} [dim]({duration:.1f} s)[/]")

    def _finish(self, ctx: RunContext) -> list[str]:
        from deploycraft.report import write_report

        deploy = self.run.deploy
        if deploy.exists():
            shutil.rmtree(deploy)
        for art in ctx.artifacts.values():
            src = self.run.root / art["path"]
            af.link_or_copy(src, deploy / src.name)
            art["deploy_path"] = str((deploy / src.name).relative_to(self.run.root))
        if ctx.model_dir is not None:
            for f in ("spec.json", "weights.pt"):
                af.link_or_copy(ctx.model_dir / f, deploy / "torch" / f)
        report = write_report(ctx)
        return [f"gate {g['name']} failed: {g['detail']}" for g in report.get("gates", []) if not g["passed"]]
