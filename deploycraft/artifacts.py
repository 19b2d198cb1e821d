"""Run folders: layout, atomic writes, content hashes, stage records, the manifest, the machine.

```
artifacts/<recipe name>/<run id>/
  recipe.yaml            the resolved recipe (overrides applied)
  run.json               status: running | completed | failed (interrupted, when its lock is free)
  stages/NN-<type>-<key>/  one folder per stage; stage.json is written last and marks it complete
  deploy/                the deployables: copies of verified stage outputs
  report.json  report.md  plots/
  manifest.json          every file with size and sha256, versions, hardware
```

A stage record (stage.json) lists the size and sha256 of every file in its folder and carries a
digest of itself. Nothing is reused or shipped from a stage folder until its record and every file
it lists check out (``verify_stage``); a path in a record never leaves its stage folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from deploycraft.errors import UserError

HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(fd: int) -> None:
    """mkstemp creates files 0600; give them the mode an ordinary write would (0666 minus the umask)."""
    os.fchmod(fd, 0o666 & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` atomically; return the manifest entry of what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _public_mode(fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def atomic_write_text(path: Path, text: str) -> dict[str, Any]:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> dict[str, Any]:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def manifest_files(root: Path) -> dict[str, dict[str, Any]] | None:
    """The run folder's manifest.json entries by path, or None where it cannot be read."""
    try:
        files = read_json(Path(root) / "manifest.json")["files"]
        return {f["path"]: f for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in the same folder that replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    _public_mode(fd)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def copy_file(src: Path, dst: Path) -> dict[str, Any]:
    """Copy ``src`` to ``dst`` atomically (never a hard link: the copy may be edited without touching
    the source) and return the copy's size and sha256, hashed from the bytes written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        for chunk in iter(lambda: fin.read(HASH_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# --------------------------------------------------------------------------------------------
# stage records
# --------------------------------------------------------------------------------------------

STAGE_RECORD = "stage.json"
RECORD_FORMAT = "deploycraft.stage/2"


def _record_digest(record: dict[str, Any]) -> str:
    return sha256_json({k: v for k, v in record.items() if k != "digest"})


def stage_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file a stage left in its folder (hidden temporaries excepted)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.name == STAGE_RECORD and p.parent == folder or any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink():
            raise RuntimeError(f"{p} is a symbolic link: a stage writes files, never links")
        if p.is_file():
            out[rel.as_posix()] = file_entry(p)
    return out


def write_stage_record(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Hash the stage's files into its record, seal the record with its digest, write it last."""
    record = {"format": RECORD_FORMAT, **record, "files": stage_files(folder)}
    record["digest"] = _record_digest(record)
    write_json(folder / STAGE_RECORD, record)
    return record


def _inside(folder: Path, rel: Any) -> bool:
    """Whether a path from a record names something inside ``folder`` (no absolute paths, no '..')."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\x00" in rel:
        return False
    parts = Path(rel).parts
    if ".." in parts:
        return False
    try:
        (folder / rel).resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def verify_stage(folder: Path, key: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The record of a completed stage if it and every file it lists are intact, else the problems.

    Problems name the file: a missing or unreadable record, a record edited after it was sealed, a
    key that is not this stage's, a listed file missing, resized or changed, a path that leaves the
    stage folder, an output (model, deployable) that the record does not cover.
    """
    path = folder / STAGE_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [f"{STAGE_RECORD} is missing"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{STAGE_RECORD} is unreadable ({exc.__class__.__name__})"]
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None, [f"{STAGE_RECORD} is not a deploycraft stage record of this version"]
    if record.get("digest") != _record_digest(record):
        return None, [f"{STAGE_RECORD} was changed after the stage wrote it (digest mismatch)"]
    if record.get("key") != key:
        return None, [f"{STAGE_RECORD} belongs to another stage (key {str(record.get('key'))[:12]})"]
    files = record.get("files")
    output = record.get("output")
    if not isinstance(files, dict) or not isinstance(output, dict):
        return None, [f"{STAGE_RECORD} lacks its file list or output"]
    problems = []
    for rel, entry in files.items():
        if not _inside(folder, rel):
            problems.append(f"{rel!r} points outside the stage folder")
            continue
        p = folder / rel
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel} is missing" if not p.exists() else f"{rel} is not a regular file")
        elif p.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel} has {p.stat().st_size} bytes, {entry.get('bytes')} were written")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{rel} changed since it was written (sha256 mismatch)")
    needed = [a.get("path") if isinstance(a, dict) else None for a in (output.get("artifacts") or {}).values()]
    if output.get("model") is not None:
        needed += [f"{output['model']}/spec.json", f"{output['model']}/weights.pt"]
    for rel in needed:
        if not _inside(folder, rel):
            problems.append(f"output {rel!r} points outside the stage folder")
        elif rel not in files:
            problems.append(f"output {rel} is not among the stage's recorded files")
    return (record if not problems else None), problems


def discard_damaged(folder: Path, record_files: dict[str, Any] | None) -> list[str]:
    """Make a damaged stage folder incomplete again: remove its record and every file that fails its
    recorded hash, keep the intact ones (a re-run resumes from them, e.g. training checkpoints)."""
    removed = []
    (folder / STAGE_RECORD).unlink(missing_ok=True)
    for p in sorted(folder.rglob("*")):
        if not p.is_file() and not p.is_symlink():
            continue
        rel = p.relative_to(folder).as_posix()
        entry = (record_files or {}).get(rel)
        intact = (
            entry is not None
            and not p.is_symlink()
            and p.stat().st_size == entry.get("bytes")
            and sha256_file(p) == entry.get("sha256")
        )
        if not intact and (record_files is not None or p.is_symlink()):
            p.unlink()
            removed.append(rel)
    return removed


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fh = None

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def stage_dir(self, index: int, type_: str, key: str) -> Path:
        return self.stages / f"{index:02d}-{type_}-{key[:12]}"

    def check_usable(self, recipe_name: str) -> None:
        """The folder must be missing, empty, or a deploycraft run folder of this recipe; nothing is
        written anywhere else, so a user's folder is never mixed with (or overwritten by) a run."""
        root = self.root
        fix = "choose a new or empty folder with --output-dir, or leave it out for artifacts/<name>/<run id>/"
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is a file, not a folder", field="--output-dir", fix=fix)
        if root.is_dir():
            try:
                entries = [p.name for p in root.iterdir()]
            except OSError as exc:
                raise UserError(f"cannot read {root} ({exc.strerror})", field="--output-dir", fix=fix) from None
            if entries and "run.json" not in entries:
                shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
                raise UserError(
                    f"{root} is not empty ({shown}) and is not a deploycraft run folder (no run.json)",
                    field="--output-dir",
                    fix=fix,
                )
            if entries:
                status = read_status(root)
                other = status.get("recipe")
                if isinstance(other, str) and other != recipe_name:
                    raise UserError(
                        f"{root} holds a run of recipe {other!r}, not {recipe_name!r}",
                        field="--output-dir",
                        fix=fix,
                    )
        else:
            parent = root.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir():
                raise UserError(f"{parent} is a file, so {root} cannot be created", field="--output-dir", fix=fix)

    def create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"cannot write to {self.root} ({exc.strerror or exc})",
                field="--output-dir",
                fix="choose a folder you can write to",
            ) from None

    def lock(self) -> None:
        """One run per folder at a time; the lock dies with the process, so a killed run can resume."""
        self._lock_fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise UserError(
                f"another deploycraft run is using {self.root}",
                field="--output-dir",
                fix="wait for it to finish, or choose another --output-dir",
            ) from None

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None


def _lock_held(root: Path) -> bool:
    """Whether a live process holds the run folder's lock (a killed run's lock is released by the kernel)."""
    lock = root / ".lock"
    if not lock.is_file():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def read_status(root: Path) -> dict[str, Any]:
    """run.json as written, with "running" turned into "interrupted" when no process holds the lock.

    An unreadable run.json gives {"status": "unknown", "error": ...} rather than an exception.
    """
    try:
        status = json.loads((Path(root) / "run.json").read_text(encoding="utf-8"))
        if not isinstance(status, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {"status": "missing"}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {"status": "unknown", "error": f"run.json is unreadable ({exc.__class__.__name__})"}
    if status.get("status") == "running" and not _lock_held(Path(root)):
        status = {**status, "status": "interrupted"}
    return status
