"""Verify stage: every model through its own runtime, on the held-out split, then the gates.

Accuracy: top-1 of the FP32 torch model (the reference) and of every deployable the run produced,
each run by the runtime it ships for. Latency: p50/p90/p99 and throughput at each batch size, with
warm-up, interleaved repeats and a fixed thread count for every runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from deploycraft.config import StageConfig
from deploycraft.deployables import build_deployable
from deploycraft.errors import UserError
from deploycraft.evaluate import top1
from deploycraft.names import MAIN_ORDER, ModelName
from deploycraft.progress import log
from deploycraft.runtime.bench import measure, physical_cores
from deploycraft.runtime.ort import OrtRunner
from deploycraft.runtime.torch_rt import TorchRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage


class VerifyConfig(StageConfig):
    """Accuracy of every model through its own runtime, latency, and the gates."""

    type: Literal["verify"] = "verify"
    backends: list[Literal["torch", "onnxruntime"]] = Field(
        ["torch", "onnxruntime"], description="Runtimes to measure (torch: the FP32 reference in eager mode)."
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1], min_length=1, description="Batch sizes for latency; the first is the one the gates use."
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads for every runtime; default: all cores.")
    warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    repeats: int = Field(100, ge=3, description="Timed runs per model and batch size (medians, p90, p99).")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for the accuracy pass.")
    max_accuracy_drop: float | None = Field(
        0.01,
        ge=0,
        le=1,
        description="Gate: largest top-1 drop of any deployable vs the FP32 torch model (fraction: 0.01 = 1 point).",
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="Gate: largest p50 latency of the main deployable at batch_sizes[0]."
    )
    min_speedup: float | None = Field(
        None, gt=0, description="Gate: smallest p50 speed-up of the main deployable over the FP32 torch model."
    )
    compare_unpruned: bool = Field(
        True,
        description="After a prune stage, also export and time the unpruned model the same way (FP32 "
        "ONNX, and INT8 with the quantize stage's settings) so the report shows what pruning bought.",
    )


def evaluate_gates(
    cfg: VerifyConfig, models: dict[str, dict[str, Any]], reference: str | None, main: str, deployables: list[str]
) -> list[dict]:
    gates = []
    bs = str(cfg.batch_sizes[0])
    if cfg.max_accuracy_drop is not None and reference in models:
        ref = models[reference]["top1"]
        for name in deployables:
            m = models[name]
            drop = ref - m["top1"]
            gates.append(
                {
                    "name": f"accuracy_drop:{name}",
                    "passed": drop <= cfg.max_accuracy_drop + 1e-12,
                    "value": round(drop, 6),
                    "limit": cfg.max_accuracy_drop,
                    "detail": f"{name} top-1 {m['top1']:.4f} vs {reference} {ref:.4f}: drop {drop * 100:.2f} "
                    f"points (limit {cfg.max_accuracy_drop * 100:.2f})",
                }
            )
    if cfg.max_latency_ms is not None:
        p50 = models[main]["latency"][bs]["p50"]
        gates.append(
            {
                "name": f"latency_p50:{main}:bs{bs}",
                "passed": p50 <= cfg.max_latency_ms,
                "value": p50,
                "limit": cfg.max_latency_ms,
                "detail": f"{main} p50 {p50:.3f} ms at batch {bs} (limit {cfg.max_latency_ms} ms)",
            }
        )
    if cfg.min_speedup is not None and "fp32_torch" in models:
        speedup = models["fp32_torch"]["latency"][bs]["p50"] / models[main]["latency"][bs]["p50"]
        gates.append(
            {
                "name": f"speedup:{main}:bs{bs}",
                "passed": speedup >= cfg.min_speedup,
                "value": speedup,
                "limit": cfg.min_speedup,
                "detail": f"{main} is {speedup:.2f}x faster than fp32_torch at batch {bs} (limit {cfg.min_speedup}x)",
            }
        )
    return gates


def _comparisons(ctx, workdir: Path) -> dict[ModelName, tuple[Path, dict[str, Any]]]:
    """The unpruned model built the same way as the deployables, to measure what pruning bought."""
    data = ctx.data
    reference = ctx.load_model(ctx.reference_dir)
    out: dict[ModelName, tuple[Path, dict[str, Any]]] = {}
    if ModelName.FP32_ONNX in ctx.artifacts:
        path = workdir / "unpruned_fp32.onnx"
        build_deployable(reference, "fp32", path, data.sample_input(2), opset=ctx.recipe.stage("export").opset)
        out[ModelName.UNPRUNED_FP32_ONNX] = (path, {"format": "onnx", "precision": "fp32", "backend": "onnxruntime"})
    qcfg = ctx.recipe.stage("quantize")
    if ModelName.INT8_ONNX in ctx.artifacts and qcfg is not None:
        path = workdir / "unpruned_int8.onnx"
        images, _ = data.calibration_images(qcfg.num_calibration)
        build_deployable(
            reference,
            "int8",
            path,
            data.sample_input(2),
            target=ctx.recipe.target,
            settings=qcfg.settings,
            calibration=(images, data.spec),
            opset=qcfg.opset,
        )
        out[ModelName.UNPRUNED_INT8_ONNX] = (
            path,
            {"format": "onnx", "precision": "int8", "backend": "onnxruntime", "target": ctx.recipe.target},
        )
    return out


@register_stage
class VerifyStage(Stage):
    type = "verify"
    Config = VerifyConfig
    rank = 5
    report_order = 1
    reads = ("device", "target")
    config: VerifyConfig

    @classmethod
    def check(cls, recipe, index: int) -> None:
        cfg = recipe.stages[index]
        if not cfg.enabled:
            return
        where = f"stages.{index}"
        if not cfg.backends:
            raise UserError("no backends to measure", field=f"{where}.backends", fix="list torch and/or onnxruntime")
        produces_onnx = any(s.enabled and s.type in ("quantize", "export") for s in recipe.stages)
        if "torch" not in cfg.backends and not produces_onnx:
            raise UserError(
                "verify has nothing to measure: backends has no torch and no stage writes an ONNX file",
                field=f"{where}.backends",
                fix="add torch to backends, or add a quantize or export stage",
            )
        if cfg.min_speedup is not None and "torch" not in cfg.backends:
            raise UserError(
                "the min_speedup gate compares against the FP32 torch model, which backends leaves out",
                field=f"{where}.min_speedup",
                fix="add torch to backends, or remove min_speedup",
            )

    def run(self, ctx, workdir: Path) -> StageOutput:
        from deploycraft.models.profile import count_macs, count_params

        cfg = self.config
        data = ctx.data
        threads = cfg.threads or physical_cores()
        changed = ctx.reference_dir is not None and ctx.model_dir != ctx.reference_dir
        pruned = "prune" in ctx.results
        sizes = {}
        for key, folder in (("reference", ctx.reference_dir), ("current", ctx.model_dir)):
            m = ctx.load_model(folder)
            sizes[key] = {"macs": count_macs(m, ctx.input_shape), "params": count_params(m)}
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runners: dict[ModelName, Any] = {}
            info: dict[ModelName, dict[str, Any]] = {}

            def add(name: ModelName, runner, meta: dict[str, Any], path: Path, size_of: str) -> None:
                runners[name] = runner
                info[name] = {
                    **meta,
                    "path": str(path.relative_to(ctx.run.root)),
                    "bytes": path.stat().st_size,
                    **sizes[size_of],
                }

            torch_meta = {"format": "torch", "precision": "fp32", "backend": "torch"}
            if "torch" in cfg.backends:
                add(
                    ModelName.FP32_TORCH,
                    TorchRunner(ctx.load_model(ctx.reference_dir)),
                    torch_meta,
                    ctx.reference_dir / "weights.pt",
                    "reference",
                )
                if changed:
                    name = ModelName.PRUNED_FP32_TORCH if pruned else ModelName.DISTILLED_FP32_TORCH
                    add(name, TorchRunner(ctx.load_model()), torch_meta, ctx.model_dir / "weights.pt", "current")
                if ctx.device == "cuda":
                    # The deployable's FP32 model on the GPU in eager torch (end to end: copies included).
                    gpu_meta = {**torch_meta, "backend": "torch-cuda", "device": torch.cuda.get_device_name(0)}
                    add(
                        ModelName.FP32_TORCH_CUDA,
                        TorchRunner(ctx.load_model(), device="cuda"),
                        gpu_meta,
                        ctx.model_dir / "weights.pt",
                        "current",
                    )
            if "onnxruntime" in cfg.backends:
                for name, art in ctx.artifacts.items():
                    if art.format == "onnx":
                        path = ctx.artifact_path(name)
                        add(name, OrtRunner(path, threads), art.describe(), path, "current")
                if pruned and cfg.compare_unpruned:
                    for name, (path, meta) in _comparisons(ctx, workdir).items():
                        add(name, OrtRunner(path, threads), meta, path, "reference")
            if not runners:
                raise UserError(
                    "verify has nothing to measure: no model reached it",
                    field="stages.verify.backends",
                    fix="add torch to backends, or add a quantize or export stage",
                )
            order = list(ModelName)
            runners = dict(sorted(runners.items(), key=lambda kv: order.index(kv[0])))
            log(f"  {len(runners)} models, {threads} threads, held-out split: {data.val_name}")
            for name, runner in runners.items():
                info[name]["top1"] = top1(
                    lambda x, r=runner: r(r.prepare(x)), data, cfg.eval_batch_size, f"top-1 {name}"
                )
                log(f"  {name:<20} top-1 {info[name]['top1']:.4f}")
            sample = data.sample_input(max(cfg.batch_sizes))
            lat = measure(
                runners,
                lambda bs: sample[:bs] if bs <= len(sample) else sample.repeat(-(-bs // len(sample)), 1, 1, 1)[:bs],
                cfg.batch_sizes,
                cfg.warmup,
                cfg.repeats,
            )
            for name in runners:
                info[name]["latency"] = {str(bs): lat[name][bs].to_dict() for bs in cfg.batch_sizes}
                info[name]["threads"] = threads
            for bs in map(str, cfg.batch_sizes):
                for name in runners:
                    l = info[name]["latency"][bs]
                    log(
                        f"  {name:<20} batch {bs}: p50 {l['p50']:.3f} ms, p99 {l['p99']:.3f} ms, "
                        f"{l['throughput_ips']:.0f} img/s"
                    )
        finally:
            torch.set_num_threads(previous_threads)
        info = {n: info[n] for n in runners}
        reference = next((n for n in (ModelName.FP32_TORCH, ModelName.FP32_ONNX) if n in info), None)
        deployables = [n for n in info if n in ctx.artifacts] or [n for n in info if n != reference]
        main = next(n for n in (*MAIN_ORDER, *info) if n in info)
        gates = evaluate_gates(cfg, info, reference, main, deployables)
        for g in gates:
            log(f"  gate {g['name']}: {'[green]passed[/]' if g['passed'] else '[red]FAILED[/]'} ({g['detail']})")
        return StageOutput(
            metrics={
                "models": {n.value: m for n, m in info.items()},
                "gates": gates,
                "reference": reference.value if reference else None,
                "main": main.value,
                "threads": threads,
                "batch_sizes": cfg.batch_sizes,
                "held_out": data.val_name,
                "held_out_images": data.num_val,
            }
        )

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """One row per model at the first batch size; a line per other batch size; then the gates."""
        from deploycraft.formatting import fmt_mb, fmt_pct, pretty

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
                f"| {pretty(name)} | {m['precision']} | {m['backend']}"
                f"{' (' + m['target'] + ')' if m.get('target') else ''} | {fmt_pct(m['top1'])} | "
                f"{'—' if drop is None else f'{drop * 100:+.2f} pt'} | "
                f"{lat.get('p50', float('nan')):.3f} | {lat.get('p99', float('nan')):.3f} | "
                f"{m.get('throughput_ips') or 0:.0f} | "
                f"{m.get('speedup_vs_fp32_torch', float('nan')):.2f}× | "
                f"{m.get('speedup_vs_fp32_onnx', float('nan')):.2f}× | "
                f"{(m.get('macs') or 0) / 1e6:.1f} M | {fmt_mb(m.get('bytes'))} |"
            )
        other_bs = sorted({b for m in models.values() for b in (m.get("latency_by_batch") or {})} - {str(bs)}, key=int)
        for b in other_bs:
            lines += [
                "",
                f"Batch {b}: "
                + "; ".join(
                    f"{pretty(n)} p50 {m['latency_by_batch'][b]['p50']:.3f} ms "
                    f"({m['latency_by_batch'][b]['throughput_ips']:.0f} img/s)"
                    for n, m in models.items()
                    if m.get("latency_by_batch") and b in m["latency_by_batch"]
                ),
            ]
        first = next(iter(models.values()), {})
        if first.get("macs"):
            lines += [
                "",
                f"Model: {first['params'] / 1e6:.2f} M parameters, {first['macs'] / 1e6:.1f} M MACs per image.",
            ]
        if report["gates"]:
            lines += ["", "## Gates", "", "| gate | result | detail |", "|---|---|---|"]
            for g in report["gates"]:
                lines.append(f"| {g['name']} | {'passed' if g['passed'] else '**FAILED**'} | {g['detail']} |")
        return lines
