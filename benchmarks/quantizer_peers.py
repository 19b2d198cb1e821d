"""Our INT8 QDQ model against ONNX Runtime's own static quantizer, on the same FP32 ONNX.

Takes a finished run folder (with deploy/model_fp32.onnx and deploy/model_int8.onnx), quantizes the
FP32 file with ONNX Runtime's own tooling (`quant_pre_process`, then `quantize_static` with the MinMax
and the percentile calibrator: QDQ format, per-channel S8 weights, U8 activations, the same 512
calibration images), then measures top-1 on the Fashion-MNIST test split and latency at batch 1 and
64, interleaved in one process.

    .venv/bin/python benchmarks/quantizer_peers.py RUN_DIR [--images 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from deploycraft.artifacts import read_json
from deploycraft.config import DataConfig
from deploycraft.data import DataModule
from deploycraft.evaluate import top1
from deploycraft.runtime.bench import measure, physical_cores
from deploycraft.runtime.ort import OrtRunner


class _Reader:
    def __init__(self, batches: list[np.ndarray], name: str):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def main() -> int:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    recipe = read_json(args.run_dir / "report.json")
    spec = recipe["input"]
    data = DataModule(
        DataConfig(
            dataset="fashion-mnist",
            image_size=spec["image_size"],
            channels=spec["channels"],
            val_subset=args.images if args.images < 10_000 else None,
        ),
        seed=0,
    )
    ours_fp32 = args.run_dir / "deploy" / "model_fp32.onnx"
    ours_int8 = args.run_dir / "deploy" / "model_int8.onnx"
    threads = physical_cores()
    with tempfile.TemporaryDirectory() as tmp:
        images, _ = data.calibration_images(512)
        from deploycraft.data.transforms import prepare_batch

        batches = [prepare_batch(images[i : i + 64], data.spec).numpy() for i in range(0, len(images), 64)]
        runners = {
            "fp32 (deploycraft export)": OrtRunner(ours_fp32, threads),
            "int8 deploycraft": OrtRunner(ours_int8, threads),
        }
        # ONNX Runtime's documented flow: quant_pre_process (shape inference and graph optimization),
        # then quantize_static with its default calibrator (MinMax) and with the percentile calibrator
        # at our default percentile; same format, types, per-channel weights and calibration images.
        pre = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(ours_fp32), str(pre))
        for label, method, extra in (
            ("MinMax", CalibrationMethod.MinMax, {}),
            ("Percentile 99.99", CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
        ):
            peer = Path(tmp) / f"ort_quantizer_{method.name}.onnx"
            quantize_static(
                str(pre),
                str(peer),
                _Reader(batches, "input"),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options=extra,
            )
            runners[f"int8 ORT quantize_static {label}"] = OrtRunner(peer, threads)
        acc = {n: top1(lambda x, r=r: r(r.prepare(x)), data, 256, n) for n, r in runners.items()}
        x = torch.from_numpy(np.concatenate(batches))[:64]
        lat = measure(runners, lambda bs: x[:bs], [1, 64], warmup=10, repeats=args.repeats)
        sizes = {n: r.path.stat().st_size for n, r in runners.items()}
    print(f"{args.run_dir}: ONNX Runtime CPU, {threads} threads, top-1 on {data.num_val} test images")
    print(f"{'model':<44}{'top-1':>8}{'p50 bs1 ms':>12}{'p50 bs64 ms':>13}{'MB':>7}")
    out = {}
    for n in runners:
        print(f"{n:<44}{acc[n] * 100:>7.2f}%{lat[n][1].p50:>12.3f}{lat[n][64].p50:>13.2f}{sizes[n] / 1e6:>7.2f}")
        out[n] = {"top1": acc[n], "p50_ms": {"1": lat[n][1].p50, "64": lat[n][64].p50}, "bytes": sizes[n]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
