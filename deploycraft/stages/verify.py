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
MAIN_ORDER = ("int8_onnx", "fp32_onnx", "fp32_torch")


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


def evaluate_gates(cfg: VerifyConfig, models: dict[str, dict[str, Any]], reference: str, main: str) -> list[dict]:
    gates = []
    bs = str(cfg.batch_sizes[0])
    if cfg.max_accuracy_drop is not None and reference in models:
        ref = models[reference]["top1"]
        for name, m in models.items():
            if name == reference:
                continue
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


@register_stage
class VerifyStage(Stage):
    type = "verify"
    config: VerifyConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        threads = cfg.threads or physical_cores()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runners: dict[str, Any] = {}
            info: dict[str, dict[str, Any]] = {}
            if "torch" in cfg.backends:
                runners["fp32_torch"] = TorchRunner(ctx.load_model())
                info["fp32_torch"] = {
                    "path": str((ctx.model_dir / "weights.pt").relative_to(ctx.run.root)),
                    "format": "torch",
                    "precision": "fp32",
                    "backend": "torch",
                    "bytes": (ctx.model_dir / "weights.pt").stat().st_size,
                }
            if "onnxruntime" in cfg.backends:
                for name, art in ctx.artifacts.items():
                    if art["format"] == "onnx":
                        path = ctx.artifact_path(name)
                        runners[name] = OrtRunner(path, threads)
                        info[name] = {
                            **{k: art[k] for k in ("path", "format", "precision", "backend")},
                            "target": art.get("target"),
                            "bytes": path.stat().st_size,
                        }
            if not runners:
                raise RuntimeError("verify has nothing to measure: no backend produced a model")
            order = {n: i for i, n in enumerate(("fp32_torch", "fp32_onnx", "int8_onnx"))}
            runners = dict(sorted(runners.items(), key=lambda kv: order.get(kv[0], len(order))))
            log(f"  {len(runners)} models, {threads} threads, held-out split: {data.val_name}")
            for name, runner in runners.items():
                info[name]["top1"] = top1(
                    lambda x, r=runner: r(r.prepare(x)), data, cfg.eval_batch_size, f"top-1 {name}"
                )
                log(f"  {name:<11} top-1 {info[name]['top1']:.4f}")
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
            bs = str(cfg.batch_sizes[0])
            for name in runners:
                l = info[name]["latency"][bs]
                log(
                    f"  {name:<11} batch {bs}: p50 {l['p50']:.3f} ms, p99 {l['p99']:.3f} ms, "
                    f"{l['throughput_ips']:.0f} img/s"
                )
        finally:
            torch.set_num_threads(previous_threads)
        reference = next((n for n in ("fp32_torch", "fp32_onnx") if n in info), None)
        main = next(n for n in MAIN_ORDER if n in info)
        gates = evaluate_gates(cfg, info, reference, main)
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
