"""Runs a recipe's stages in order, reusing every stage whose verified result already exists.

A stage's key hashes what its result depends on: the data (config and fingerprint), the seed, the
top-level fields it reads (``Stage.reads``), its own config, the fingerprint of the code it runs
(fingerprint.py), and the sealed record of the stage before it, so a stage that runs again makes
every stage after it run again. A stage folder is reused only when its record and every file it
lists check out (artifacts.verify_stage), in this run folder or, copied, from a sibling run folder;
a damaged one is reported by file and re-run, never shipped. Training resumes from its last epoch.

Under torchrun (distributed.py) rank 0 alone reads and writes the run folder and makes every decision
(reuse or run, the records, the outcome) and publishes it; the other ranks follow: they run the
data-parallel stages with it and wait, idle, while it runs the others.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from deploycraft import __version__
from deploycraft import artifacts as af
from deploycraft.context import RunContext, resolve_device
from deploycraft.data.transforms import input_spec
from deploycraft.distributed import PeerFailure, World, disarm
from deploycraft.errors import GateFailure, StageFailure, UserError
from deploycraft.fingerprint import fingerprint
from deploycraft.machine import hardware, versions
from deploycraft.outputs import check_outside_runs, check_run_json
from deploycraft.progress import log, set_log_file
from deploycraft.recipe import Recipe, dump_yaml
from deploycraft.stages import STAGES, StageOutput

DEFAULT_BASE = Path("artifacts")
RESULT_NEUTRAL_DATA = ("download", "num_workers")  # data fields left out of every stage's cache key
SHIPPING = ".shipping.json"  # what deploy/ holds, between its rename and the manifest
STAGING = ".deploy-new"  # deploy/ as it is copied and checked, before its rename


def default_run_dir(recipe: Recipe, base: Path = DEFAULT_BASE) -> Path:
    return base / recipe.name / af.sha256_json(recipe.model_dump(mode="json"))[:10]


def data_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What identifies the data beyond its config: file digests, or the list of the images an ImageFolder
    split reads (each class folder's image files, a linked class folder followed) with each file's size and
    modification time (reading every image of a large folder at each run would cost minutes;
    an image replaced in place gets a new time unless the copy preserved it, and a copied folder re-runs
    the stages that read it rather than trusting it)."""
    d = recipe.data
    if d.dataset == "fashion-mnist":
        from deploycraft.data.fashion_mnist import FILES

        return {"fashion-mnist": FILES}
    if d.dataset == "imagefolder":
        from deploycraft.data.imagefolder import find_classes, image_files

        out = {}
        for split in (d.train_split, d.val_split):
            folder = Path(d.root) / split
            if folder.is_dir():
                files = [
                    (str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
                    for name in find_classes(folder)
                    for p in image_files(folder / name)
                    if (st := p.stat())
                ]
                # the class folders too: they are the labels, an empty one included
                out[split] = af.sha256_json({"classes": find_classes(folder), "files": files})
        return out
    return {"synthetic": True}


def calibration_digest(recipe: Recipe) -> str | None:
    """The content of the calibration file the recipe names (None: none named). It joins the cache key of the
    stages that read it (``reads_calibration``), so that a file rewritten in place re-runs them, and only
    them: its path alone would keep the old INT8 files."""
    path = recipe.data.calibration
    return af.sha256_file(Path(path)) if path is not None and Path(path).is_file() else None


def config_file_digests(cfg: Any, prefix: str = "") -> dict[str, str]:
    """The content of every file a stage's settings name (a distillation teacher's checkpoint, say), by field
    path: it joins the stage's cache key, so that a file rewritten in place re-runs the stage (its path alone
    would keep the old result). Empty for settings that name no file, so their keys do not change."""
    from pydantic import BaseModel

    out: dict[str, str] = {}
    if isinstance(cfg, BaseModel):
        for name in type(cfg).model_fields:
            out.update(config_file_digests(getattr(cfg, name), f"{prefix}.{name}" if prefix else name))
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            out.update(config_file_digests(value, f"{prefix}.{i}"))
    elif isinstance(cfg, dict):
        for key, value in cfg.items():
            out.update(config_file_digests(value, f"{prefix}.{key}"))
    elif isinstance(cfg, Path) and cfg.is_file():
        out[prefix] = af.sha256_file(cfg)
    return out


def _disk_full(exc: BaseException) -> str | None:
    """The words for an error that means the disk (or the user's quota) is full, else None: an OSError of
    that kind anywhere in the exception's chain (torch.save reports it as a RuntimeError without one)."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.strerror or "no space left on device"
        if isinstance(exc, RuntimeError) and "file write failed" in str(exc):
            return "a file could not be written (no space left on the device?)"
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _disk_full_error(full: str, root: Path, where: str = "") -> UserError:
    """The machine's state, not a bug: one line, and the same command resumes once there is room."""
    return UserError(
        f"{where}{full} while writing to {root}",
        field="--output-dir",
        fix="free space there (or choose another --output-dir) and run the same command again: it resumes "
        "from the last completed stage",
    )


def stage_code(type_: str) -> dict[str, Any]:
    """The fingerprint of what a stage runs: its module and the run context (data, model loading)."""
    return fingerprint(STAGES[type_].__module__, "deploycraft.context")


def _candidates(run: af.RunDir, name: str) -> list[Path]:
    """Completed stage folders of this name in sibling run folders (all of artifacts/ when the run is there)."""
    root = run.root.resolve()
    found = set(root.parent.glob(f"*/stages/{name}/{af.STAGE_RECORD}"))
    base = DEFAULT_BASE.resolve()
    if root.parent.parent == base:
        found |= set(base.glob(f"*/*/stages/{name}/{af.STAGE_RECORD}"))
    return [m.parent for m in sorted(found) if m.parent.parent.parent != root]


def _adopt(src: Path, dst: Path, record: dict[str, Any]) -> None:
    """Copy a verified stage from a sibling run: its listed files and its record, then swap it in."""
    tmp = dst.parent / f".adopt-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for rel in record["files"]:
        af.copy_file(src / rel, tmp / rel)
    af.copy_file(src / af.STAGE_RECORD, tmp / af.STAGE_RECORD)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def write_manifest(run: af.RunDir, extra: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """manifest.json: ``files`` maps paths (relative to the run folder) to the size and sha256 that were
    verified or hashed as they were written; nothing is re-hashed from disk here."""
    manifest = {
        "deploycraft": __version__,
        **extra,
        "versions": versions(),
        "hardware": hardware(),
        "files": [{"path": p, **files[p]} for p in sorted(files)],
    }
    af.write_json(run.root / "manifest.json", manifest)
    return manifest


class Pipeline:
    def __init__(
        self, recipe: Recipe, output_dir: Path | None = None, source: str | None = None, world: World | None = None
    ):
        self.recipe = recipe
        self.run = af.RunDir(output_dir or default_run_dir(recipe))
        self.source = source
        self.world = world or World()
        self._current = "setup"  # what is running, for the one-line error of an internal failure
        self.finished: str | None = None  # the run's status once its records are all written

    def preflight(self) -> None:
        """Every check that can fail before a stage runs, before anything is written."""
        from deploycraft.preflight import Preflight

        Preflight(self.recipe, network=True).run()
        check_outside_runs(
            self.run.root,
            "--output-dir",
            "choose a folder outside the deploy/ and stages/ of every run folder with --output-dir, or leave it out",
        )
        check_run_json(self.run.root)  # before check_usable, which trusts a run.json
        self.run.check_usable(self.recipe.name)

    def execute(self) -> RunContext:
        world = self.world
        world.start(resolve_device(self.recipe.device))
        if not world.is_main:
            return self._follow()
        self.preflight()
        run = self.run
        previous = af.read_status(run.root)
        run.create()
        run.lock()
        set_log_file(run.root / "log.txt")
        ctx = RunContext(self.recipe, run, world=world)
        status: dict[str, Any] = {
            "recipe": self.recipe.name,
            "status": "running",
            "started": time.time(),
            "world_size": world.size,
            "backend": world.backend,
            "stages": [],
        }
        try:
            recipe_text = dump_yaml(self.recipe.model_dump(mode="json"))
            earlier = run.root / "recipe.yaml"
            recipe_changed = earlier.is_file() and earlier.read_text(errors="replace") != recipe_text
            af.write_json(run.root / "run.json", status)  # before anything is withdrawn: a stop reads "running"
            log(f"[bold]deploycraft run[/] {self.recipe.name} -> {run.root}")
        except OSError as exc:
            full = _disk_full(exc)
            run.unlock()
            set_log_file(None)
            if full is None:
                raise
            raise _disk_full_error(full, run.root) from None
        if world.parallel:
            log(f"data-parallel: {world.size} process(es), {world.backend}; rank 0 writes this folder")
        if previous.get("status") == "interrupted":
            log("[yellow]the previous run in this folder was interrupted: resuming from its last completed step[/]")
        if self.recipe.threads:
            torch.set_num_threads(self.recipe.threads)
        try:
            if recipe_changed:
                self._withdraw_results("the recipe changed")
            # after the withdrawal: a stop before its end finds the earlier recipe, and withdraws again
            written = {"recipe.yaml": af.atomic_write_text(earlier, recipe_text)}
            records = self._run_stages(ctx, status)
            gate_failures, files = self._finish(ctx, records)
            # the run's own records, last: a Ctrl-C while they are written leaves run.json "interrupted" and
            # the same command finishes them (every stage reused)
            status["status"] = "failed" if gate_failures else "completed"
            status["finished"] = time.time()
            if gate_failures:
                status["error"] = "; ".join(gate_failures)
            files.update(written)
            files["run.json"] = af.write_json(run.root / "run.json", status)
            files["log.txt"] = af.file_entry(run.root / "log.txt")
            write_manifest(
                run,
                {
                    "recipe": self.recipe.name,
                    "status": status["status"],
                    "world_size": world.size,
                    "stages": status["stages"],
                    "input": input_spec(self.recipe.data).to_dict(),
                },
                files,
            )
            (run.root / SHIPPING).unlink(missing_ok=True)
            self.finished = status["status"]  # a stop from here on finds the run's records complete
        except BaseException as exc:
            disarm()
            status.pop("finished", None)
            other = world.failure()  # another rank failed first: this exception follows from that
            if other is not None:
                status["status"] = "failed"
                status["error"] = other
            elif isinstance(exc, KeyboardInterrupt):
                status["status"] = "interrupted"
            else:
                status["status"] = "failed"
            if other is None:
                status["error"] = exc.one_line() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            full = _disk_full(exc)
            if other is None and not isinstance(exc, (UserError, KeyboardInterrupt)) and full is None:
                status["traceback"] = traceback.format_exc()
                log(status["traceback"].rstrip(), to_console=False, markup=False)
            try:
                af.write_json(run.root / "run.json", status)
            except OSError:
                if full is None:
                    raise
            run.unlock()
            set_log_file(None)
            if other is not None:
                raise PeerFailure(other) from exc
            if isinstance(exc, (UserError, KeyboardInterrupt, GateFailure)):
                raise
            if full is not None:  # the machine's state, not a bug: the run resumes once there is room
                raise _disk_full_error(full, run.root, f"stage {self._current}: ") from None
            raise StageFailure(self._current, exc, run.root) from exc
        run.unlock()
        set_log_file(None)
        world.publish(status["status"])  # the other ranks end with rank 0
        if gate_failures:
            raise GateFailure("; ".join(gate_failures))
        return ctx

    def _follow(self) -> RunContext:
        """A rank other than 0: run the data-parallel stages with rank 0, wait idle while it runs the others,
        take every decision from it, write nothing."""
        ctx = RunContext(self.recipe, self.run, world=self.world)
        if self.recipe.threads:
            torch.set_num_threads(self.recipe.threads)
        try:
            self._run_stages(ctx, None)
            self.world.publish(None)
        except BaseException as exc:
            disarm()
            other = self.world.failure()
            if other is not None and not isinstance(exc, PeerFailure):
                raise PeerFailure(other) from exc
            if isinstance(exc, (UserError, KeyboardInterrupt, PeerFailure)):
                raise
            raise StageFailure(self._current, exc) from exc
        return ctx

    def _base(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "seed": r.seed,
            # how the data is fetched and decoded (download, worker processes) changes no result: the
            # augmentation is drawn in the main process from the seed
            "data": r.data.model_dump(mode="json", exclude=set(RESULT_NEUTRAL_DATA)),
            "data_fingerprint": data_fingerprint(r),
        }

    def _reads(self, type_: str) -> dict[str, Any]:
        values = {}
        for name in STAGES[type_].reads:
            values[name] = resolve_device(self.recipe.device) if name == "device" else getattr(self.recipe, name)
        return values

    def _reuse(self, type_: str, stage_dir: Path, key: str) -> dict[str, Any] | None:
        """The verified record of this stage from this run folder or a sibling's, else None."""
        if (stage_dir / af.STAGE_RECORD).exists():
            record, problems = af.verify_stage(stage_dir, key)
            if record is not None:
                return record
            log(
                f"[yellow]! {type_}: {stage_dir.name} is damaged ({'; '.join(problems[:3])}"
                f"{'; ...' if len(problems) > 3 else ''}): it will run again[/]"
            )
            try:
                old = af.read_json(stage_dir / af.STAGE_RECORD)
                old_files = old.get("files") if isinstance(old, dict) and isinstance(old.get("files"), dict) else None
            except (OSError, ValueError):
                old_files = None
            af.discard_damaged(stage_dir, old_files)
        for candidate in _candidates(self.run, stage_dir.name):
            record, problems = af.verify_stage(candidate, key)
            if record is None:
                log(f"[dim]  not reusing {candidate}: {problems[0]}[/]")
                continue
            _adopt(candidate, stage_dir, record)
            record, problems = af.verify_stage(stage_dir, key)
            if record is not None:
                log(f"[dim]  {type_}: copied from {candidate.parent.parent}[/]")
                return record
        return None

    def _run_stages(self, ctx: RunContext, status: dict | None) -> list[tuple[Path, dict[str, Any]]]:
        """Every stage in order: rank 0 decides to reuse or run it and publishes the decision and the record;
        a data-parallel stage runs on every rank, any other on rank 0 alone (``status`` is rank 0's)."""
        r = self.recipe
        world = self.world
        main = world.is_main
        if main:
            base = self._base()
            model = r.model.model_dump(mode="json")
            if r.model.weights is not None:
                model["weights_sha256"] = af.sha256_file(Path(r.model.weights))
            previous = af.sha256_json({**base, "model": model, "in_chans": ctx.in_chans})
            calibration = calibration_digest(r)
        records = []
        withdrawn = False
        steps: list[tuple[str, Any]] = [("init", None)] + [(s.type, s) for s in r.stages]
        for index, (type_, cfg) in enumerate(steps):
            if cfg is not None and not cfg.enabled:
                log(f"[dim]- {type_}: disabled[/]")
                continue
            self._current = type_
            decision = None
            if main:
                code = stage_code(type_)
                fields = {
                    **base,
                    "previous": previous,
                    "stage": STAGES[type_].key_config(cfg) if cfg is not None else None,
                    "reads": self._reads(type_),
                    "code": code["sha256"],
                }
                if calibration is not None and STAGES[type_].reads_calibration:
                    fields["calibration_sha256"] = calibration
                if cfg is not None and (files := config_file_digests(cfg)):
                    fields["files_sha256"] = files
                if derived := STAGES[type_].derived(r, cfg):
                    fields["derived"] = derived
                key = af.sha256_json(fields)
                stage_dir = self.run.stage_dir(index, type_, key)
                decision = {"dir": stage_dir.name, "record": self._reuse(type_, stage_dir, key)}
                if decision["record"] is None and not withdrawn:
                    # a stage computes anew: the earlier report may no longer be this run's (before the
                    # decision is published, so that no other rank waits in the stage meanwhile)
                    self._withdraw_results(f"the {type_} stage runs again")
                    withdrawn = True
            decision = world.publish(decision)
            stage_dir, record = self.run.stages / decision["dir"], decision["record"]
            if record is None:
                if main:
                    stage_dir.mkdir(parents=True, exist_ok=True)
                    log(f"[bold cyan]▶ {type_}[/]")
                    status["stages"].append({"type": type_, "key": key, "dir": stage_dir.name, "cached": False})
                started = time.time()
                stage = STAGES[type_](cfg)
                if main or stage.runs_data_parallel():
                    out = stage.run(ctx, stage_dir)
                if main:
                    duration = round(time.time() - started, 2)
                    record = af.write_stage_record(
                        stage_dir,
                        {
                            "type": type_,
                            "key": key,
                            "config": cfg.model_dump(mode="json") if cfg is not None else None,
                            "code": code,
                            "started": started,
                            "duration_s": duration,
                            "output": asdict(out),
                        },
                    )
                    status["stages"][-1]["duration_s"] = duration
                    log(f"[green]✓[/] {type_} [dim]({duration:.1f} s)[/]")
                record = world.publish(record)
            elif main:
                status["stages"].append({"type": type_, "key": key, "dir": stage_dir.name, "cached": True})
                log(f"[green]✓[/] {type_} [dim](cached: {stage_dir.name})[/]")
            ctx.apply(type_, stage_dir, StageOutput(**record["output"]))
            records.append((stage_dir, record))
            if main:
                previous = record["digest"]
                af.write_json(self.run.root / "run.json", status)
        return records

    def _finish(self, ctx: RunContext, records: list[tuple[Path, dict[str, Any]]]) -> tuple[list[str], dict]:
        """deploy/ from verified copies, then the report; the manifest's entries come from the records."""
        from deploycraft.report import write_report

        self._current = "deploy"
        root = self.run.root
        files: dict[str, dict[str, Any]] = {}
        for stage_dir, record in records:
            prefix = stage_dir.relative_to(root).as_posix()
            files.update({f"{prefix}/{rel}": entry for rel, entry in record["files"].items()})
            files[f"{prefix}/{af.STAGE_RECORD}"] = af.file_entry(stage_dir / af.STAGE_RECORD)
        gates = (ctx.results.get("verify") or {}).get("gates", [])
        failures = [f"gate {g['name']} failed: {g['detail']}" for g in gates if not g["passed"]]
        unverified = "verify" not in ctx.results
        if failures or unverified:
            # nothing unverified ships: deploy/ stays empty (an earlier run's, which this recipe no longer
            # produces, is retired as always); every file stays where its stage wrote it
            self._retire_deploy()
            shutil.rmtree(root / STAGING, ignore_errors=True)  # a copy a stopped run left half-made
            why = "a verify gate failed" if failures else "the recipe has no verify stage (add one to ship)"
            log(f"[yellow]nothing shipped: {why}, so deploy/ is left out; the files are under stages/[/]")
            report, written = write_report(ctx, shipped=False)
            files.update(written)
            return failures, files
        shipped: dict[str, Path] = {}  # deploy path -> source
        for art in ctx.artifacts.values():
            src = root / art.path
            art.deploy_path = f"deploy/{src.name}"
            shipped[art.deploy_path] = src
            for name in art.companions:
                shipped[f"deploy/{name}"] = src.parent / name
        if ctx.model_dir is not None:
            for f in ("spec.json", "weights.pt"):
                shipped[f"deploy/torch/{f}"] = ctx.model_dir / f
        serving = self._serving(ctx)
        if serving is not None:
            shipped[f"deploy/triton/{self.recipe.name}/1/model.onnx"] = serving.pop("source")
        tmp = root / STAGING
        if tmp.exists():
            shutil.rmtree(tmp)
        for rel, src in shipped.items():
            entry = af.copy_file(src, tmp / Path(rel).relative_to("deploy"))
            expected = files.get(src.relative_to(root).as_posix())
            if expected is None or entry["sha256"] != expected["sha256"]:
                raise RuntimeError(f"{src.relative_to(root)} changed while the run was shipping it")
            files[rel] = entry
        if serving is not None:
            for rel, text in serving.items():
                files[rel] = af.atomic_write_text(tmp / Path(rel).relative_to("deploy"), text)
        self._retire_deploy()
        # deploy/ lands before the manifest that lists it: until then this record says what was shipped, so
        # that an interruption in between does not make the next run keep the shipped files as someone's
        af.write_json(root / SHIPPING, {rel: files[rel] for rel in files if rel.startswith("deploy/")})
        tmp.rename(self.run.deploy)
        report, written = write_report(ctx, shipped=True)
        files.update(written)
        return [], files

    def _serving(self, ctx: RunContext) -> dict[str, Any] | None:
        """The shipped deployable (verify's main, else the target's INT8, else the FP32 ONNX): its
        description and a Triton model repository for it. None when the run made no ONNX file."""
        import json

        from deploycraft.deployables import TARGET_RUNTIME
        from deploycraft.names import INT8_NAME, ModelName, split_row
        from deploycraft.runtime.bench import physical_cores
        from deploycraft.serving import deployable_description, triton_config

        verify = ctx.results.get("verify") or {}
        main = verify.get("main")
        if main is None or split_row(main)[0] not in ctx.artifacts:
            default = INT8_NAME.get(self.recipe.target, ModelName.INT8_ONNX)
            main = next((n.value for n in (default, ModelName.FP32_ONNX) if n.value in ctx.artifacts), None)
        if main is None:
            return None
        model, on = split_row(main)
        art = ctx.artifacts[model]
        runtime = "openvino" if on in ("openvino", "openvino-bf16") else (on or art.backend)
        if runtime not in ("onnxruntime", "openvino"):
            runtime = TARGET_RUNTIME.get(self.recipe.target, "onnxruntime")
        precision = "bf16" if on == "openvino-bf16" else art.precision
        measured = (verify.get("models") or {}).get(main)
        threads = (measured or {}).get("threads") or physical_cores()
        vcfg = self.recipe.stage("verify")
        max_batch = max(vcfg.batch_sizes) if vcfg is not None else 64
        classes = ctx.recipe.model.num_classes
        config = triton_config(
            self.recipe.name,
            runtime,
            ctx.in_chans,
            self.recipe.data.image_size,
            classes,
            max_batch,
            threads,
            "bf16" if precision == "bf16" else "f32",
        )
        desc = deployable_description(
            main, f"deploy/{Path(art.path).name}", runtime, precision, threads, self.recipe.target, measured
        )
        desc["input"] = input_spec(self.recipe.data).to_dict()
        desc["triton"] = f"deploy/triton/{self.recipe.name}"
        return {
            "source": self.run.root / art.path,
            f"deploy/triton/{self.recipe.name}/config.pbtxt": config,
            "deploy/deployable.json": json.dumps(desc, indent=2) + "\n",
        }

    def _withdraw_results(self, why: str) -> None:
        """The recipe changed since the folder's last run, or a stage computes anew (other data, weights,
        calibration images, teacher or code): the folder's report, plot, manifest and deploy/ describe an
        earlier run, and must not be read as this one's if it fails or is stopped. They are withdrawn (the
        files they came from stay under stages/, and running the earlier recipe again restores them)."""
        root = self.run.root
        shutil.rmtree(root / STAGING, ignore_errors=True)  # a copy a stopped run left half-made
        if not any((root / f).exists() for f in ("report.md", "report.json", "manifest.json", "deploy")):
            return
        log(f"[dim]{why}: the earlier run's report and deploy/ are withdrawn (its stages stay)[/]")
        # the manifest goes last: a stop on the way leaves what remains of deploy/ listed in it
        self._retire_deploy()
        for rel in ("report.md", "report.json", "plots/accuracy_vs_latency.png", SHIPPING, "manifest.json"):
            (root / rel).unlink(missing_ok=True)

    def _retire_deploy(self) -> None:
        """Remove the old deploy/ if it holds exactly what the last manifest says deploycraft put there;
        otherwise (someone edited or added files) keep it as deploy.kept-<time>/ and say so."""
        deploy = self.run.deploy
        if not deploy.exists():
            return
        listed = af.manifest_files(self.run.root) or {}
        try:  # shipped by a run stopped before its manifest was written
            pending = af.read_json(self.run.root / SHIPPING)
            listed = {**listed, **{rel: e for rel, e in pending.items() if isinstance(e, dict)}}
        except (OSError, ValueError, AttributeError):
            pass
        changed = []
        for p in sorted(deploy.rglob("*")):
            if p.is_dir():
                continue
            rel = p.relative_to(self.run.root).as_posix()
            entry = listed.get(rel)
            if p.is_symlink() or entry is None or entry.get("sha256") != af.sha256_file(p):
                changed.append(rel)
        if not changed:
            shutil.rmtree(deploy)
            return
        kept = self.run.root / time.strftime("deploy.kept-%Y%m%d-%H%M%S", time.gmtime())
        deploy.rename(kept)
        log(
            f"[yellow]warning:[/] {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} in deploy/ "
            f"differ from what deploycraft shipped: the old deploy/ is kept as {kept.name}/"
        )
