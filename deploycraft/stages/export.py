"""Export stage: FP32 ONNX with BatchNorm folded into the convs, checked against the torch model, and the
deployables the recipe asks for beside it (``format``): an FP16 ONNX, AOTInductor packages, TensorRT
engines. Each is built by its one builder (deployables.py) and checked against FP32 before it is listed;
a TensorRT engine that cannot be built on this machine is reported as "not built here", not as a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from deploycraft.config import StageConfig
from deploycraft.deployables import build_aoti_package, build_deployable, build_fp16_onnx, onnx_metadata
from deploycraft.errors import UserError
from deploycraft.models.io import read_spec
from deploycraft.names import AOTI_NAME, ARTIFACT_FILE, TRT_NAME, ModelName
from deploycraft.onnx_io import relative_error
from deploycraft.progress import log
from deploycraft.runtime.ort import OrtRunner
from deploycraft.stages.base import Stage, StageOutput, register_stage

ExportFormat = Literal["onnx", "onnx-fp16", "aoti", "tensorrt"]


class ExportConfig(StageConfig):
    """FP32 ONNX with BatchNorm folded into the convs, checked against torch; optionally an FP16 ONNX,
    AOTInductor packages and TensorRT engines."""

    type: Literal["export"] = "export"
    format: ExportFormat | Annotated[list[ExportFormat], Field(min_length=1)] = Field(
        "onnx",
        description="What to write: onnx (FP32 ONNX, always written: the others derive from it), onnx-fp16 "
        "(weights and activations in FP16, FP32 in/out), aoti (AOTInductor .pt2 packages: torch.export + "
        "Inductor, compiled ahead of time; minutes of C++ compilation on a small CPU), tensorrt (engines: "
        "INT8 from the tensorrt target's QDQ file, FP16 from the FP16 ONNX; needs TensorRT and a GPU, "
        "else reported as not built here). One name or a list.",
    )
    aoti_precisions: list[Literal["fp32", "fp16", "bf16"]] = Field(
        ["fp32"], min_length=1, description="aoti: one package per precision (fp16/bf16 compute inside, FP32 in/out)."
    )
    aoti_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="aoti: the device the packages are compiled for; auto: the recipe's device."
    )
    max_batch: int | None = Field(
        None,
        ge=1,
        description="aoti and tensorrt: the largest batch the package or engine accepts; default: the larger "
        "of verify's largest batch size and its eval_batch_size.",
    )
    min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="onnx-fp16, aoti fp16/bf16: smallest top-1 agreement with the FP32 model on a check "
        "batch of 256 images (verify measures it on the whole held-out split).",
    )
    opset: int = Field(17, ge=13, le=21, description="ONNX opset.")
    dynamic_batch: bool = Field(
        True,
        description="The batch dimension stays dynamic; only true is accepted: every file is checked at several "
        "batch sizes on its way (the export check, quantize's agreement, verify's batch_sizes), so a fixed batch "
        "could not pass. Fix the batch when you convert the shipped file for a runtime that needs one.",
    )

    @field_validator("dynamic_batch")
    @classmethod
    def _dynamic(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "a fixed batch cannot pass through the chain (every file is checked at several batch sizes); "
                "leave dynamic_batch at true and fix the batch when converting the shipped file for a runtime "
                "that needs one"
            )
        return value

    rtol: float = Field(1e-4, gt=0, description="Largest allowed max|onnx - torch| / max|torch| on a check batch.")

    @property
    def formats(self) -> list[str]:
        return ["onnx"] + [f for f in ([self.format] if isinstance(self.format, str) else self.format) if f != "onnx"]


def max_batch(recipe, cfg: ExportConfig) -> int:
    """The largest batch the AOTInductor package and TensorRT profile serve: max_batch, else the verify
    stage's largest (timed batch or evaluation batch), else 256."""
    if cfg.max_batch is not None:
        return cfg.max_batch
    v = recipe.stage("verify")
    return max(max(v.batch_sizes), v.eval_batch_size) if v is not None and v.enabled else 256


def trt_batch_sizes(recipe) -> list[int]:
    """The batch sizes of the TensorRT profile: the verify stage's, each once, in order (their order in the
    recipe changes no engine)."""
    v = recipe.stage("verify")
    return sorted(set(v.batch_sizes)) if v is not None else [1]


class ExportCheckError(RuntimeError):
    """The exported file does not meet its contract (outputs differ from torch)."""


@register_stage
class ExportStage(Stage):
    type = "export"
    Config = ExportConfig
    rank = 3
    report_order = 5
    reads = ("device", "target")
    config: ExportConfig

    @classmethod
    def derived(cls, recipe, config) -> dict:
        """AOTInductor packages and TensorRT engines are built for the verify stage's batch sizes (the
        largest, unless max_batch is set; TensorRT's profile also takes each size): they join the key."""
        if config is None or not {"aoti", "tensorrt"} & set(config.formats):
            return {}
        out: dict[str, Any] = {"max_batch": max_batch(recipe, config)}
        if "tensorrt" in config.formats:
            out["trt_batch_sizes"] = trt_batch_sizes(recipe)
        return out

    @classmethod
    def check(cls, recipe, index: int) -> None:
        cfg = recipe.stages[index]
        if not cfg.enabled or "tensorrt" not in cfg.formats or recipe.target != "tensorrt":
            return
        quantize = [i for i, s in enumerate(recipe.stages) if s.type == "quantize" and s.enabled]
        if quantize and quantize[0] > index:
            raise UserError(
                "the TensorRT INT8 engine is built from the quantize stage's QDQ file, and quantize comes after export",
                field=f"stages.{index}.format",
                fix="put the quantize stage before the export stage",
            )

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        model = ctx.load_model()
        spec = read_spec(ctx.model_dir)
        path = workdir / "model_fp32.onnx"
        built = build_deployable(
            model,
            "fp32",
            path,
            data.sample_input(2),
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            metadata=onnx_metadata(spec["arch"], "fp32", None, data.spec, data.class_names),
        )
        ops = built.ops
        check = data.sample_input(32)
        with torch.inference_mode():
            expected = model(check).numpy()
        actual = OrtRunner(path)(check.numpy())
        rel = relative_error(actual, expected)
        if rel > cfg.rtol:
            raise ExportCheckError(
                f"ONNX Runtime output differs from torch by {rel:.2e} (relative), above rtol {cfg.rtol}"
            )
        log(f"  {path.name}: {sum(ops.values())} nodes, 0 BatchNormalization, ONNX vs torch rel. error {rel:.1e}")
        artifacts: dict[str, dict[str, Any]] = {
            ModelName.FP32_ONNX.value: {
                "path": path.name,
                "format": "onnx",
                "precision": "fp32",
                "backend": "onnxruntime",
            }
        }
        extra: dict[str, Any] = {}
        formats = cfg.formats
        check = data.sample_input(256)
        with torch.inference_mode():
            reference = model(check).numpy()
        if "onnx-fp16" in formats or "tensorrt" in formats:
            extra["onnx_fp16"] = self._fp16(path, workdir, check.numpy(), reference, artifacts)
        if "aoti" in formats:
            extra["aoti"] = self._aoti(ctx, model, workdir, check, reference, artifacts)
        if "tensorrt" in formats:
            extra["tensorrt"] = self._tensorrt(ctx, workdir, artifacts)
        return StageOutput(
            artifacts=artifacts,
            metrics={
                **extra,
                "formats": formats,
                "onnx_ops": ops,
                "rel_error_vs_torch": rel,
                "rtol": cfg.rtol,
                "opset": cfg.opset,
                "dynamic_batch": cfg.dynamic_batch,
                "bytes": path.stat().st_size,
                "batchnorm_nodes": ops.get("BatchNormalization", 0),
            },
        )

    def _agreement(self, name: str, out: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        agreement = float((out.argmax(1) == reference.argmax(1)).mean())
        rel = relative_error(out, reference)
        if agreement < self.config.min_agreement:
            raise ExportCheckError(
                f"{name} agrees with the FP32 model on {agreement:.3f} of {len(out)} check images, below "
                f"min_agreement {self.config.min_agreement}"
            )
        return {"top1_agreement_vs_fp32": agreement, "rel_error_vs_fp32": rel, "check_images": len(out)}

    def _fp16(self, fp32: Path, workdir: Path, check: np.ndarray, reference: np.ndarray, artifacts: dict) -> dict:
        name = ModelName.FP16_ONNX
        built = build_fp16_onnx(fp32, workdir / ARTIFACT_FILE[name])
        metrics = self._agreement(built.path.name, OrtRunner(built.path)(check), reference)
        # ONNX Runtime's CPU provider has FP16 kernels for few ops: it runs the rest in FP32 behind Casts it
        # inserts. The check measures FP16 weights and activations at the casts, not FP16 arithmetic.
        from deploycraft.runtime.ort import optimized_op_counts

        metrics.update(
            fp16_initializers=built.fp16_initializers,
            fp32_nodes=built.fp32_nodes,
            onnx_ops=built.ops,
            onnxruntime_cpu_ops=optimized_op_counts(built.path, workdir),
            bytes=built.path.stat().st_size,
        )
        log(
            f"  {built.path.name}: {built.fp16_initializers} FP16 weights, {len(built.fp32_nodes)} nodes kept in FP32; "
            f"top-1 agreement with FP32 {metrics['top1_agreement_vs_fp32']:.4f} on {len(check)} images (ONNX Runtime)"
        )
        artifacts[name.value] = {
            "path": built.path.name,
            "format": "onnx",
            "precision": "fp16",
            "backend": "onnxruntime",
        }
        return metrics

    def _max_batch(self, ctx) -> int:
        return max_batch(ctx.recipe, self.config)

    def _aoti(self, ctx, model, workdir: Path, check: torch.Tensor, reference: np.ndarray, artifacts: dict) -> dict:
        from deploycraft.runtime.aoti import AotiRunner

        cfg = self.config
        device = ctx.device if cfg.aoti_device == "auto" else cfg.aoti_device
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "aoti_device is cuda but torch sees no GPU",
                field="stages.export.aoti_device",
                fix="set aoti_device: cpu (or auto), or run on a GPU machine",
            )
        out: dict[str, Any] = {}
        spec = read_spec(ctx.model_dir)
        for precision in cfg.aoti_precisions:
            name = AOTI_NAME[precision]
            log(f"  {ARTIFACT_FILE[name]}: compiling with AOTInductor for {device} ({precision}) ...")
            built = build_aoti_package(
                model,
                workdir / ARTIFACT_FILE[name],
                ctx.data.sample_input(2),
                precision=precision,
                device=device,
                max_batch=self._max_batch(ctx),
                channels_last=device == "cuda",
                metadata=onnx_metadata(spec["arch"], precision, None, ctx.data.spec, ctx.data.class_names),
            )
            try:
                runner = AotiRunner(built.path)
            except UserError as exc:  # the package compiled but this torch cannot load it: not shipped
                built.path.unlink(missing_ok=True)
                out[precision] = {"device": device, "status": "not loadable here", "reason": exc.message}
                log(f"  [yellow]{built.path.name}: not shipped ({exc.message}); the other deployables go on[/]")
                continue
            got = np.concatenate(
                [
                    runner(runner.prepare(check[i : i + built.max_batch])).float().cpu().numpy()
                    for i in range(0, len(check), built.max_batch)
                ]
            )
            if precision == "fp32":
                rel = relative_error(got, reference)
                if rel > cfg.rtol:
                    raise ExportCheckError(
                        f"{built.path.name} differs from torch by {rel:.2e} (relative), above rtol {cfg.rtol}"
                    )
            m = self._agreement(built.path.name, got, reference)
            m.update(
                device=device,
                max_batch=built.max_batch,
                compile_seconds=round(built.compile_seconds, 1),
                bytes=built.path.stat().st_size,
            )
            out[precision] = m
            log(
                f"  {built.path.name}: compiled in {built.compile_seconds:.0f} s; vs torch rel. error "
                f"{m['rel_error_vs_fp32']:.1e}, top-1 agreement {m['top1_agreement_vs_fp32']:.4f}"
            )
            artifacts[name.value] = {
                "path": built.path.name,
                "format": "aoti",
                "precision": precision,
                "backend": "torch-aoti" + ("-cuda" if device == "cuda" else ""),
            }
        return out

    def _tensorrt(self, ctx, workdir: Path, artifacts: dict) -> dict:
        """INT8 and FP16 engines where TensorRT and a GPU exist; elsewhere the reason, for the report."""
        from deploycraft.runtime import tensorrt as trt_rt

        sources = {"fp16": workdir / ARTIFACT_FILE[ModelName.FP16_ONNX]}
        int8 = ctx.artifacts.get(ModelName.INT8_ONNX.value)
        if int8 is not None and int8.target == "tensorrt":
            sources["int8"] = ctx.artifact_path(ModelName.INT8_ONNX.value)
        planned = {p: str(TRT_NAME[p]) for p in sources}
        why = trt_rt.missing_reason()
        if why is not None:
            log(f"  [yellow]TensorRT engines {sorted(planned.values())}: not built here ({why})[/]")
            return {"status": "not built here", "reason": why, "planned": planned}
        trt = trt_rt.import_tensorrt()
        batch_sizes = trt_batch_sizes(ctx.recipe)
        engines = {}
        for precision, source in sources.items():
            name = TRT_NAME[precision]
            built = trt_rt.build_engine(
                source,
                workdir / ARTIFACT_FILE[name],
                precision=precision,
                batch_sizes=batch_sizes,
                max_batch=self._max_batch(ctx),
                timing_cache=workdir / "tensorrt.timing-cache",
                trt=trt,
            )
            if not built.fusion["passed"]:
                raise ExportCheckError(f"{built.path.name}: the residual blocks did not fuse as placed: {built.fusion}")
            engines[precision] = {**built.manifest, "build_seconds": round(built.build_seconds, 1)}
            artifacts[name.value] = {
                "path": built.path.name,
                "format": "tensorrt",
                "precision": precision,
                "backend": "tensorrt",
                "companions": [p.name for p in built.files],
            }
        return {"status": "built", "engines": engines}

    @staticmethod
    def report_section(report: dict[str, Any]) -> list[str]:
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
            f16 = e.get("onnx_fp16")
            if f16:
                lines.append(
                    f"FP16 ONNX: {f16['fp16_initializers']} FP16 weights, {len(f16['fp32_nodes'])} nodes kept in FP32; "
                    f"top-1 agreement with FP32 {f16['top1_agreement_vs_fp32'] * 100:.2f} % on {f16['check_images']} "
                    "check images on ONNX Runtime CPU (which runs most FP16 ops in FP32 behind casts)."
                )
            for precision, a in (e.get("aoti") or {}).items():
                if a.get("status") == "not loadable here":
                    lines.append(f"AOTInductor {precision} package for {a['device']}: not shipped — {a['reason']}.")
                    continue
                lines.append(
                    f"AOTInductor {precision} package for {a['device']} (batch 1–{a['max_batch']}): compiled in "
                    f"{a['compile_seconds']:.0f} s; vs FP32 torch: relative error {a['rel_error_vs_fp32']:.1e}, top-1 "
                    f"agreement {a['top1_agreement_vs_fp32'] * 100:.2f} % on {a['check_images']} check images."
                )
            t = e.get("tensorrt")
            if t and t.get("status") != "built":
                lines.append(
                    f"TensorRT engines ({', '.join(sorted(t['planned'].values()))}): not built here — {t['reason']}."
                )
            elif t:
                for precision, m in t["engines"].items():
                    f = m["fusion"]
                    int8 = f", {f['int8_fused']} in INT8" if f.get("int8_fused") is not None else ""
                    lines.append(
                        f"TensorRT {precision} engine (TensorRT {m['tensorrt']}, {m['gpu']}, compute capability "
                        f"{m['compute_capability']}): {f['fused']} of {f['blocks']} residual blocks fused "
                        f"as conv + add + ReLU{int8}."
                    )
        return lines
