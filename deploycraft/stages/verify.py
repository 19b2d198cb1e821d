"""Verify stage: every deployable on every CPU runtime, on the held-out split, then the gates.

Accuracy: top-1 of the FP32 torch model (the reference) and of every deployable the run produced, on
every installed CPU runtime that can run it (ONNX Runtime, OpenVINO; FP32 files on OpenVINO also in
bf16 where the CPU has bf16 units). Latency: p50/p90/p99 and throughput at each batch size, with
warm-up, interleaved repeats and a fixed thread count for every runtime. Speed-ups are reported
against the FP32 torch model and against the fastest FP32 runtime measured in the same run; the
achieved GMAC/s of each deployable against the machine's convolution ceiling (ceiling.py). With
``target: auto`` the fastest deployable inside the accuracy budget is the one that ships.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import Field

from deploycraft.config import StageConfig
from deploycraft.deployables import TARGET_RUNTIME, build_deployable
from deploycraft.errors import UserError
from deploycraft.evaluate import top1
from deploycraft.names import INT8_NAME, MAIN_ORDER, RUNTIME_LABELS, UNPRUNED, ModelName, row_name
from deploycraft.progress import log
from deploycraft.runtime import available, onnx_runner
from deploycraft.runtime.bench import measure, physical_cores
from deploycraft.runtime.torch_rt import TorchRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage


class VerifyConfig(StageConfig):
    """Accuracy and latency of every deployable on every CPU runtime, against the FP32 references, and the
    gates."""

    type: Literal["verify"] = "verify"
    backends: list[Literal["torch", "onnxruntime", "openvino"]] = Field(
        ["torch", "onnxruntime", "openvino"],
        description="Runtimes to measure (torch: the FP32 reference in eager mode); a runtime that is not "
        "installed is skipped with a note.",
    )
    bf16: bool = Field(
        True,
        description="Also run the FP32 ONNX file on OpenVINO in bf16 (its default on CPUs with bf16 units), "
        "as a deployable of its own whose accuracy is measured like the others.",
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
        None,
        gt=0,
        description="Gate: smallest p50 speed-up of the main deployable over speedup_reference at batch_sizes[0].",
    )
    speedup_reference: Literal["fastest_fp32", "fp32_torch"] = Field(
        "fastest_fp32",
        description="What min_speedup compares against: the fastest FP32 ONNX runtime measured in the same run, "
        "or the FP32 torch model in eager mode.",
    )
    ceiling: bool = Field(
        True,
        description="Measure the machine's convolution ceiling (GMAC/s of one large conv per runtime and "
        "precision) and report each deployable's fraction of it.",
    )
    gpu_precisions: list[Literal["fp16", "bf16"]] = Field(
        ["fp16", "bf16"],
        description="With device cuda: also run the deployable's torch model on the GPU in these precisions, "
        "channels_last, timed with CUDA events (measured for accuracy like every deployable).",
    )
    cuda_graphs: bool = Field(
        True, description="With device cuda: replay the GPU runners' forward pass as one CUDA graph per batch size."
    )
    compare_unpruned: bool = Field(
        True,
        description="After a prune stage, also export and time the unpruned model the same way (FP32 "
        "ONNX, and INT8 with the quantize stage's settings) so the report shows what pruning bought.",
    )


def _gate(name: str, passed: bool, value: float, limit: float, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "value": value, "limit": limit, "detail": detail}


def evaluate_gates(
    cfg: VerifyConfig,
    models: dict[str, dict[str, Any]],
    reference: str | None,
    main: str,
    gated: list[str],
    fastest_fp32: dict[str, str],
) -> list[dict]:
    gates = []
    bs = str(cfg.batch_sizes[0])
    if cfg.max_accuracy_drop is not None and reference in models:
        ref = models[reference]["top1"]
        for name in gated:
            m = models[name]
            drop = ref - m["top1"]
            gates.append(
                _gate(
                    f"accuracy_drop:{name}",
                    drop <= cfg.max_accuracy_drop + 1e-12,
                    round(drop, 6),
                    cfg.max_accuracy_drop,
                    f"{name} top-1 {m['top1']:.4f} vs {reference} {ref:.4f}: drop {drop * 100:.2f} "
                    f"points (limit {cfg.max_accuracy_drop * 100:.2f})",
                )
            )
    p50 = models[main]["latency"][bs]["p50"]
    if cfg.max_latency_ms is not None:
        gates.append(
            _gate(
                f"latency_p50:{main}:bs{bs}",
                p50 <= cfg.max_latency_ms,
                p50,
                cfg.max_latency_ms,
                f"{main} p50 {p50:.3f} ms at batch {bs} (limit {cfg.max_latency_ms} ms)",
            )
        )
    base = fastest_fp32.get(bs) if cfg.speedup_reference == "fastest_fp32" else ModelName.FP32_TORCH.value
    if cfg.min_speedup is not None and base in models:
        speedup = models[base]["latency"][bs]["p50"] / p50
        gates.append(
            _gate(
                f"speedup:{main}:bs{bs}",
                speedup >= cfg.min_speedup,
                speedup,
                cfg.min_speedup,
                f"{main} is {speedup:.2f}x faster than {base} at batch {bs} (limit {cfg.min_speedup}x)",
            )
        )
    return gates


def fastest_fp32(
    models: dict[str, dict[str, Any]], batch_sizes: list[int], precisions: tuple[str, ...] = ("fp32",)
) -> dict[str, str]:
    """Per batch size, the FP32 ONNX row with the lowest p50: the reference a speed-up should beat.
    ``precisions=("fp32", "bf16")``: the fastest run of the FP32 file, OpenVINO's default bf16 inference
    included (what a user gets from the FP32 file without asking for full precision)."""
    out = {}
    for bs in map(str, batch_sizes):
        rows = [
            (m["latency"][bs]["p50"], n)
            for n, m in models.items()
            if m["format"] == "onnx"
            and m["precision"] in precisions
            and not n.startswith("unpruned")
            and "latency" in m
        ]
        if rows:
            out[bs] = min(rows)[1]
    return out


def select_fastest(
    candidates: dict[str, dict[str, Any]], reference_top1: float | None, budget: float | None, batch_sizes: list[int]
) -> tuple[str | None, list[dict[str, Any]]]:
    """The candidate with the lowest latency inside the accuracy budget, and the table that says why.

    Latency over several batch sizes is scored as the geometric mean of each candidate's p50 relative
    to the best p50 at that batch size (1.0 = fastest at every batch size). A candidate with a
    ``not_shippable`` reason (an INT8 file on a runtime its simulation was not compared on) is measured and
    listed, never chosen.
    """
    table = []
    best = {bs: min(c["latency"][str(bs)]["p50"] for c in candidates.values()) for bs in batch_sizes}
    for name, c in candidates.items():
        drop = None if reference_top1 is None else reference_top1 - c["top1"]
        inside = budget is None or drop is None or drop <= budget + 1e-12
        barred = c.get("not_shippable")
        score = math.exp(
            sum(math.log(c["latency"][str(bs)]["p50"] / best[bs]) for bs in batch_sizes) / len(batch_sizes)
        )
        table.append(
            {
                "name": name,
                "top1": c["top1"],
                "drop": drop,
                "within_budget": inside,
                "p50_ms": {str(bs): c["latency"][str(bs)]["p50"] for bs in batch_sizes},
                "relative_latency": round(score, 4),
                **({"not_shippable": barred} if barred else {}),
                **({"simulation_agreement": c["simulation_agreement"]} if "simulation_agreement" in c else {}),
            }
        )
    table.sort(key=lambda r: (not r["within_budget"] or "not_shippable" in r, r["relative_latency"]))
    chosen = next((r["name"] for r in table if r["within_budget"] and "not_shippable" not in r), None)
    for r in table:
        r["chosen"] = r["name"] == chosen
    return chosen, table


def _aoti_runner(path: Path):
    from deploycraft.runtime.aoti import AotiRunner

    return AotiRunner(path)


def _trt_runner(path: Path):
    from deploycraft.runtime.tensorrt import TrtRunner

    return TrtRunner(path)


# Deployables that are not ONNX files, by format: one runner each, on the device they were built for.
GPU_FORMATS = {"aoti": _aoti_runner, "tensorrt": _trt_runner}


def agreement_with_reference(info: dict[str, dict[str, Any]], predictions: dict[str, torch.Tensor]) -> None:
    """Each row's top-1 agreement with the FP32 reference (torch, else the FP32 ONNX) on the held-out split:
    the fraction of images where both predict the same class, whatever the label."""
    ref = next((n for n in (ModelName.FP32_TORCH.value, ModelName.FP32_ONNX.value) if n in predictions), None)
    if ref is None:
        return
    for name, pred in predictions.items():
        if name != ref and len(pred) == len(predictions[ref]) and len(pred):
            info[name]["top1_agreement"] = float((pred == predictions[ref]).float().mean())


def _comparisons(ctx, workdir: Path) -> dict[ModelName, tuple[Path, dict[str, Any]]]:
    """The unpruned model built the same way as each deployable, to measure what pruning bought."""
    data = ctx.data
    reference = ctx.load_model(ctx.reference_dir)
    out: dict[ModelName, tuple[Path, dict[str, Any]]] = {}
    qcfg = ctx.recipe.stage("quantize")
    for name, art in ctx.artifacts.items():
        unpruned = UNPRUNED.get(ModelName(name))
        if unpruned is None or art.format != "onnx":
            continue
        path = workdir / f"{unpruned.value}.onnx"
        if art.precision == "fp32":
            build_deployable(reference, "fp32", path, data.sample_input(2), opset=ctx.recipe.stage("export").opset)
        else:
            images, _ = data.calibration_images(qcfg.num_calibration)
            build_deployable(
                reference,
                "int8",
                path,
                data.sample_input(2),
                target=art.target,
                settings=qcfg.settings_for(art.target),
                calibration=(images, data.spec),
                opset=qcfg.opset,
            )
        out[unpruned] = (path, art.describe())
    return out


@dataclass
class Row:
    """One model on one runtime: how to build its runner, what it is, where its file is."""

    make: Callable[[], Any]
    meta: dict[str, Any]
    path: Path
    size_of: str  # "reference" (unpruned) or "current"


def _onnx_rows(name: str, path: Path, meta: dict[str, Any], size_of: str, cfg, runtimes, threads) -> dict[str, Row]:
    """The rows of one ONNX file: on its own runtime under its plain name, on the others as name@runtime."""
    native = meta.get("backend") or "onnxruntime"
    rows = {}
    for runtime in runtimes:
        key = row_name(name, None if runtime == native else runtime)
        rows[key] = Row(lambda r=runtime: onnx_runner(r, path, threads), {**meta, "backend": runtime}, path, size_of)
    if cfg.bf16 and meta["precision"] == "fp32" and "openvino" in runtimes and _has_bf16():
        rows[row_name(name, "openvino-bf16")] = Row(
            lambda: onnx_runner("openvino", path, threads, "bf16"),
            {**meta, "backend": "openvino", "precision": "bf16"},
            path,
            size_of,
        )
    return rows


def simulation_check(quantize: dict[str, Any], meta: dict[str, Any]) -> tuple[float | None, str | None]:
    """For an INT8 ONNX row: the quantize stage's held-out top-1 agreement between the file on the row's runtime
    and its simulation computing as that runtime does, and why ``target: auto`` may not ship it (None: it may).
    On its own runtime the file was checked when it was built; on another one only where the quantize stage
    compared it there (``other_runtimes``) and found it running as simulated."""
    t = (quantize.get("targets") or {}).get(meta.get("target") or "")
    if meta.get("precision") != "int8" or meta.get("format") != "onnx" or t is None:
        return None, None
    runtime = meta.get("backend")
    if runtime == t.get("runtime"):
        return (t.get("held_out") or {}).get("sim_vs_deployed"), None
    o = (t.get("other_runtimes") or {}).get(runtime)
    if o is None:
        return None, (
            f"its simulation was not compared with it on {RUNTIME_LABELS.get(runtime, runtime)} "
            "(the quantize stage does so with target auto and other_runtimes on)"
        )
    agreement = (o.get("held_out") or {}).get("sim_vs_deployed")
    return agreement, ("; ".join(o["shortfalls"]) if o.get("shortfalls") else None)


def _placed_elsewhere(report: dict[str, Any]) -> list[str]:
    """A line when the shipped INT8 file runs on a runtime it was not placed for (``target: auto`` may ship
    the file placed for ONNX Runtime on OpenVINO): what the quantize stage compared it with there."""
    from deploycraft.formatting import pretty

    main = report["models"].get(report.get("main") or "", {})
    placed = TARGET_RUNTIME.get(main.get("target") or "")
    if main.get("precision") != "int8" or placed is None or main.get("backend") in (None, placed):
        return []
    on = RUNTIME_LABELS.get(main["backend"], main["backend"])
    agreement = main.get("simulation_agreement")
    checked = (
        f"the quantize stage compared it there with its simulation fused and rounded as {on} runs it: top-1 "
        f"agreement {agreement * 100:.2f} % on the held-out split"
        if agreement is not None
        else f"its agreement with the simulation on {on} was not measured"
    )
    return [
        "",
        f"**Shipped on a runtime it was not placed for**: {pretty(report['main'])} is the file placed for "
        f"{main['target']}, run by {on}; {checked}.",
    ]


def _has_bf16() -> bool:
    from deploycraft.machine import hardware

    return bool({"avx512_bf16", "amx_bf16"} & set(hardware().get("cpu_flags", [])))


def _than(ratio: float | None, x) -> str:
    """'2.10× faster than' or, below 1, '3.00× slower than' (a ratio under 1 is not a speed-up)."""
    if ratio is None or ratio >= 1 or ratio <= 0:
        return f"{x(ratio)} faster than"
    return f"{x(1 / ratio)} slower than"


@register_stage
class VerifyStage(Stage):
    type = "verify"
    Config = VerifyConfig
    rank = 5
    report_order = 1
    reads = ("device", "target")
    reads_calibration = True
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
        runtimes = [r for r in ("onnxruntime", "openvino") if r in cfg.backends and available(r)]
        for r in sorted(set(cfg.backends) - {"torch"} - set(runtimes)):
            log(f"  [yellow]{r} is not installed: not measured[/]")
        sizes = {}
        for key, folder in (("reference", ctx.reference_dir), ("current", ctx.model_dir)):
            m = ctx.load_model(folder)
            sizes[key] = {"macs": count_macs(m, ctx.input_shape), "params": count_params(m)}
        rows: dict[str, Row] = {}
        torch_meta = {"format": "torch", "precision": "fp32", "backend": "torch"}
        if "torch" in cfg.backends:
            rows[ModelName.FP32_TORCH.value] = Row(
                lambda: TorchRunner(ctx.load_model(ctx.reference_dir)),
                torch_meta,
                ctx.reference_dir / "weights.pt",
                "reference",
            )
            if changed:
                name = ModelName.PRUNED_FP32_TORCH if pruned else ModelName.DISTILLED_FP32_TORCH
                rows[name.value] = Row(
                    lambda: TorchRunner(ctx.load_model()), torch_meta, ctx.model_dir / "weights.pt", "current"
                )
            if ctx.device == "cuda":
                # The deployable's FP32 model on the GPU in eager torch (end to end: copies included).
                rows[ModelName.FP32_TORCH_CUDA.value] = Row(
                    lambda: TorchRunner(ctx.load_model(), device="cuda"),
                    {**torch_meta, "backend": "torch-cuda", "device": torch.cuda.get_device_name(0)},
                    ctx.model_dir / "weights.pt",
                    "current",
                )
                from deploycraft.runtime.torch_gpu import CudaRunner

                for precision in cfg.gpu_precisions:
                    name = ModelName.FP16_TORCH_CUDA if precision == "fp16" else ModelName.BF16_TORCH_CUDA
                    rows[name.value] = Row(
                        lambda p=precision: CudaRunner(ctx.load_model(), p, True, cfg.cuda_graphs),
                        {
                            **torch_meta,
                            "precision": precision,
                            "backend": "torch-cuda",
                            "device": torch.cuda.get_device_name(0),
                            "cuda_graph": cfg.cuda_graphs,
                        },
                        ctx.model_dir / "weights.pt",
                        "current",
                    )
        for name, art in ctx.artifacts.items():
            if art.format == "onnx":
                rows.update(
                    _onnx_rows(name, ctx.artifact_path(name), art.describe(), "current", cfg, runtimes, threads)
                )
            elif art.format in GPU_FORMATS:
                rows[name] = Row(
                    lambda p=ctx.artifact_path(name), f=art.format: GPU_FORMATS[f](p),
                    art.describe(),
                    ctx.artifact_path(name),
                    "current",
                )
        if pruned and cfg.compare_unpruned and runtimes:
            for name, (path, meta) in _comparisons(ctx, workdir).items():
                native = {"backend": meta.get("backend") or "onnxruntime"}
                rows.update(
                    _onnx_rows(name.value, path, {**meta, **native}, "reference", cfg, [native["backend"]], threads)
                )
        if not rows:
            raise UserError(
                "verify has nothing to measure: no model reached it",
                field="stages.verify.backends",
                fix="add torch to backends, or add a quantize or export stage",
            )
        order = [m.value for m in ModelName]
        rows = dict(sorted(rows.items(), key=lambda kv: (order.index(kv[0].split("@")[0]), kv[0])))
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runners, unsupported = {}, {}
            for name, row in rows.items():
                try:
                    runners[name] = row.make()
                except Exception as exc:  # noqa: BLE001 - a runtime that cannot compile a file it was not built for
                    if "@" not in name:
                        raise  # a deployable that its own runtime cannot load is a failure, not a footnote
                    unsupported[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                    log(f"  [yellow]{name}: the runtime cannot compile this file ({unsupported[name]})[/]")
            rows = {n: r for n, r in rows.items() if n in runners}
            info: dict[str, dict[str, Any]] = {
                name: {
                    **row.meta,
                    "path": str(row.path.relative_to(ctx.run.root)),
                    "bytes": row.path.stat().st_size,
                    **sizes[row.size_of],
                    "threads": threads,
                }
                for name, row in rows.items()
            }
            log(f"  {len(runners)} models, {threads} threads, held-out split: {data.val_name}")
            predictions: dict[str, torch.Tensor] = {}
            for name, runner in runners.items():
                preds: list[torch.Tensor] = []
                info[name]["top1"] = top1(
                    lambda x, r=runner: r(r.prepare(x)), data, cfg.eval_batch_size, f"top-1 {name}", predictions=preds
                )
                predictions[name] = torch.cat(preds) if preds else torch.empty(0)
                log(f"  {name:<28} top-1 {info[name]['top1']:.4f}")
            agreement_with_reference(info, predictions)
            for name in info:
                if rows[name].size_of == "reference":
                    continue  # the unpruned comparison files: the quantize stage did not build them
                agreement, barred = simulation_check(ctx.results.get("quantize") or {}, info[name])
                if agreement is not None:
                    info[name]["simulation_agreement"] = agreement
                if barred:
                    info[name]["not_shippable"] = barred
            sample = data.sample_input(max(cfg.batch_sizes))
            lat = measure(
                runners,
                lambda bs: sample[:bs] if bs <= len(sample) else sample.repeat(-(-bs // len(sample)), 1, 1, 1)[:bs],
                cfg.batch_sizes,
                cfg.warmup,
                cfg.repeats,
            )
            ceiling = {}
            if cfg.ceiling and runtimes:
                from deploycraft.ceiling import measure_ceiling

                log("  the machine's convolution ceiling (one large conv per runtime and precision):")
                ceiling = measure_ceiling(runtimes, threads)
                for k, c in ceiling.items():
                    log(f"    {k:<20} {c['gmacs']:8.1f} GMAC/s ({c['p50_ms']:.3f} ms)")
        finally:
            torch.set_num_threads(previous_threads)
        for name in runners:
            m = info[name]
            m["latency"] = {str(bs): lat[name][bs].to_dict() for bs in cfg.batch_sizes}
            peak = ceiling.get(f"{m['backend']}:{m['precision']}")
            if peak:
                gmacs = {str(bs): m["macs"] * bs / (lat[name][bs].p50 / 1e3) / 1e9 for bs in cfg.batch_sizes}
                m["gmacs"] = {bs: round(v, 1) for bs, v in gmacs.items()}
                m["ceiling_fraction"] = {bs: round(v / peak["gmacs"], 3) for bs, v in gmacs.items()}
        for bs in map(str, cfg.batch_sizes):
            for name in runners:
                lt = info[name]["latency"][bs]
                log(
                    f"  {name:<28} batch {bs}: p50 {lt['p50']:.3f} ms, p99 {lt['p99']:.3f} ms, "
                    f"{lt['throughput_ips']:.0f} img/s"
                )
        reference = next((n for n in (ModelName.FP32_TORCH.value, ModelName.FP32_ONNX.value) if n in info), None)
        fastest = fastest_fp32(info, cfg.batch_sizes)
        main, candidates, gated = self._main(ctx, cfg, info, reference)
        gates = evaluate_gates(cfg, info, reference, main, gated, fastest)
        for g in gates:
            log(f"  gate {g['name']}: {'[green]passed[/]' if g['passed'] else '[red]FAILED[/]'} ({g['detail']})")
        return StageOutput(
            metrics={
                "models": info,
                "gates": gates,
                "reference": reference,
                "main": main,
                "fastest_fp32": fastest,
                "fastest_fp32_file": fastest_fp32(info, cfg.batch_sizes, ("fp32", "bf16")),
                "candidates": candidates,
                "unsupported": unsupported,
                "ceiling": ceiling,
                "threads": threads,
                "batch_sizes": cfg.batch_sizes,
                "held_out": data.val_name,
                "held_out_images": data.num_val,
            }
        )

    @staticmethod
    def _main(ctx, cfg: VerifyConfig, info: dict[str, dict], reference: str | None) -> tuple[str, list, list[str]]:
        """The deployable that ships (and that the latency gates judge), the auto candidates, the gated rows.

        A fixed target ships its INT8 file on its own runtime (else the FP32 ONNX); every deployable the
        run produced is held to the accuracy gate. ``auto`` ships the fastest measured candidate inside
        the accuracy budget; only that one is gated.
        """
        deployables = [n for n in info if n in ctx.artifacts]
        target = ctx.recipe.target
        if target == "auto":
            pool = {
                n: m for n, m in info.items() if m["format"] == "onnx" and not n.startswith("unpruned") and "top1" in m
            }
            if pool:
                ref_top1 = info[reference]["top1"] if reference else None
                main, table = select_fastest(pool, ref_top1, cfg.max_accuracy_drop, cfg.batch_sizes)
                if main is None:  # nothing inside the budget: ship nothing silently wrong, let the gate fail
                    main = next((r["name"] for r in table if "not_shippable" not in r), table[0]["name"])
                    log(f"  [yellow]target auto: no candidate inside the accuracy budget; {main} is the fastest[/]")
                else:
                    log(f"  target auto: {main} is the fastest inside the accuracy budget")
                return main, table, [main]
        int8 = INT8_NAME.get(target)
        if int8 is not None and int8.value in info:
            main = int8.value
        else:
            main = next(
                n.value for n in (*MAIN_ORDER, *map(ModelName, [k.split("@")[0] for k in info])) if n.value in info
            )
        return main, [], deployables or [n for n in info if n != reference]

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """The models table at the first batch size (a line per other batch size), the headline speed-up
        against the fastest FP32 runtime, the ceiling, auto's candidates, then the gates."""
        from deploycraft.formatting import fmt_mb, fmt_pct, pretty

        def x(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f}×"

        def ms(v: float | None) -> str:
            return "—" if v is None else f"{v:.3f}"

        lines: list[str] = []
        models = report["models"]
        measured = any(m.get("latency_ms") or m.get("top1") is not None for m in models.values())
        # Nothing to show: no reference, no model measured, no headline, gate, candidate or faster note.
        if not measured and not any(
            report.get(k) for k in ("reference", "headline", "gates", "candidates", "faster_alternative")
        ):
            first = next(iter(models.values()), {})
            size = (
                f" The model: {first['params'] / 1e6:.2f} M parameters, {first['macs'] / 1e6:.1f} M MACs per image."
                if first.get("macs")
                else ""
            )
            return [
                "## Models",
                "",
                "Not measured: this run has no verify stage (it measures top-1 and latency)." + size,
            ]
        bs = next((m["batch_size"] for m in models.values()), 1)
        threads = next((m.get("threads") for m in models.values() if m.get("threads")), None)
        lines += [
            "## Models",
            "",
            f"Top-1 on the held-out split ({report.get('held_out') or 'not measured'}); latency at batch {bs}"
            + (f", {threads} threads" if threads else "")
            + ", medians of interleaved repeats; speed-ups are ratios of p50 within this run.",
            "",
            "| model | precision | runtime | top-1 | drop vs ref. | p50 ms | p99 ms | img/s | vs FP32 torch "
            "| vs fastest FP32 | GMAC/s (of ceiling) | MACs | size |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in models.items():
            lat = m.get("latency_ms") or {}
            drop = m.get("top1_drop")
            gm = f"{m['gmacs']:.0f} ({m['ceiling_fraction'] * 100:.0f} %)" if m.get("gmacs") is not None else "—"
            shipped = " **(shipped)**" if name == report.get("main") else ""
            ips = f"{m['throughput_ips']:.0f}" if m.get("throughput_ips") else "—"
            lines.append(
                f"| {pretty(name)}{shipped} | {m['precision']} | {m['backend']}"
                f"{' (' + m['target'] + ')' if m.get('target') else ''} | {fmt_pct(m['top1'])} | "
                f"{'—' if drop is None else f'{drop * 100:+.2f} pt'} | "
                f"{ms(lat.get('p50'))} | {ms(lat.get('p99'))} | {ips} | {x(m.get('speedup_vs_fp32_torch'))} | "
                f"{x(m.get('speedup_vs_fastest_fp32'))} | {gm} | "
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
        main = models.get(report.get("main")) or first  # the shipped model (pruned, where the run prunes)
        if main.get("macs"):
            line = f"Model: {main['params'] / 1e6:.2f} M parameters, {main['macs'] / 1e6:.1f} M MACs per image"
            if first.get("macs") and first["macs"] != main["macs"]:
                line += f" (before pruning {first['params'] / 1e6:.2f} M, {first['macs'] / 1e6:.1f} M)"
            lines += ["", line + "."]
        for h in report.get("headline", []):
            lines += [
                "",
                f"**Batch {h['batch_size']}: {pretty(h['main'])} is {_than(h['speedup_vs_fastest_fp32'], x)} the "
                f"fastest FP32 runtime ({pretty(h['fastest_fp32']) if h['fastest_fp32'] else '—'}) and "
                f"{_than(h['speedup_vs_fp32_torch'], x)} FP32 torch.**",
            ]
            if h.get("fastest_fp32_file") and h["fastest_fp32_file"] != h["fastest_fp32"]:
                lines[-1] = lines[-1][:-2] + (
                    f" Against the fastest run of the FP32 file, {pretty(h['fastest_fp32_file'])} (lower precision "
                    f"inside the runtime): {x(h['speedup_vs_fastest_fp32_file'])}.**"
                )
        if report.get("faster_alternative"):
            from deploycraft.report import faster_words

            lines += ["", faster_words(report)]
        lines += _placed_elsewhere(report)
        agree = {n: m["top1_agreement"] for n, m in models.items() if m.get("top1_agreement") is not None}
        if agree:
            lines += [
                "",
                "Top-1 agreement with the FP32 reference on the held-out split (same predicted class): "
                + "; ".join(f"{pretty(n)} {v * 100:.2f} %" for n, v in agree.items())
                + ".",
            ]
        for name, why in (report.get("unsupported") or {}).items():
            lines += ["", f"Not measured: {pretty(name)} — the runtime cannot compile this file ({why})."]
        if report.get("ceiling"):
            lines += [
                "",
                "Ceiling ("
                + next(iter(report["ceiling"].values()))["shape"]
                + "): "
                + "; ".join(f"{k.replace(':', ' ')} {c['gmacs']:.0f} GMAC/s" for k, c in report["ceiling"].items())
                + ".",
            ]
        if report.get("candidates"):
            bss = list(report["candidates"][0]["p50_ms"])
            lines += [
                "",
                "## Target auto: the candidates",
                "",
                "The fastest candidate inside the accuracy budget ships; latency over the batch sizes is the "
                "geometric mean of each p50 relative to the best at that batch size. An INT8 file ships on a "
                "runtime only where the quantize stage compared it there with its simulation (top-1 agreement "
                "on the held-out split, the simulation fused and rounded as that runtime runs the file).",
                "",
                "| candidate | top-1 | drop | within budget | agreement with its simulation | "
                + " | ".join(f"p50 batch {b}" for b in bss)
                + " | relative latency | shipped |",
                "|---|---|---|---|---|" + "---|" * len(bss) + "---|---|",
            ]
            barred = []
            for c in report["candidates"]:
                drop = "—" if c["drop"] is None else f"{c['drop'] * 100:+.2f} pt"
                inside = "yes" if c["within_budget"] else "no"
                agree = c.get("simulation_agreement")
                shipped = "**yes**" if c["chosen"] else ("not eligible" if c.get("not_shippable") else "")
                if c.get("not_shippable"):
                    barred.append(f"{pretty(c['name'])}: {c['not_shippable']}")
                lines.append(
                    f"| {pretty(c['name'])} | {fmt_pct(c['top1'])} | {drop} | {inside} | "
                    f"{'—' if agree is None else f'{agree * 100:.2f} %'} | "
                    + " | ".join(f"{c['p50_ms'][b]:.3f} ms" for b in bss)
                    + f" | {c['relative_latency']:.3f} | {shipped} |"
                )
            if barred:
                lines += ["", "Not eligible: " + "; ".join(barred) + "."]
        if report["gates"]:
            lines += ["", "## Gates", "", "| gate | result | detail |", "|---|---|---|"]
            for g in report["gates"]:
                lines.append(f"| {g['name']} | {'passed' if g['passed'] else '**FAILED**'} | {g['detail']} |")
        return lines
