"""Console output: stage lines and progress bars (rich), on stderr so stdout stays machine-readable."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)

_log_file: Path | None = None
_quiet = False  # the ranks other than 0 of a data-parallel run: one console for the run (rank 0's)


def set_log_file(path: Path | None) -> None:
    global _log_file
    _log_file = path


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str, style: str | None = None, to_console: bool = True, markup: bool = True) -> None:
    """``markup=False`` for text that is not ours (a traceback: "[/path/file.cc:537]" is no closing tag)."""
    if to_console and not _quiet:
        console.print(message, style=style, soft_wrap=True, markup=markup)  # one line stays one line in logs and pipes
    if _log_file is not None:
        with open(_log_file, "a", encoding="utf-8") as fh:
            fh.write((Console(file=None, record=False).render_str(message).plain if markup else message) + "\n")


class Bar:
    def __init__(self, progress: Progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        self._progress.update(self._task, advance=n, info=_fmt(fields))

    def update(self, **fields) -> None:
        self._progress.update(self._task, info=_fmt(fields))


def _fmt(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class PlainBar:
    """Progress for logs and CI (no terminal): a line at every 10 % and at most every 30 s otherwise."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, max(total, 1), 0
        self.started = self.last = time.monotonic()
        self.next_fraction = 0.1

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        now = time.monotonic()
        fraction = self.done / self.total
        if self.total >= 10 and fraction < 1 and (fraction >= self.next_fraction or now - self.last >= 30):
            self.next_fraction = (int(fraction * 10) + 1) / 10
            self.last = now
            console.print(
                f"  {self.description}: {self.done}/{self.total} ({fraction * 100:.0f} %, "
                f"{now - self.started:.0f} s) {_fmt(fields)}",
                highlight=False,
            )

    def update(self, **fields) -> None:
        pass


class SilentBar:
    def advance(self, n: int = 1, **fields) -> None:
        pass

    def update(self, **fields) -> None:
        pass


@contextmanager
def bar(description: str, total: int) -> Iterator[Bar | PlainBar | SilentBar]:
    if _quiet:
        yield SilentBar()
        return
    if not console.is_terminal or total <= 0:  # total 0: silent
        yield PlainBar(description, total)
        return
    columns = (
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, info="")
        yield Bar(progress, task)
