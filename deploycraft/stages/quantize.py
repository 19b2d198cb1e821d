"""Quantize stage (PTQ): calibrate the Q/DQ simulation in torch, write the QDQ ONNX for the target.

The torch simulation and the deployed file are the same arithmetic: quantizers are placed for the
target (see quant/placement.py), calibrated on images outside the held-out split, and exported as
QuantizeLinear/DequantizeLinear. The stage then checks the file: Q/DQ pairs present, no
BatchNormalization, the activation integer type the target needs, and for ONNX Runtime how many
convs its optimizer actually turned into QLinearConv.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deploycraft.artifacts import write_json
from deploycraft.data.transforms import prepare_batch
from deploycraft.models.io import read_spec
from deploycraft.onnx_io import export_onnx, op_counts, quant_dtypes, relative_error
from deploycraft.progress import bar, log
from deploycraft.quant.placement import act_quantizers, insert_quantizers
from deploycraft.recipe import QuantizeConfig
from deploycraft.runtime.ort import OrtRunner, optimized_op_counts
from deploycraft.stages.base import Stage, StageOutput, register_stage


def calibrate(qmodel: torch.nn.Module, images: torch.Tensor, spec, cfg: QuantizeConfig) -> dict[str, list[float]]:
    quantizers = act_quantizers(qmodel)
    for _, q in quantizers:
        q.start_calibration()
    qmodel.eval()
    steps = -(-len(images) // cfg.batch_size)
    with torch.no_grad(), bar("calibrate", steps) as b:
        for i in range(0, len(images), cfg.batch_size):
            qmodel(prepare_batch(images[i : i + cfg.batch_size], spec))
            b.advance()
    return {name: list(q.finish_calibration(cfg.calibrator, cfg.percentile)) for name, q in quantizers}


def build_quantized(float_model: torch.nn.Module, cfg: QuantizeConfig) -> torch.nn.Module:
    return insert_quantizers(float_model, cfg.target, cfg.per_channel, cfg.reduce_range)


def load_quantized(float_model: torch.nn.Module, cfg: QuantizeConfig, state_path: Path) -> torch.nn.Module:
    """Rebuild the calibrated simulation: same placement, then the saved scales and weights."""
    qmodel = build_quantized(float_model, cfg)
    qmodel.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    for _, q in act_quantizers(qmodel):
        q.mode = "quantize"
    return qmodel.eval()


@register_stage
class QuantizeStage(Stage):
    type = "quantize"
    config: QuantizeConfig

    def run(self, ctx, workdir: Path) -> StageOutput:
        cfg = self.config
        data = ctx.data
        model = ctx.load_model()
        qmodel = build_quantized(model, cfg)
        images, provenance = data.calibration_images(cfg.num_calibration)
        log(
            f"  calibrating {len(act_quantizers(qmodel))} activation quantizers ({cfg.calibrator}) on "
            f"{len(images)} images: {provenance}"
        )
        ranges = calibrate(qmodel, images, data.spec, cfg)
        torch.save(qmodel.state_dict(), workdir / "quant_state.pt")

        spec = read_spec(ctx.model_dir)
        path = workdir / "model_int8.onnx"
        sample = data.sample_input(2)
        metadata = {
            "deploycraft.arch": spec["arch"],
            "deploycraft.precision": "int8",
            "deploycraft.target": cfg.target,
            "deploycraft.input": data.spec.to_dict(),
            "deploycraft.classes": data.class_names,
        }
        proto = export_onnx(qmodel, sample, path, cfg.opset, dynamic_batch=True, metadata=metadata)
        ops = op_counts(proto)
        dtypes = quant_dtypes(proto)
        if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
            raise RuntimeError(f"{path.name} has no QuantizeLinear/DequantizeLinear pairs: {ops}")
        if ops.get("BatchNormalization"):
            raise RuntimeError(f"{path.name} still has {ops['BatchNormalization']} BatchNormalization nodes")
        expected = "uint8" if cfg.target == "onnxruntime-cpu" else "int8"
        if set(dtypes) - {expected}:
            raise RuntimeError(
                f"{path.name}: activation zero points are {dtypes}, the {cfg.target} target needs {expected}"
            )

        # The deployed file computes what the simulation computes (up to rounding of requantization).
        check = data.sample_input(64)
        with torch.no_grad():
            sim = qmodel(check).numpy()
        ort_out = OrtRunner(path, threads=None)(check.numpy())
        metrics = {
            "target": cfg.target,
            "method": cfg.method,
            "calibrator": cfg.calibrator,
            "percentile": cfg.percentile if cfg.calibrator == "percentile" else None,
            "calibration": provenance,
            "calibration_images": len(images),
            "activation_quantizers": len(ranges),
            "weight_quantizers": sum(1 for m in qmodel.modules() if hasattr(m, "weight_scale")),
            "onnx_ops": ops,
            "activation_dtype": expected,
            "bytes": path.stat().st_size,
            "sim_vs_onnx_rel_error": relative_error(ort_out, sim),
            "sim_vs_onnx_top1_agreement": float((ort_out.argmax(1) == sim.argmax(1)).mean()),
        }
        if cfg.target == "onnxruntime-cpu":
            opt = optimized_op_counts(path, workdir)
            convs = (
                opt.get("QLinearConv", 0) + opt.get("Conv", 0) + opt.get("FusedConv", 0) + opt.get("NhwcFusedConv", 0)
            )
            metrics["ort_optimized_ops"] = opt
            metrics["int8_conv_fraction"] = opt.get("QLinearConv", 0) / convs if convs else None
            log(
                f"  ONNX Runtime runs {opt.get('QLinearConv', 0)}/{convs} convs and "
                f"{opt.get('QLinearAdd', 0)} residual adds in INT8"
            )
        write_json(workdir / "quant.json", {"config": cfg.model_dump(mode="json"), "ranges": ranges})
        log(f"  sim vs ONNX: top-1 agreement {metrics['sim_vs_onnx_top1_agreement']:.3f} on 64 images")
        return StageOutput(
            artifacts={
                "int8_onnx": {
                    "path": path.name,
                    "format": "onnx",
                    "precision": "int8",
                    "backend": "onnxruntime",
                    "target": cfg.target,
                }
            },
            metrics=metrics,
        )
