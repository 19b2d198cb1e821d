"""Console output written to a file or pipe: one message is one line, however long (issue 9)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from deploycraft import cli, progress


@pytest.fixture
def piped_console(monkeypatch):
    """The console the command line sets up, writing where a log file or a pipe would: not a terminal,
    rich's fallback width of 80 columns."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(stderr=True, highlight=False, file=out, width=80))
    monkeypatch.setattr(progress, "_quiet", False)
    cli.main(version=False)  # the command line's set-up, run before every command
    return out


def test_plain_progress_lines_longer_than_80_columns_are_not_wrapped(piped_console):
    with progress.bar("QAT+KD epoch 2/2", 20) as b:
        assert isinstance(b, progress.PlainBar)
        for _ in range(20):
            b.advance(loss=0.029393, acc=0.90791, lr=0.00013851, layer="layer3.2.conv2 of the student model")
    lines = piped_console.getvalue().splitlines()
    assert len(lines) == 9, lines  # one at every 10 % step below 100 %
    assert all(len(line) > 80 and line.startswith("  QAT+KD epoch 2/2: ") for line in lines), lines
    assert lines[-1].startswith("  QAT+KD epoch 2/2: 18/20 (90 %") and lines[-1].endswith("of the student model")


def test_log_lines_longer_than_80_columns_are_not_wrapped(piped_console, monkeypatch, tmp_path):
    log_file = tmp_path / "log.txt"
    monkeypatch.setattr(progress, "_log_file", log_file)
    message = "quantize: " + " ".join(f"layer{i}.conv1" for i in range(12))
    assert len(message) > 80
    progress.log(message)
    assert piped_console.getvalue() == message + "\n"
    assert log_file.read_text() == message + "\n"
