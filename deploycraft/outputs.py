"""Output paths the user names on the command line (`run -o`, `diagnose -o`, `bench --json`, `schema -o`):
checked before the work.

A command that measures for minutes must not lose its results to a path it cannot write at the end, and
must not overwrite what the user owns. ``check_writable_folder`` makes sure a folder can be made and
written to, by doing it (permissions alone do not tell: root may write anywhere but not create a folder in
/proc), and leaves nothing behind. ``owned_json`` recognises a JSON file deploycraft wrote by its content;
``check_output_file`` refuses a file path that is a folder, or a file the command did not write.

Kept out of artifacts.py: that module is part of every stage's code fingerprint, and these checks have
nothing to do with a stage's result.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from deploycraft.errors import UserError

# The key every JSON record a command writes into a user-named path starts with: its author, e.g.
# {"written_by": "deploycraft diagnose", ...}. Recognising a file by it lets a command replace its own
# earlier output and nothing else.
WRITTEN_BY = "written_by"


def check_writable_folder(folder: Path, field: str, fix: str) -> None:
    """``folder`` exists or can be created, and a file can be written in it; else one UserError naming
    ``field``. The folders made for the check and the probe file are removed again."""
    folder = Path(folder)
    missing: list[Path] = []
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = f"{existing} is a file, so {folder} cannot be created" if missing else f"{folder} is a file"
        raise UserError(what, field=field, fix=fix)
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".deploycraft-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        verb = "create" if len(made) < len(missing) else "write to"
        raise UserError(f"cannot {verb} {folder} ({exc.strerror or exc})", field=field, fix=fix) from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is not one (unreadable, not JSON, not an object)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def owned_json(path: Path, writer: str, legacy: Callable[[dict[str, Any]], bool] | None = None) -> bool:
    """Whether ``path`` is a JSON record ``writer`` wrote: marked with it, or (files written before the mark)
    of the shape ``legacy`` recognises."""
    obj = read_json_object(path)
    if obj is None:
        return False
    if WRITTEN_BY in obj:
        return obj[WRITTEN_BY] == writer
    return legacy is not None and legacy(obj)


def check_output_file(path: Path, field: str, writer: str, owned: Callable[[Path], bool], example: str) -> None:
    """A file a command is about to write at ``path`` (the option ``field``): not a folder, and either new (the
    missing folders above it can be created) or one ``owned`` recognises as ``writer``'s earlier output; else
    one UserError, and nothing is touched."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder", field=field, fix=f"give a file name, e.g. {path / example}")
    check_outside_runs(path, field, "give a file outside the deploy/ and stages/ of every run folder")
    if (path.exists() or path.is_symlink()) and not owned(path):
        raise UserError(
            f"{path} exists and was not written by `{writer}`; it is not overwritten",
            field=field,
            fix=f"give a new file name (a file an earlier `{writer}` wrote is replaced)",
        )
    check_writable_folder(path.parent, field, fix="give a file in a folder you can write to")


def write_error(path: Path, exc: OSError, field: str, note: str = "") -> UserError:
    """The one line for a file that could not be written at the end (``note``: what the user still has)."""
    why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc.strerror or exc)
    return UserError(f"cannot write {path} ({why}){note}", field=field, fix="give a file in a folder you can write to")


RUN_STATES = ("running", "completed", "failed", "interrupted")


def _is_run_folder(root: Path) -> bool:
    """A folder deploycraft ran in: its run.json names a recipe and a run state, beside a stages/ folder."""
    from deploycraft.artifacts import read_status

    if not (root / "run.json").is_file() or not (root / "stages").is_dir():
        return False
    status = read_status(root)
    return isinstance(status.get("recipe"), str) and status.get("status") in (*RUN_STATES, "unknown")


MANAGED = ("deploy", "stages", ".deploy-new")  # a run folder's own subfolders (and deploy.kept-*)


def check_outside_runs(path: Path, field: str, fix: str) -> None:
    """An output path must not lie inside a run folder's deploy/ or stages/ (or a kept deploy/): the run
    checks those against its records and manifest, and moves aside what it did not write there. Elsewhere in
    a run folder is fine (`diagnose RUN_DIR` writes RUN_DIR/diagnose/ by default). Links and ``..`` are
    resolved first: where the files would land decides."""
    try:
        path = Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13)
        raise UserError(
            f"{path} cannot be resolved ({exc})", field=field, fix="give a path without a link loop"
        ) from None
    for parent in path.parents:
        top = path.relative_to(parent).parts[0]
        if (top in MANAGED or top.startswith("deploy.kept-")) and _is_run_folder(parent):
            raise UserError(
                f"{path} is inside {top}/ of the run folder {parent}, which deploycraft manages",
                field=field,
                fix=fix,
            )


def check_run_json(root: Path) -> None:
    """``run -o``: a folder holding a run.json is a run folder only where deploycraft wrote that file (its
    status names the recipe and a run state); an unreadable run.json (a run killed while writing it) still
    marks one where the folder has the run's layout (a stages/ folder). Anywhere else the run.json is the
    user's, and the folder is refused untouched."""
    from deploycraft.artifacts import read_status

    root = Path(root)
    if not (root / "run.json").is_file():
        return
    status = read_status(root)
    if status.get("status") == "unknown":
        why = None if (root / "stages").is_dir() else f"{status.get('error')}, and no stages/ folder"
    elif not isinstance(status.get("recipe"), str) or status.get("status") not in RUN_STATES:
        why = "no recipe name and run state in it"
    else:
        why = None
    if why:
        raise UserError(
            f"{root} has a run.json that deploycraft did not write ({why})",
            field="--output-dir",
            fix="choose a new or empty folder with --output-dir, or leave it out for artifacts/<name>/<run id>/",
        )
