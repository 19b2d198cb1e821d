"""report.json (read by CI systems and our own checks), report.md (for people) and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploycraft import artifacts as af
from deploycraft.data.transforms import input_spec
from deploycraft.models.io import load_model
from deploycraft.models.profile import count_macs, count_params

PRETTY = {
    "fp32_torch": "FP32 torch (reference)",
    "pruned_fp32_torch": "pruned FP32 torch",
    "distilled_fp32_torch": "distilled FP32 torch",
    "fp32_torch_cuda": "FP32 torch, CUDA",
    "unpruned_fp32_onnx": "unpruned FP32 ONNX",
    "unpruned_int8_onnx": "unpruned INT8 ONNX",
    "fp32_onnx": "FP32 ONNX",
    "int8_onnx": "INT8 ONNX",
}
# (before, after) pairs whose speed-up pruning is responsible for.
PRUNING_PAIRS = (
    ("fp32_torch", "pruned_fp32_torch"),
    ("unpruned_fp32_onnx", "fp32_onnx"),
    ("unpruned_int8_onnx", "int8_onnx"),
)


def _model_entries(ctx, verify: dict[str, Any] | None, macs: int | None, params: int | None) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    measured = (verify or {}).get("models", {})
    bs = str((verify or {}).get("batch_sizes", [1])[0])
    names = list(measured) or (["fp32_torch"] + list(ctx.artifacts))
    for name in names:
        m = measured.get(name)
        art = ctx.artifacts.get(name, {})
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
        }
        if m and "latency" in m:
            lat = m["latency"][bs]
            entry["latency_ms"] = {k: lat[k] for k in ("p50", "p90", "p99", "mean")}
            entry["throughput_ips"] = lat["throughput_ips"]
            entry["latency_by_batch"] = m["latency"]
            entry["threads"] = m.get("threads")
        entries[name] = entry
    ref = (verify or {}).get("reference")
    if ref in entries and entries[ref]["top1"] is not None:
        for e in entries.values():
            if e["top1"] is not None:
                e["top1_drop"] = round(entries[ref]["top1"] - e["top1"], 6)
    for base in ("fp32_torch", "fp32_onnx"):
        if base in entries and entries[base]["latency_ms"]:
            for e in entries.values():
                if e["latency_ms"]:
                    e[f"speedup_vs_{base}"] = round(entries[base]["latency_ms"]["p50"] / e["latency_ms"]["p50"], 3)
    return entries


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
        "status": "passed" if all(g["passed"] for g in gates) else "failed",
        "run_dir": str(ctx.run.root),
        "input": input_spec(recipe.data).to_dict(),
        "dataset": recipe.data.dataset,
        "held_out": (verify or {}).get("held_out"),
        "held_out_images": (verify or {}).get("held_out_images"),
        "models": _model_entries(ctx, verify, macs, params),
        "gates": gates,
        "reference": (verify or {}).get("reference"),
        "main": (verify or {}).get("main"),
        "stages": {k: v for k, v in ctx.results.items() if k != "verify"},
        "pruning": [],
        "hardware": af.hardware(),
        "versions": af.versions(),
    }
    if "prune" in ctx.results:
        report["pruning"] = pruning_summary(report["models"], (verify or {}).get("batch_sizes", [1]))
    return report


def _fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def _fmt_mb(b: int | None) -> str:
    return "—" if not b else f"{b / 1e6:.2f} MB"


def _md_header(report: dict[str, Any]) -> list[str]:
    """Title, status, hardware and input."""
    hw = report["hardware"]
    lines = [f"# deploycraft report: {report['recipe']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [
        f"**Status: {report['status']}** · run folder `{report['run_dir']}`",
        "",
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


def _md_trained(report: dict[str, Any]) -> list[str]:
    """What was trained, or the checkpoint the run started from."""
    lines: list[str] = []
    train = report["stages"].get("train")
    if train and train.get("epochs"):
        lines += [
            "## What was trained",
            "",
            f"{train['arch']} on {report['dataset']}: {train['epochs']} epoch(s) over {train['train_images']} "
            f"images at {train['image_size']} px ({train['channels']} channels), batch {train['batch_size']}, "
            f"{train['schedule']}; {train['seconds']:.0f} s. Final train loss {train['final_train_loss']:.4f}.",
            "",
        ]
    init = report["stages"].get("init", {})
    if init.get("source", "").startswith("checkpoint"):
        lines += [f"Started from {init['source']}.", ""]
    return lines


def _md_models(report: dict[str, Any]) -> list[str]:
    """One row per model at the first batch size; a line per other batch size."""
    lines: list[str] = []
    models = report["models"]
    bs = next((m["batch_size"] for m in models.values()), 1)
    threads = next((m.get("threads") for m in models.values() if m.get("threads")), None)
    lines += [
        "## Models",
        "",
        f"Top-1 on the held-out split ({report.get('held_out') or 'not measured'}); latency at batch {bs}"
        + (f", {threads} threads" if threads else "")
        + ", medians of interleaved repeats.",
        "",
        "| model | precision | backend | top-1 | drop vs ref. | p50 ms | p99 ms | img/s | speed-up vs FP32 torch "
        "| speed-up vs FP32 ONNX | MACs | size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lat = m.get("latency_ms") or {}
        drop = m.get("top1_drop")
        lines.append(
            f"| {PRETTY.get(name, name)} | {m['precision']} | {m['backend']}"
            f"{' (' + m['target'] + ')' if m.get('target') else ''} | {_fmt_pct(m['top1'])} | "
            f"{'—' if drop is None else f'{drop * 100:+.2f} pt'} | "
            f"{lat.get('p50', float('nan')):.3f} | {lat.get('p99', float('nan')):.3f} | "
            f"{m.get('throughput_ips') or 0:.0f} | "
            f"{m.get('speedup_vs_fp32_torch', float('nan')):.2f}× | "
            f"{m.get('speedup_vs_fp32_onnx', float('nan')):.2f}× | "
            f"{(m.get('macs') or 0) / 1e6:.1f} M | {_fmt_mb(m.get('bytes'))} |"
        )
    other_bs = sorted({b for m in models.values() for b in (m.get("latency_by_batch") or {})} - {str(bs)}, key=int)
    for b in other_bs:
        lines += [
            "",
            f"Batch {b}: "
            + "; ".join(
                f"{PRETTY.get(n, n)} p50 {m['latency_by_batch'][b]['p50']:.3f} ms "
                f"({m['latency_by_batch'][b]['throughput_ips']:.0f} img/s)"
                for n, m in models.items()
                if m.get("latency_by_batch") and b in m["latency_by_batch"]
            ),
        ]
    first = next(iter(models.values()), {})
    if first.get("macs"):
        lines += ["", f"Model: {first['params'] / 1e6:.2f} M parameters, {first['macs'] / 1e6:.1f} M MACs per image."]
    return lines


def _md_gates(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if report["gates"]:
        lines += ["", "## Gates", "", "| gate | result | detail |", "|---|---|---|"]
        for g in report["gates"]:
            lines.append(f"| {g['name']} | {'passed' if g['passed'] else '**FAILED**'} | {g['detail']} |")
    return lines


def _md_pruning(report: dict[str, Any]) -> list[str]:
    """Target, widths, the accuracy trail and predicted vs measured speed-up."""
    lines: list[str] = []
    p = report["stages"].get("prune")
    if p:
        lines += [
            "",
            "## Pruning",
            "",
            f"{p['target']} = {p['target_value']}: channel ratio {p['ratio']:.3f}, importance {p['importance']}, "
            f"widths rounded to {p['round_to']}, {p['steps']} step(s). MACs {p['macs_before'] / 1e6:.2f} M → "
            f"{p['macs_after'] / 1e6:.2f} M ({p['macs_ratio']:.3f}×), params {p['params_before'] / 1e6:.3f} M → "
            f"{p['params_after'] / 1e6:.3f} M; widths now {p['distinct_widths_after']}.",
        ]
        if p.get("removed_blocks"):
            lines.append(
                f"Depth: removed {len(p['removed_blocks'])} residual blocks ({', '.join(p['removed_blocks'])}), "
                "those whose removal raised the training loss least."
            )
        if p.get("latency_after_ms") is not None:
            lines.append(
                f"Latency target {p['target_value']} ms ({p['latency_precision']}, batch "
                f"{p['latency_batch_size']}): measured {p['latency_after_ms']:.3f} ms "
                f"({p['latency_error'] * 100:+.1f} %), unpruned {p['latency_before_ms']:.3f} ms."
            )
        trail = [f"after pruning {_fmt_pct(p.get('top1_after_prune'))}"]
        if p.get("top1_after_finetune") is not None:
            trail.append(f"after fine-tuning {_fmt_pct(p['top1_after_finetune'])}")
        d = report["stages"].get("distill")
        if d:
            trail.append(f"after distillation {_fmt_pct(d['top1_kd'])}")
            if d.get("top1_control") is not None:
                trail.append(
                    f"plain fine-tuning control {_fmt_pct(d['top1_control'])} "
                    f"(KD {d['kd_minus_control'] * 100:+.2f} points)"
                )
        lines.append("Top-1: " + "; ".join(trail) + ".")
        if report.get("pruning"):
            bss = list(report["pruning"][0]["measured_speedup"])
            lines += [
                "",
                "| before → after | predicted (MACs ratio) | " + " | ".join(f"measured batch {b}" for b in bss) + " |",
                "|---|---|" + "---|" * len(bss),
            ]
            for r in report["pruning"]:
                lines.append(
                    f"| {PRETTY.get(r['before'], r['before'])} → {PRETTY.get(r['after'], r['after'])} | "
                    f"{r['predicted_speedup']:.2f}× | "
                    + " | ".join(f"{r['measured_speedup'][b]:.2f}×" for b in bss)
                    + " |"
                )
    return lines


def _md_distill(report: dict[str, Any]) -> list[str]:
    """Distillation without pruning (after pruning it is part of the pruning section)."""
    lines: list[str] = []
    p = report["stages"].get("prune")
    d = report["stages"].get("distill")
    if d and not p:
        lines += [
            "",
            "## Distillation",
            "",
            f"Teacher {d['teacher']} (top-1 {_fmt_pct(d['top1_teacher'])}): student "
            f"{_fmt_pct(d['top1_student_before'])} → {_fmt_pct(d['top1_kd'])}.",
        ]
    return lines


def _md_quantize(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    q = report["stages"].get("quantize")
    if q:
        lines += [
            "",
            "## Quantization",
            "",
            f"PTQ for {q['target']}: {q['activation_dtype']} activations ({q['calibrator']} calibrator"
            f"{', ' + str(q['percentile']) + ' %' if q.get('percentile') else ''}), S8 per-channel weights; "
            f"{q['activation_quantizers']} activation and {q['weight_quantizers']} weight quantizers; "
            f"calibration: {q['calibration']}.",
        ]
        if q.get("int8_conv_fraction") is not None:
            opt = q["ort_optimized_ops"]
            lines.append(
                f"ONNX Runtime's optimized graph: {opt.get('QLinearConv', 0)} QLinearConv, "
                f"{opt.get('QLinearAdd', 0)} QLinearAdd; {q['int8_conv_fraction'] * 100:.0f} % of convs in INT8."
            )
        lines.append(
            f"Simulation vs deployed file: top-1 agreement {q['sim_vs_onnx_top1_agreement'] * 100:.1f} % "
            f"on a check batch."
        )
    return lines


def _md_export(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    e = report["stages"].get("export")
    if e:
        lines += [
            "",
            "## Export",
            "",
            f"FP32 ONNX opset {e['opset']}: {e['batchnorm_nodes']} BatchNormalization nodes; ONNX Runtime vs "
            f"torch max relative error {e['rel_error_vs_torch']:.1e} (limit {e['rtol']}).",
        ]
    return lines


def _md_plot(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if Path(report["run_dir"], "plots", "accuracy_vs_latency.png").is_file():
        lines += ["", "## Accuracy vs latency", "", "![accuracy vs latency](plots/accuracy_vs_latency.png)"]
    return lines


_SECTIONS = (
    _md_header,
    _md_trained,
    _md_models,
    _md_gates,
    _md_pruning,
    _md_distill,
    _md_quantize,
    _md_export,
    _md_plot,
)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: a section per stage that ran, from report.json alone."""
    return "\n".join(line for section in _SECTIONS for line in section(report)) + "\n"


def plot_accuracy_latency(report: dict[str, Any], path: Path) -> bool:
    points = [(n, m) for n, m in report["models"].items() if m.get("top1") is not None and m.get("latency_ms")]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, m in points:
        ax.scatter(m["latency_ms"]["p50"], m["top1"] * 100, s=60)
        ax.annotate(
            PRETTY.get(name, name),
            (m["latency_ms"]["p50"], m["top1"] * 100),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency, ms (batch {points[0][1]['batch_size']}, log scale)")
    ax.set_ylabel("top-1, %")
    ax.set_title(f"{report['recipe']}: accuracy vs latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(ctx) -> dict[str, Any]:
    report = build_report(ctx)
    plot_accuracy_latency(report, ctx.run.plots / "accuracy_vs_latency.png")
    af.write_json(ctx.run.root / "report.json", report)
    af.atomic_write_text(ctx.run.root / "report.md", render_markdown(report))
    return report
