"""How report.md writes numbers and model names (shared by the report and the stages' sections)."""

from __future__ import annotations

from deploycraft.names import ModelName


def pretty(name: str) -> str:
    """A model's label in report.md."""
    try:
        return ModelName(name).label
    except ValueError:
        return name


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def fmt_mb(b: int | None) -> str:
    return "—" if not b else f"{b / 1e6:.2f} MB"
