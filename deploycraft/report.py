"""report.json (read by CI systems and our own checks), report.md (for people) and plots.

report.md is rendered from report.json alone: a header, then each stage's own section (the stage
module owns it, ``Stage.report_section``) in ``report_order``, then the plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deploycraft import artifacts as af
from deploycraft.data.transforms import input_spec
from deploycraft.formatting import fmt_pct, pretty
from deploycraft.machine import hardware, versions
from deploycraft.models.io import load_model
from deploycraft.models.profile import count_macs, count_params
from deploycraft.names import PRUNING_PAIRS, ModelName, split_row
from deploycraft.progress import log
from deploycraft.stages import STAGES
from deploycraft.stages.verify import select_fastest


def _model_entries(ctx, verify: dict[str, Any] | None, macs: int | None, params: int | None) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    measured = (verify or {}).get("models", {})
    bs = str((verify or {}).get("batch_sizes", [1])[0])
    names = list(measured) or ([ModelName.FP32_TORCH.value] + list(ctx.artifacts))
    for name in names:
        m = measured.get(name)
        model, _ = split_row(name)
        artifact = ctx.artifacts.get(model)
        art = {**artifact.describe(), "deploy_path": artifact.deploy_path} if artifact is not None else {}
        entry: dict[str, Any] = {
            "path": art.get("deploy_path") or (m or {}).get("path") or "deploy/torch/weights.pt",
            "format": (m or art).get("format", "torch"),
            "precision": (m or art).get("precision", "fp32"),
            "backend": (m or art).get("backend", "torch"),
            "target": (m or art).get("target"),
            "top1": m.get("top1") if m else None,
            "latency_ms": None,
            "throughput_ips": None,
            "batch_size": int(bs),
            "macs": (m or {}).get("macs", macs),
            "params": (m or {}).get("params", params),
            "bytes": (m or {}).get("bytes"),
            "top1_agreement": (m or {}).get("top1_agreement"),
        }
        for key in ("simulation_agreement", "not_shippable"):  # INT8 rows: verify's simulation_check
            if m and key in m:
                entry[key] = m[key]
        if m and "latency" in m:
            lat = m["latency"][bs]
            entry["latency_ms"] = {k: lat[k] for k in ("p50", "p90", "p99", "mean")}
            entry["throughput_ips"] = lat["throughput_ips"]
            entry["latency_by_batch"] = m["latency"]
            entry["threads"] = m.get("threads")
        if m and "gmacs" in m:
            entry["gmacs"] = m["gmacs"][bs]
            entry["ceiling_fraction"] = m["ceiling_fraction"][bs]
            entry["gmacs_by_batch"] = m["gmacs"]
            entry["ceiling_fraction_by_batch"] = m["ceiling_fraction"]
        entries[name] = entry
    ref = (verify or {}).get("reference")
    if ref in entries and entries[ref]["top1"] is not None:
        for e in entries.values():
            if e["top1"] is not None:
                e["top1_drop"] = round(entries[ref]["top1"] - e["top1"], 6)
    fastest = (verify or {}).get("fastest_fp32", {})
    bases = {"fp32_torch": "fp32_torch", "fp32_onnx": "fp32_onnx", "fastest_fp32": fastest.get(bs)}
    for key, base in bases.items():
        if base in entries and entries[base]["latency_ms"]:
            for e in entries.values():
                if e["latency_ms"]:
                    e[f"speedup_vs_{key}"] = round(entries[base]["latency_ms"]["p50"] / e["latency_ms"]["p50"], 3)
    return entries


def headline(
    models: dict[str, dict], main: str | None, fastest: dict[str, str], fastest_file: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The shipped deployable against the fastest FP32 runtime, the fastest run of the FP32 file (bf16
    inside a runtime included) and the FP32 torch model, per batch size."""
    if main not in models or not models[main].get("latency_by_batch"):
        return []
    fastest_file = fastest_file or {}
    rows = []
    for bs, lat in models[main]["latency_by_batch"].items():
        row = {
            "batch_size": int(bs),
            "main": main,
            "p50_ms": lat["p50"],
            "fastest_fp32": fastest.get(bs),
            "fastest_fp32_file": fastest_file.get(bs),
        }
        bases = (
            ("fastest_fp32", fastest.get(bs)),
            ("fastest_fp32_file", fastest_file.get(bs)),
            ("fp32_torch", "fp32_torch"),
        )
        for key, base in bases:
            other = (models.get(base) or {}).get("latency_by_batch", {}).get(bs)
            row[f"speedup_vs_{key}"] = round(other["p50"] / lat["p50"], 3) if other else None
        rows.append(row)
    return rows


# Under a fixed CPU target the report names a deployable of the run that is faster than the shipped one
# inside the accuracy budget by more than this (geometric mean of the p50 ratios over the batch sizes):
# two sessions of one file differ by up to 4 % at batch 1 on the AMD machine, more on busier ones (README).
FASTER_MARGIN = 0.10
FIXED_CPU_TARGETS = ("onnxruntime-cpu", "openvino-cpu")


def faster_alternative(
    models: dict[str, dict[str, Any]],
    main: str,
    reference_top1: float | None,
    budget: float | None,
    batch_sizes: list[int],
) -> dict[str, Any] | None:
    """The fastest ONNX deployable of the run inside the accuracy budget (verify's models, timed in one
    process), when it is not ``main`` and beats it by more than FASTER_MARGIN; with its speed over
    ``main`` per batch size. None otherwise."""
    # every ONNX row is a suggestion, also a file on a runtime it was not placed for: `target: auto` would
    # compare it with its simulation there before shipping it (verify: not_shippable under a fixed target)
    pool = {
        n: {k: v for k, v in m.items() if k != "not_shippable"}
        for n, m in models.items()
        if m.get("format") == "onnx"
        and not n.startswith("unpruned")
        and m.get("top1") is not None
        and all(str(bs) in (m.get("latency") or {}) for bs in batch_sizes)
    }
    if main not in pool or not batch_sizes:
        return None
    best, table = select_fastest(pool, reference_top1, budget, batch_sizes)
    if best is None or best == main:
        return None
    ratio = {str(b): pool[main]["latency"][str(b)]["p50"] / pool[best]["latency"][str(b)]["p50"] for b in batch_sizes}
    overall = math.exp(sum(math.log(r) for r in ratio.values()) / len(ratio))
    if overall <= 1 + FASTER_MARGIN:
        return None
    row = next(r for r in table if r["name"] == best)
    return {
        "name": best,
        "top1": row["top1"],
        "drop": row["drop"],
        "budget": budget,
        "speedup_over_shipped": {b: round(r, 3) for b, r in ratio.items()},
        "speedup_over_shipped_overall": round(overall, 3),
    }


def faster_here(recipe, verify: dict[str, Any] | None) -> dict[str, Any] | None:
    """faster_alternative for a run with a fixed CPU target (auto already ships the fastest; a TensorRT
    target's files are timed here on the CPU, not where they run), from verify's saved results."""
    if not verify or recipe.target not in FIXED_CPU_TARGETS or not verify.get("main"):
        return None
    cfg = next((s for s in recipe.stages if s.type == "verify" and s.enabled), None)
    models = verify.get("models") or {}
    ref = verify.get("reference")
    ref_top1 = (models.get(ref) or {}).get("top1") if ref else None
    budget = cfg.max_accuracy_drop if cfg is not None else None
    return faster_alternative(models, verify["main"], ref_top1, budget, verify.get("batch_sizes") or [])


def faster_words(report: dict[str, Any]) -> str:
    """The report's sentence for ``report["faster_alternative"]``."""
    f = report["faster_alternative"]
    parts = [
        f"{r:.2f}× faster at batch {b}" if r >= 1 else f"{1 / r:.2f}× slower at batch {b}"
        for b, r in f["speedup_over_shipped"].items()
    ]
    speed = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
    if f["drop"] is None:
        accuracy = "top-1 not compared with a reference"
    elif f["budget"] is None:
        accuracy = f"drop {f['drop'] * 100:+.2f} pt, no accuracy budget set"
    else:
        accuracy = f"drop {f['drop'] * 100:+.2f} pt, inside the {f['budget'] * 100:.2f}-point budget"
    return (
        f"**Faster here: {pretty(f['name'])}** ({fmt_pct(f['top1'])}, {accuracy}) runs {speed} than the shipped "
        f"{pretty(report['main'])} ({f['speedup_over_shipped_overall']:.2f}× over the batch sizes, geometric mean). "
        f"The recipe's fixed `target: {report['target']}` ships the latter; `target: auto` ships the fastest "
        "deployable it builds, by measurement."
    )


def pruning_summary(models: dict[str, dict], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Predicted (MACs ratio) against measured speed-up for each before/after pair, per batch size."""
    rows = []
    for before, after in PRUNING_PAIRS:
        a, b = models.get(before), models.get(after)
        if not a or not b or not a.get("latency_by_batch") or not b.get("latency_by_batch"):
            continue
        row = {
            "before": before,
            "after": after,
            "macs_before": a["macs"],
            "macs_after": b["macs"],
            "predicted_speedup": round(a["macs"] / b["macs"], 3),
            "measured_speedup": {},
            "throughput_ratio": {},
        }
        for bs in map(str, batch_sizes):
            la, lb = a["latency_by_batch"][bs], b["latency_by_batch"][bs]
            row["measured_speedup"][bs] = round(la["p50"] / lb["p50"], 3)
            row["throughput_ratio"][bs] = round(lb["throughput_ips"] / la["throughput_ips"], 3)
        rows.append(row)
    return rows


def build_report(ctx) -> dict[str, Any]:
    recipe = ctx.recipe
    verify = ctx.results.get("verify")
    macs = params = None
    if ctx.model_dir is not None:
        model = load_model(ctx.model_dir)
        params = count_params(model)
        macs = count_macs(model, ctx.input_shape)
    gates = (verify or {}).get("gates", [])
    report = {
        "recipe": recipe.name,
        "description": recipe.description,
        # passed: verify measured every deployable and every gate held; a run without verify proves nothing
        "status": "not verified" if verify is None else "passed" if all(g["passed"] for g in gates) else "failed",
        "run_dir": str(ctx.run.root),
        "input": input_spec(recipe.data).to_dict(),
        "dataset": recipe.data.dataset,
        "held_out": (verify or {}).get("held_out"),
        "held_out_images": (verify or {}).get("held_out_images"),
        "models": _model_entries(ctx, verify, macs, params),
        "gates": gates,
        "reference": (verify or {}).get("reference"),
        "main": (verify or {}).get("main"),
        "fastest_fp32": (verify or {}).get("fastest_fp32", {}),
        "headline": [],
        "candidates": (verify or {}).get("candidates", []),
        "faster_alternative": None,
        "unsupported": (verify or {}).get("unsupported", {}),
        "ceiling": (verify or {}).get("ceiling", {}),
        "target": recipe.target,
        "stages": {k: v for k, v in ctx.results.items() if k != "verify"},
        "pruning": [],
        "hardware": hardware(),
        "versions": versions(),
    }
    report["headline"] = headline(
        report["models"], report["main"], report["fastest_fp32"], (verify or {}).get("fastest_fp32_file")
    )
    report["faster_alternative"] = faster_here(recipe, verify)
    if "prune" in ctx.results:
        report["pruning"] = pruning_summary(report["models"], (verify or {}).get("batch_sizes", [1]))
    return report


def _md_header(report: dict[str, Any]) -> list[str]:
    """Title, status, hardware and input."""
    hw = report["hardware"]
    lines = [f"# deploycraft report: {report['recipe']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [f"**Status: {report['status']}** · run folder `{report['run_dir']}`", ""]
    if report.get("shipped") is False:
        why = "the recipe has no verify stage" if report["status"] == "not verified" else "a gate failed"
        lines += [f"**Nothing shipped**: {why}, so `deploy/` is left out; the files are under `stages/`.", ""]
    lines += [
        f"Hardware: {hw.get('cpu_model', '?')} ({hw.get('logical_cpus')} logical CPUs; "
        f"flags {', '.join(hw.get('cpu_flags', [])) or '—'}); GPUs: "
        f"{', '.join(g['name'] for g in hw.get('gpus', [])) or 'none'}. "
        f"torch {report['versions']['torch']}, onnxruntime {report['versions']['onnxruntime']}.",
        "",
        f"Input: {report['input']['channels']}×{report['input']['image_size']}×{report['input']['image_size']}, "
        f"mean {list(report['input']['mean'])}, std {list(report['input']['std'])}.",
        "",
    ]
    return lines


def _md_plot(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    plots = report.get("plots")  # the plots this report's run drew (reports before the list: the file)
    if (
        "plots/accuracy_vs_latency.png" in plots
        if plots is not None
        else Path(report["run_dir"], "plots", "accuracy_vs_latency.png").is_file()
    ):
        lines += ["", "## Accuracy vs latency", "", "![accuracy vs latency](plots/accuracy_vs_latency.png)"]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the header, each stage's section (those that have something to say), the plot."""
    stages = sorted(STAGES.values(), key=lambda s: (s.report_order, s.type))
    sections = [_md_header, *(s.report_section for s in stages), _md_plot]
    return "\n".join(line for section in sections for line in section(report)) + "\n"


# The y axis spans at least this many points of top-1: a 0.03-point difference stays a small one.
MIN_TOP1_SPAN = 2.0
_MARKERS = {"torch": "o", "torch-cuda": "D", "onnxruntime": "s", "openvino": "^"}
_COLORS = {"fp32": "tab:blue", "bf16": "tab:green", "fp16": "tab:olive", "int8": "tab:red"}


def top1_axis(ys: list[float]) -> tuple[float, float]:
    """The top-1 axis (percent): the points with a margin, at least MIN_TOP1_SPAN wide, inside [0, 100]."""
    mid, span = (min(ys) + max(ys)) / 2, max(max(ys) - min(ys), MIN_TOP1_SPAN)
    lo, hi = mid - span * 0.65, mid + span * 0.65
    shift = max(0.0, -lo) - max(0.0, hi - 100.0)
    return max(0.0, lo + shift), min(100.0, hi + shift)


# The plot's geometry in points (1/72 inch), what the label placement below reasons in.
_FIG_IN = (10.0, 4.2)
_AXES = (0.075, 0.13, 0.47, 0.76)  # left, bottom, width, height: fractions of the figure
_MARKER_R = 5.5  # half a marker (s=70 pt², 8.4 pt across) and its outline, rounded up
_LABEL_FONT = 8
_DIGIT_W, _LABEL_H = 0.64 * _LABEL_FONT, 0.75 * _LABEL_FONT  # a digit's advance; a digit's height
_LABEL_GAP = 2.0  # kept free between two labels, so that "7" beside "8" does not read as "78"
FRAME_PT = (_FIG_IN[0] * _AXES[2] * 72, _FIG_IN[1] * _AXES[3] * 72)  # the axes' frame, width x height
# The eight places of a label around its point, as directions: right-above first, then the sides, then the
# other corners; each ring further out moves a place along its direction.
_DIRECTIONS = ((1, 1), (1, 0), (-1, 0), (0, 1), (0, -1), (-1, 1), (1, -1), (-1, -1))


def frame_positions(xs: list[float], ys: list[float], xlim: tuple, ylim: tuple) -> list[tuple[float, float]]:
    """Where (latency, top-1) points sit in the frame, in points from its lower left corner (log latency)."""
    (x0, x1), (y0, y1) = (math.log(v) for v in xlim), ylim
    width, height = FRAME_PT
    return [
        ((math.log(x) - x0) / (x1 - x0) * width, (y - y0) / (y1 - y0) * height) for x, y in zip(xs, ys, strict=True)
    ]


def label_layout(points: list[tuple[float, float]], width: float, height: float) -> list[tuple[str, int, tuple]]:
    """Where each point's number goes: [(text, index of the point it sits by, (dx, dy) of the text's lower
    left corner from that point, in points)]. ``points`` are positions inside a ``width`` x ``height`` frame
    (points). Points whose markers overlap share one label ("6, 7"): no place beside either would read as
    one of them. Each label takes the first of eight places around its point, then of two rings further
    out, that stays inside the frame and clear of every marker and every label placed before it; the
    first place when none is clear."""
    clusters: list[list[int]] = []
    for i, (x, y) in enumerate(points):
        for c in clusters:
            cx, cy = points[c[0]]
            if abs(x - cx) < 2 * _MARKER_R and abs(y - cy) < 2 * _MARKER_R:
                c.append(i)
                break
        else:
            clusters.append([i])
    markers = [(x - _MARKER_R, y - _MARKER_R, x + _MARKER_R, y + _MARKER_R) for x, y in points]
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for c in clusters:
        text = ", ".join(str(i + 1) for i in c)
        w, h, g = _DIGIT_W * len(text), _LABEL_H, _MARKER_R + 1
        x, y = points[c[0]]
        corner = {1: g - 1, 0: -w / 2, -1: -g - w + 1}, {1: g - 1, 0: -h / 2, -1: -g - h + 1}  # diagonal places
        side = {1: g, 0: -w / 2, -1: -g - w}, {1: g, 0: -h / 2, -1: -g - h}  # places straight out
        places = [
            ((corner if sx and sy else side)[0][sx] + k * g * sx, (corner if sx and sy else side)[1][sy] + k * g * sy)
            for k in (0, 1.5, 3)  # rings further out, for a crowded neighbourhood
            for sx, sy in _DIRECTIONS
        ]
        boxes = [(x + dx, y + dy, x + dx + w, y + dy + h) for dx, dy in places]
        free = [
            k
            for k, b in enumerate(boxes)
            if _inside(b, width, height) and not _hits(b, markers) and not _hits(_grow(b), placed)
        ]
        k = free[0] if free else 0
        placed.append(boxes[k])
        out.append((text, c[0], places[k]))
    return out


def _grow(box: tuple) -> tuple:
    return (box[0] - _LABEL_GAP, box[1] - _LABEL_GAP, box[2] + _LABEL_GAP, box[3] + _LABEL_GAP)


def _inside(box: tuple, width: float, height: float) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height


def _hits(box: tuple, others: list[tuple]) -> bool:
    """Whether the box (x0, y0, x1, y1) overlaps any of the others."""
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def plot_accuracy_latency(report: dict[str, Any], path: Path) -> bool:
    """Top-1 against p50 latency, one numbered point per model; the key beside the axes names them, and
    each number is placed clear of the markers and of the other numbers (``label_layout``)."""
    points = [(n, m) for n, m in report["models"].items() if m.get("top1") is not None and m.get("latency_ms")]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig = plt.figure(figsize=_FIG_IN, dpi=120)
    ax = fig.add_axes(_AXES)
    xs = [m["latency_ms"]["p50"] for _, m in points]
    ys = [m["top1"] * 100 for _, m in points]
    for i, (name, m) in enumerate(points, 1):
        ax.scatter(
            xs[i - 1],
            ys[i - 1],
            s=70,
            marker=_MARKERS.get(m["backend"], "o"),
            color=_COLORS.get(m["precision"], "tab:gray"),
            edgecolor="black" if name == report.get("main") else "none",
            linewidth=1.5,
            zorder=3,
        )
    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.4, hi * 1.4)
    # ticks at 1, 2 and 5 of each decade, in plain numbers: a short range's minor labels ("2×10⁻¹ 3×10⁻¹ ...") collide
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(*top1_axis(ys))
    at = frame_positions(xs, ys, ax.get_xlim(), ax.get_ylim())
    for text, i, d in label_layout(at, *FRAME_PT):
        ax.annotate(text, (xs[i], ys[i]), textcoords="offset points", xytext=d, ha="left", va="bottom",
                    fontsize=_LABEL_FONT)  # fmt: skip
    ax.set_xlabel(f"p50 latency, ms (batch {points[0][1]['batch_size']}, log scale)")
    ax.set_ylabel("top-1, %")
    ax.set_title(f"{report['recipe']}: accuracy vs latency", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    key = [f"{i:>2} {'*' if n == report.get('main') else ' '} {pretty(n)}" for i, (n, _) in enumerate(points, 1)]
    key += ["", "* shipped (outlined)", "colour: precision (blue FP32, green BF16, red INT8)"]
    key += ["marker: runtime (o torch, □ ONNX Runtime, △ OpenVINO)"]
    fig.text(0.57, 0.89, "\n".join(key), va="top", ha="left", fontsize=7, family="monospace")
    path.parent.mkdir(parents=True, exist_ok=True)
    with af.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_report(ctx, shipped: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write report.json, report.md and the plot; return the report and the manifest entries written.
    ``shipped``: whether the run filled deploy/ (not where a verify gate failed)."""
    report = build_report(ctx)
    report["shipped"] = shipped
    if report["faster_alternative"]:
        log(f"[yellow]note: {faster_words(report).replace('**', '')}[/]")
    written = {}
    plot = ctx.run.plots / "accuracy_vs_latency.png"
    report["plots"] = []
    if plot_accuracy_latency(report, plot):
        written["plots/accuracy_vs_latency.png"] = af.file_entry(plot)
        report["plots"].append("plots/accuracy_vs_latency.png")
    else:  # an earlier run's plot does not describe this report
        plot.unlink(missing_ok=True)
    written["report.json"] = af.write_json(ctx.run.root / "report.json", report)
    written["report.md"] = af.atomic_write_text(ctx.run.root / "report.md", render_markdown(report))
    return report, written
