"""Verify stage: every model through its own runtime, on the held-out split, then the gates.

Accuracy: top-1 of the FP32 torch model (the reference) and of every deployable the run produced,
each run by the runtime it ships for. Latency: p50/p90/p99 and throughput at each batch size, with
warm-up, interleaved repeats and a fixed thread count for every runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deploycraft.evaluate import top1
from deploycraft.progress import log
from deploycraft.recipe import VerifyConfig
from deploycraft.runtime.bench import measure
from deploycraft.runtime.ort import OrtRunner
from deploycraft.runtime.torch_rt import TorchRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage

# The deployable the latency gates look at: the most optimized one the run produced.
MAIN_ORDER = ("int8_onnx", "fp32_onnx", "pruned_fp32_torch", "distilled_fp32_torch", "fp32_torch")


def physical_cores() -> int:
    try:
        text = Path("/proc/cpuinfo").read_text()
        cores = {(line.split(":")[1].strip()) for line in text.splitlines() if line.startswith("core id")}
        sockets = {(line.split(":")[1].strip()) for line in text.splitlines() if line.startswith("physical id")}
        if cores:
            return len(cores) * max(1, len(sockets))
    except OSError:
        pass
    return os.cpu_count() or 1


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


ORDER = (
    "fp32_torch",
    "pruned_fp32_torch",
    "distilled_fp32_torch",
    "fp32_torch_cuda",
    "unpruned_fp32_onnx",
    "unpruned_int8_onnx",
    "fp32_onnx",
    "int8_onnx",
)


def _comparisons(ctx, workdir: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The unpruned model exported the same way as the deployables, to measure what pruning bought."""
    from deploycraft.onnx_io import export_onnx
    from deploycraft.quant.graph import fold_bn
    from deploycraft.stages.quantize import build_quantized, calibrate

    data = ctx.data
    reference = ctx.load_model(ctx.reference_dir)
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    if "fp32_onnx" in ctx.artifacts:
        path = workdir / "unpruned_fp32.onnx"
        export_onnx(fold_bn(reference), data.sample_input(2), path)
        out["unpruned_fp32_onnx"] = (path, {"format": "onnx", "precision": "fp32", "backend": "onnxruntime"})
    qcfg = ctx.recipe.stage("quantize")
    if "int8_onnx" in ctx.artifacts and qcfg is not None:
        q = build_quantized(reference, qcfg)
        images, _ = data.calibration_images(qcfg.num_calibration)
        calibrate(q, images, data.spec, qcfg)
        path = workdir / "unpruned_int8.onnx"
        export_onnx(q, data.sample_input(2), path)
        out["unpruned_int8_onnx"] = (
            path,
            {"format": "onnx", "precision": "int8", "backend": "onnxruntime", "target": qcfg.target},
        )
    return out


@register_stage
class VerifyStage(Stage):
    type = "verify"
    config: VerifyConfig

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
            runners: dict[str, Any] = {}
            info: dict[str, dict[str, Any]] = {}

            def add(name: str, runner, meta: dict[str, Any], path: Path, size_of: str) -> None:
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
                    "fp32_torch",
                    TorchRunner(ctx.load_model(ctx.reference_dir)),
                    torch_meta,
                    ctx.reference_dir / "weights.pt",
                    "reference",
                )
                if changed:
                    name = "pruned_fp32_torch" if pruned else "distilled_fp32_torch"
                    add(name, TorchRunner(ctx.load_model()), torch_meta, ctx.model_dir / "weights.pt", "current")
                if ctx.device == "cuda":
                    # The deployable's FP32 model on the GPU in eager torch (end to end: copies included).
                    gpu_meta = {**torch_meta, "backend": "torch-cuda", "device": torch.cuda.get_device_name(0)}
                    add(
                        "fp32_torch_cuda",
                        TorchRunner(ctx.load_model(), device="cuda"),
                        gpu_meta,
                        ctx.model_dir / "weights.pt",
                        "current",
                    )
            if "onnxruntime" in cfg.backends:
                for name, art in ctx.artifacts.items():
                    if art["format"] == "onnx":
                        meta = {k: art.get(k) for k in ("format", "precision", "backend", "target")}
                        add(name, OrtRunner(ctx.artifact_path(name), threads), meta, ctx.artifact_path(name), "current")
                if pruned and cfg.compare_unpruned:
                    for name, (path, meta) in _comparisons(ctx, workdir).items():
                        add(name, OrtRunner(path, threads), meta, path, "reference")
            if not runners:
                raise RuntimeError("verify has nothing to measure: no backend produced a model")
            rank = {n: i for i, n in enumerate(ORDER)}
            runners = dict(sorted(runners.items(), key=lambda kv: rank.get(kv[0], len(rank))))
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
        reference = next((n for n in ("fp32_torch", "fp32_onnx") if n in info), None)
        deployables = [n for n in info if n in ctx.artifacts] or [n for n in info if n != reference]
        main = next(n for n in (*MAIN_ORDER, *info) if n in info)
        gates = evaluate_gates(cfg, info, reference, main, deployables)
        for g in gates:
            log(f"  gate {g['name']}: {'[green]passed[/]' if g['passed'] else '[red]FAILED[/]'} ({g['detail']})")
        return StageOutput(
            metrics={
                "models": info,
                "gates": gates,
                "reference": reference,
                "main": main,
                "threads": threads,
                "batch_sizes": cfg.batch_sizes,
                "held_out": data.val_name,
                "held_out_images": data.num_val,
            }
        )
