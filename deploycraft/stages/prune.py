"""Prune stage: structured channel pruning to a ratio, a MACs/parameter budget or a measured latency.

The pruned model is saved like every model here: the architecture's name, the widths of the layers
that changed, and a state dict, so it is rebuilt in a new process without pickled modules. With
``steps > 1`` the channels go in several steps with fine-tuning in between; each finished step is
saved, so a killed run resumes from the last one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from deploycraft.artifacts import read_json, write_json
from deploycraft.config import OptimConfig, StageConfig
from deploycraft.errors import UserError
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.latency import onnx_latency_ms
from deploycraft.models.io import load_model, read_spec, save_model
from deploycraft.progress import log
from deploycraft.pruning import (
    PruneSettings,
    block_scores,
    conv_widths,
    prune_once,
    pruned_copy,
    relative_step_ratio,
    removable_blocks,
    remove_blocks,
    search_ratio,
    size_of,
    taylor_gradients,
)
from deploycraft.stages.base import Stage, StageOutput, register_stage
from deploycraft.stages.train import train_epochs


class FinetuneConfig(OptimConfig):
    """Short recovery training after each pruning step (plain cross-entropy); in a data-parallel run it runs on
    rank 0 alone, with the rest of the prune stage."""

    lr: float = Field(0.01, gt=0, description="Peak learning rate of SGD (reached after the warm-up).")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    eval_each_epoch: bool = Field(False, description="Evaluate top-1 on the held-out split after every epoch.")


class PruneConfig(StageConfig):
    """Structured channel pruning on torch-pruning's dependency graph: channels coupled through residual
    adds, concatenations, grouped convs and SE gates are removed together. Give exactly one target."""

    type: Literal["prune"] = "prune"
    channel_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Target: remove this fraction of the channels of every prunable layer (0: only remove_blocks).",
    )
    target_macs: float | None = Field(
        None, gt=0, le=1, description="Target: keep at most this fraction of the MACs (0.5 = half), found by search."
    )
    target_params: float | None = Field(
        None, gt=0, le=1, description="Target: keep at most this fraction of the parameters, found by search."
    )
    target_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Target: p50 latency at latency_batch_size on the target's CPU runtime (OpenVINO for "
        "openvino-cpu, else ONNX Runtime), pruned until met.",
    )
    latency_batch_size: int = Field(1, ge=1, description="target_latency_ms: the batch size it is measured at.")
    latency_precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="target_latency_ms: time the FP32 or the INT8 ONNX model; auto = int8 when a later "
        "quantize stage targets onnxruntime-cpu, else fp32.",
    )
    latency_threads: int | None = Field(None, ge=1, description="target_latency_ms: threads; default all cores.")
    importance: Literal["l1", "l2", "bn_scale", "taylor", "fpgm", "random"] = Field(
        "l1",
        description="Channel importance: group L1/L2 magnitude, BN scale (network slimming), first-order "
        "Taylor (from taylor_batches batches), FPGM (geometric median), or random (a baseline).",
    )
    taylor_batches: int = Field(8, ge=1, description="taylor: batches whose loss gradients score the channels.")
    round_to: int | None = Field(
        None,
        ge=1,
        description="Keep every pruned width a multiple of this. Default: 16 before an INT8 "
        "onnxruntime-cpu quantize stage (measured faster than 8 there), else 8.",
    )
    max_layer_ratio: float = Field(
        0.8, gt=0, le=1, description="No layer loses more than this fraction of its channels (global pruning)."
    )
    global_pruning: bool = Field(
        False, description="Rank channels across layers (widths differ per layer) instead of the same ratio per layer."
    )
    prune_stem: bool = Field(False, description="Also prune the stem conv (and the channels coupled to it).")
    steps: int = Field(1, ge=1, description="Iterative schedule: prune in this many steps, fine-tuning in between.")
    remove_blocks: int = Field(
        0,
        ge=0,
        description="Depth pruning first: remove this many residual blocks with an identity shortcut, those whose "
        "removal raises the training loss least. Narrow early stages dominate INT8 time on CPU and channel "
        "rounding cannot shrink them; removing blocks does (benchmarks/prune_round_to.py).",
    )
    block_batches: int = Field(8, ge=1, description="remove_blocks: training batches that score the blocks.")
    block_cost: Literal["activations", "none"] = Field(
        "activations",
        description="remove_blocks: rank blocks by loss increase per element of their input activations "
        "(on CPU, high-resolution narrow blocks cost the most per MAC), or by loss increase alone.",
    )
    block_ranking: Literal["loss", "lesion"] = Field(
        "loss",
        description="remove_blocks: what ranks the blocks (divided by the cost of block_cost): the rise of the "
        "training loss when the block alone is deleted, or the lesion ranking of Veit et al. 2016 (the drop of "
        "top-1 when it alone is deleted, ties broken by the loss). Both are measured on the same block_batches "
        "training batches, never on the held-out split, and the report shows where the removed blocks stand in "
        "the lesion ranking either way.",
    )
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune after each pruning step (null: none; use a distill stage after prune)."
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = [
            n
            for n in ("channel_ratio", "target_macs", "target_params", "target_latency_ms")
            if getattr(self, n) is not None
        ]
        if len(targets) != 1:
            raise ValueError(
                f"give exactly one of channel_ratio, target_macs, target_params, target_latency_ms "
                f"(got {', '.join(targets) or 'none'})"
            )
        return self

    @property
    def objective(self) -> tuple[str, float]:
        """The one pruning target given: (field name, value)."""
        for n in ("channel_ratio", "target_macs", "target_params", "target_latency_ms"):
            if getattr(self, n) is not None:
                return n, getattr(self, n)
        raise AssertionError("validated to have one target")


def _int8_for_ort(recipe) -> bool:
    """Whether the run deploys an INT8 model on a CPU (an enabled quantize stage and a CPU target).

    The width rounding was measured on ONNX Runtime's INT8 kernels; OpenVINO's CPU kernels (oneDNN)
    block channels by 16 on AVX-512 too, so the same default applies to it and to auto."""
    q = recipe.stage("quantize")
    return q is not None and q.enabled and recipe.target in ("onnxruntime-cpu", "openvino-cpu", "auto")


def default_round_to(recipe) -> int:
    """16 before an INT8 ONNX Runtime CPU deployment, else 8.

    Measured (docs/design.md, benchmarks/prune_round_to.py): on this CPU's INT8 kernels a ResNet-56
    pruned to 8-channel multiples ran slower at batch 64 than a bigger one rounded to 16.
    """
    return 16 if _int8_for_ort(recipe) else 8


def latency_precision(cfg: PruneConfig, recipe) -> str:
    if cfg.latency_precision != "auto":
        return cfg.latency_precision
    return "int8" if _int8_for_ort(recipe) else "fp32"


def _resume_plan(path: Path) -> dict | None:
    """The plan of an interrupted run (ratio, removed blocks), unless it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        plan = read_json(path)
        float(plan["ratio"])
        if not isinstance(plan.get("removed_blocks", []), list):
            raise ValueError("removed_blocks is not a list")
        return plan
    except Exception as exc:  # noqa: BLE001 - recompute rather than trust a damaged plan
        log(f"[yellow]  {path.name} is damaged ({exc.__class__.__name__}); planning again[/]")
        return None


def choose_blocks(model, data, shape, cfg: PruneConfig) -> dict:
    """The residual blocks to remove, ranked by ``block_ranking`` on a few training batches.

    Besides the loss increases (``block_scores``) it records the lesion study of every removable block on
    the same batches (``block_lesion``: top-1 drop and loss increase when the block alone is deleted), so the
    report can show where the removed blocks stand in the lesion ranking whichever ranking chose them.
    """
    names = removable_blocks(model, shape)
    if len(names) < cfg.remove_blocks:
        raise UserError(
            f"remove_blocks is {cfg.remove_blocks} but the model has only {len(names)} residual blocks with an "
            "identity shortcut (the only ones that can go)",
            field="stages.prune.remove_blocks",
            fix=f"use at most {len(names)}",
        )
    batches = []
    for x, y in data.train_epoch(64, epoch=10_001, augment=None):
        batches.append((x, y))
        if len(batches) >= cfg.block_batches:
            break
    scores = block_scores(model, list(names), batches)
    lesion = block_lesion(model, names, batches)
    # Loss increase per element of the block's activations: at equal loss, drop the block that moves the
    # most data. On CPU the narrow, high-resolution early blocks dominate INT8 time (ResNet-56 at 28 px:
    # a stage-1 conv takes 2.4x a stage-3 conv with the same MACs), so they are the ones worth removing.
    cost = names if cfg.block_cost == "activations" else dict.fromkeys(names, 1)
    if cfg.block_ranking == "lesion":
        ranking = {n: (lesion["blocks"][n]["top1_drop"] / cost[n], scores[n] / cost[n]) for n in names}
    else:
        ranking = {n: scores[n] / cost[n] for n in names}
    chosen = set(sorted(names, key=ranking.get)[: cfg.remove_blocks])
    return {"removed_blocks": [n for n in names if n in chosen], "block_scores": scores, "block_lesion": lesion}


def block_lesion(model, names: dict[str, int], batches) -> dict:
    """Veit et al. 2016's lesion study of the removable blocks on training batches: top-1 and loss after
    deleting each block alone (the branch zeroed at its add, which for these blocks is removing it)."""
    from deploycraft.diagnostics import lesion_study, lesion_units

    units = [u for u in lesion_units(model, batches[0][0][:2]) if u.name in names]
    study = lesion_study(model, batches, units, show=False)
    blocks = {
        u["name"]: {"top1_drop": u["drop"], "loss_increase": u["loss"] - study["base_loss"]} for u in study["units"]
    }
    # Rank 1 = the block whose deletion costs the least top-1 (then the least loss).
    order = sorted(blocks, key=lambda n: (blocks[n]["top1_drop"], blocks[n]["loss_increase"]))
    for rank, n in enumerate(order, 1):
        blocks[n]["rank"] = rank
    return {"base_top1": study["base_top1"], "images": study["images"], "blocks": blocks}


def lesion_relation(removed: list[str], lesion: dict, scores: dict[str, float]) -> dict:
    """How the removed blocks stand in the lesion ranking: their ranks, the blocks the lesion ranking would have
    removed, and the Spearman correlation of the loss ranking with the lesion ranking over all blocks."""
    blocks = lesion["blocks"]
    n = len(blocks)
    by_lesion = sorted(blocks, key=lambda b: blocks[b]["rank"])
    loss_rank = {b: i for i, b in enumerate(sorted(blocks, key=scores.get), 1)}
    rho = None
    if n > 1:
        d2 = sum((loss_rank[b] - blocks[b]["rank"]) ** 2 for b in blocks)
        rho = 1 - 6 * d2 / (n * (n * n - 1))
    return {
        "removed_lesion_ranks": {b: blocks[b]["rank"] for b in removed},
        "lesion_choice": by_lesion[: len(removed)],
        "overlap": len(set(removed) & set(by_lesion[: len(removed)])),
        "spearman_loss_vs_lesion": rho,
        "removed_top1_drop_sum": sum(blocks[b]["top1_drop"] for b in removed),
    }


@register_stage
class PruneStage(Stage):
    type = "prune"
    Config = PruneConfig
    rank = 1
    report_order = 2
    reads = ("device", "target")
    reads_calibration = True

    @classmethod
    def key_config(cls, config) -> dict:
        """The latency_* settings matter only with a latency target, taylor_batches only to Taylor importance."""
        out = config.model_dump(mode="json")
        if config.target_latency_ms is None:
            for name in ("latency_batch_size", "latency_precision", "latency_threads"):
                out.pop(name)
        if config.importance != "taylor":
            out.pop("taylor_batches")
        return out

    @classmethod
    def derived(cls, recipe, config) -> dict:
        """round_to and latency_precision default by whether an INT8 CPU deployment follows (a later quantize
        stage, enabled, and the target): disabling quantize changes the pruned widths. latency_precision
        joins only where a latency target uses it."""
        derived = {"round_to": config.round_to or default_round_to(recipe)}
        if config.target_latency_ms is not None:
            derived["latency_precision"] = latency_precision(config, recipe)
        return derived

    config: PruneConfig

    @classmethod
    def preflight(cls, pre, index: int) -> None:
        cfg = pre.recipe.stages[index]
        if not cfg.enabled or cfg.remove_blocks == 0:
            return
        most = pre.removable_blocks
        if most is not None and cfg.remove_blocks > most:
            raise UserError(
                f"is {cfg.remove_blocks} but {pre.recipe.model.arch} has only {most} residual blocks with an identity "
                "shortcut (the only ones that can go)",
                field=f"stages.{index}.remove_blocks",
                fix=f"use at most {most}"
                + (" (0: channel pruning only)" if most else ": set 0 (channel pruning only)"),
            )

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        spec = read_spec(ctx.model_dir)
        shape = ctx.input_shape
        model = ctx.load_model()
        settings = PruneSettings(
            importance=cfg.importance,
            round_to=cfg.round_to or default_round_to(ctx.recipe),
            max_layer_ratio=cfg.max_layer_ratio,
            global_pruning=cfg.global_pruning,
            prune_stem=cfg.prune_stem,
        )
        grads = taylor_gradients(data, cfg.taylor_batches) if cfg.importance == "taylor" else None
        before = size_of(model, shape)
        widths_before = conv_widths(model)
        target_name, target_value = cfg.objective
        precision = latency_precision(cfg, ctx.recipe)
        threads = cfg.latency_threads
        calib = None
        if target_name == "target_latency_ms" and precision == "int8":
            calib, _ = data.calibration_images(128)

        # Timed on the target's runtime; auto and tensorrt (not on this machine) are timed on ONNX Runtime.
        probe_target = ctx.recipe.target if ctx.recipe.target == "openvino-cpu" else "onnxruntime-cpu"

        def latency(m) -> float:
            return onnx_latency_ms(
                m, shape, data.spec, precision, cfg.latency_batch_size, threads, calib, workdir, target=probe_target
            )

        plan_path = workdir / "plan.json"
        plan = _resume_plan(plan_path)
        if plan is not None:
            remove_blocks(model, plan.get("removed_blocks", []))
        else:
            plan = {"target": target_name, "value": target_value, "round_to": settings.round_to}
            if target_name == "target_latency_ms":
                plan["latency_before_ms"] = latency(model)
                log(
                    f"  unpruned {precision} latency at batch {cfg.latency_batch_size}: "
                    f"{plan['latency_before_ms']:.3f} ms; target {target_value} ms"
                )
            if cfg.remove_blocks:
                plan.update(choose_blocks(model, data, shape, cfg))
                remove_blocks(model, plan["removed_blocks"])
                log(f"  removed {len(plan['removed_blocks'])} residual blocks: {', '.join(plan['removed_blocks'])}")
            if target_name == "channel_ratio":
                ratio = target_value
            else:

                def fits(r: float) -> bool:
                    candidate = pruned_copy(model, r, settings, shape, grads, ctx.recipe.seed)
                    if target_name == "target_latency_ms":
                        return latency(candidate) <= target_value
                    key = "macs" if target_name == "target_macs" else "params"
                    return size_of(candidate, shape)[key] <= target_value * before[key]

                ratio = search_ratio(fits, hi=settings.max_layer_ratio)
                if ratio is None:
                    raise UserError(
                        f"{target_name}={target_value} cannot be reached with round_to {settings.round_to} and "
                        f"max_layer_ratio {settings.max_layer_ratio}",
                        field=f"stages.prune.{target_name}",
                        fix="relax the target, lower round_to, raise max_layer_ratio or set global_pruning: true",
                    )
            plan["ratio"] = ratio
            write_json(plan_path, plan)
        ratio = plan["ratio"]
        log(
            f"  channel ratio {ratio:.3f} for {target_name}={target_value} (round_to {settings.round_to}, "
            f"importance {cfg.importance}, {cfg.steps} step(s))"
        )

        history = []
        start, previous = 0, 0.0
        for step in range(cfg.steps - 1, -1, -1):  # resume after the last completed step
            done = workdir / f"step{step}"
            if (done / "done.json").is_file():
                try:
                    history = read_json(done / "done.json")["history"]
                    model = load_model(done / "model")
                except Exception as exc:  # noqa: BLE001 - a damaged step is redone, never resumed from
                    log(f"[yellow]  prune step {step + 1} is damaged ({exc.__class__.__name__}); redoing it[/]")
                    continue
                start, previous = step + 1, ratio * (step + 1) / cfg.steps
                log(f"  resuming prune after step {start}/{cfg.steps}")
                break
        top1_after_prune = None
        for step in range(start, cfg.steps):
            cumulative = ratio * (step + 1) / cfg.steps
            prune_once(model, relative_step_ratio(cumulative, previous), settings, shape, grads, ctx.recipe.seed + step)
            previous = cumulative
            record = {"step": step + 1, "ratio": cumulative, **size_of(model, shape)}
            if step == cfg.steps - 1 or cfg.finetune is not None:
                record["top1_after_prune"] = top1(
                    torch_predictor(model), data, 256, f"top-1 after prune step {step + 1}"
                )
                top1_after_prune = record["top1_after_prune"]
            if cfg.finetune is not None and cfg.finetune.epochs > 0:
                step_dir = workdir / f"step{step}"
                step_dir.mkdir(exist_ok=True)
                ft = train_epochs(
                    model,
                    data,
                    cfg.finetune,
                    step_dir,
                    ctx.recipe.seed + 1000 * (step + 1),
                    label=f"fine-tune {step + 1}/{cfg.steps}",
                    device=ctx.device,
                    field="stages.prune.finetune",
                )
                record["top1_after_finetune"] = ft[-1].get("val_top1")
            history.append(record)
            log(
                f"  step {step + 1}/{cfg.steps}: {record['macs'] / 1e6:.2f} M MACs, "
                f"{record['params'] / 1e6:.3f} M params"
                + (f", top-1 {record['top1_after_prune']:.4f} after pruning" if "top1_after_prune" in record else "")
                + (
                    f", {record['top1_after_finetune']:.4f} after fine-tuning"
                    if record.get("top1_after_finetune") is not None
                    else ""
                )
            )
            save_model(model, workdir / f"step{step}" / "model", spec["arch"], spec["kwargs"])
            write_json(workdir / f"step{step}" / "done.json", {"history": history})

        after = size_of(model, shape)
        save_model(model, workdir / "model", spec["arch"], spec["kwargs"])
        # The saved spec + weights must rebuild the same network in a new process: check it here.
        rebuilt = load_model(workdir / "model")
        x = data.sample_input(4)
        with torch.no_grad():
            if not torch.equal(rebuilt(x), model.eval()(x)):
                raise RuntimeError("the pruned model does not rebuild identically from its spec and weights")
        widths_after = conv_widths(model)
        metrics = {
            "target": target_name,
            "target_value": target_value,
            "removed_blocks": plan.get("removed_blocks", []),
            "block_scores": plan.get("block_scores", {}),
            "block_ranking": cfg.block_ranking,
            "ratio": ratio,
            "importance": cfg.importance,
            "round_to": settings.round_to,
            "global_pruning": cfg.global_pruning,
            "steps": cfg.steps,
            "macs_before": before["macs"],
            "params_before": before["params"],
            "macs_after": after["macs"],
            "params_after": after["params"],
            "macs_ratio": after["macs"] / before["macs"],
            "params_ratio": after["params"] / before["params"],
            "widths_changed": {n: [widths_before[n], w] for n, w in widths_after.items() if widths_before.get(n) != w},
            "distinct_widths_after": sorted(set(widths_after.values())),
            "top1_after_prune": top1_after_prune,
            "top1_after_finetune": history[-1].get("top1_after_finetune") if history else None,
            "history": history,
        }
        if plan.get("block_lesion"):
            metrics["block_lesion"] = plan["block_lesion"]
            metrics["lesion_relation"] = lesion_relation(
                metrics["removed_blocks"], plan["block_lesion"], metrics["block_scores"]
            )
        if target_name == "target_latency_ms":
            measured = latency(model)
            metrics.update(
                {
                    "latency_precision": precision,
                    "latency_batch_size": cfg.latency_batch_size,
                    "latency_before_ms": plan.get("latency_before_ms"),
                    "latency_after_ms": measured,
                    "latency_error": (measured - target_value) / target_value,
                }
            )
            log(
                f"  measured {precision} latency {measured:.3f} ms vs target {target_value} ms "
                f"({metrics['latency_error'] * 100:+.1f} %)"
            )
        log(
            f"  MACs {before['macs'] / 1e6:.2f} M -> {after['macs'] / 1e6:.2f} M ({metrics['macs_ratio']:.3f}x), "
            f"params {before['params'] / 1e6:.3f} M -> {after['params'] / 1e6:.3f} M"
        )
        write_json(workdir / "widths.json", json.loads(json.dumps(metrics["widths_changed"])))
        return StageOutput(model="model", metrics=metrics)

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
        """Target, widths, the accuracy trail and predicted vs measured speed-up."""
        from deploycraft.formatting import fmt_pct, pretty

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
                how = (
                    "those whose deletion cost the least top-1 (lesion ranking)"
                    if p.get("block_ranking") == "lesion"
                    else "those whose removal raised the training loss least"
                )
                lines.append(
                    f"Depth: removed {len(p['removed_blocks'])} residual blocks ({', '.join(p['removed_blocks'])}), "
                    f"{how}."
                )
            rel = p.get("lesion_relation")
            if rel:
                les = p["block_lesion"]
                ranks = ", ".join(f"{b} {r}" for b, r in rel["removed_lesion_ranks"].items())
                rho = rel["spearman_loss_vs_lesion"]
                lines += [
                    "",
                    f"Lesion ranking (Veit et al. 2016; each removable block deleted alone, {les['images']} training "
                    f"images, top-1 {les['base_top1'] * 100:.2f} % intact; rank 1 costs the least): the removed "
                    f"blocks rank {ranks} of {len(les['blocks'])}; the lesion ranking's own choice would be "
                    f"{', '.join(rel['lesion_choice'])} ({rel['overlap']} in common). Deleted one at a time, they "
                    f"change top-1 by {-rel['removed_top1_drop_sum'] * 100:+.2f} points in sum."
                    + (f" Spearman correlation of the loss and lesion rankings: {rho:.2f}." if rho is not None else ""),
                ]
            if p.get("latency_after_ms") is not None:
                lines.append(
                    f"Latency target {p['target_value']} ms ({p['latency_precision']}, batch "
                    f"{p['latency_batch_size']}): measured {p['latency_after_ms']:.3f} ms "
                    f"({p['latency_error'] * 100:+.1f} %), unpruned {p['latency_before_ms']:.3f} ms."
                )
            trail = [f"after pruning {fmt_pct(p.get('top1_after_prune'))}"]
            if p.get("top1_after_finetune") is not None:
                trail.append(f"after fine-tuning {fmt_pct(p['top1_after_finetune'])}")
            d = report["stages"].get("distill")
            if d:
                trail.append(f"after distillation {fmt_pct(d['top1_kd'])}")
                if d.get("top1_control") is not None:
                    trail.append(
                        f"plain fine-tuning control {fmt_pct(d['top1_control'])} "
                        f"(KD {d['kd_minus_control'] * 100:+.2f} points)"
                    )
            lines.append("Top-1: " + "; ".join(trail) + ".")
            if report.get("pruning"):
                bss = list(report["pruning"][0]["measured_speedup"])
                lines += [
                    "",
                    "| before → after | predicted (MACs ratio) | "
                    + " | ".join(f"measured batch {b}" for b in bss)
                    + " |",
                    "|---|---|" + "---|" * len(bss),
                ]
                for r in report["pruning"]:
                    lines.append(
                        f"| {pretty(r['before'])} → {pretty(r['after'])} | "
                        f"{r['predicted_speedup']:.2f}× | "
                        + " | ".join(f"{r['measured_speedup'][b]:.2f}×" for b in bss)
                        + " |"
                    )
        return lines
