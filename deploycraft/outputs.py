"""Output paths the user names on the command line (`diagnose -o`, `bench --json`): checked before the work.

A command that measures for minutes must not lose its results to a path it cannot write at the end.
``check_writable_folder`` makes sure a folder can be made and written to, by doing it (permissions alone do
not tell: root may write anywhere but not create a folder in /proc), and leaves nothing behind.

Kept out of artifacts.py: that module is part of every stage's code fingerprint, and these checks have
nothing to do with a stage's result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from deploycraft.errors import UserError


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
