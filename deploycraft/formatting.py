"""How report.md writes numbers and model names (shared by the report and the stages' sections)."""

from __future__ import annotations

from deploycraft.names import RUNTIME_LABELS, ModelName, split_row


def pretty(name: str) -> str:
    """A model's label in report.md: ``int8_onnx@openvino`` is "INT8 ONNX on OpenVINO"."""
    model, runtime = split_row(name)
    try:
        label = ModelName(model).label
    except ValueError:
        label = model
    return label if runtime is None else f"{label} on {RUNTIME_LABELS.get(runtime, runtime)}"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def fmt_mb(b: int | None) -> str:
    return "—" if not b else f"{b / 1e6:.2f} MB"
