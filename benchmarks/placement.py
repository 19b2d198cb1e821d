"""The same model quantized for two targets, both timed on ONNX Runtime CPU.

onnxruntime-cpu placement (U8 activations, Q/DQ around conv outputs and residual adds) lets ONNX
Runtime run QLinearConv/QLinearAdd; the tensorrt placement (S8 symmetric, Q/DQ on conv inputs and the
skip input only) leaves ONNX Runtime with float convs between Q/DQ pairs. Prints latency and the
op types ONNX Runtime actually runs.

    .venv/bin/python benchmarks/placement.py [--arch resnet50] [--size 32] [--repeats 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from deploycraft.data.transforms import InputSpec
from deploycraft.deployables import PROBE_SETTINGS, build_deployable
from deploycraft.models import create_model
from deploycraft.runtime.bench import measure, physical_cores
from deploycraft.runtime.ort import OrtRunner, optimized_op_counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = create_model(args.arch, num_classes=10).eval()
    spec = InputSpec(args.size, 3, (0.5,) * 3, (0.25,) * 3)
    calib = torch.randint(0, 256, (64, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    threads = physical_cores()
    runners, ops = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision, target in (
            ("fp32", "fp32", None),
            ("int8 onnxruntime-cpu placement", "int8", "onnxruntime-cpu"),
            ("int8 tensorrt placement", "int8", "tensorrt"),
        ):
            path = Path(tmp) / f"{len(runners)}.onnx"
            build_deployable(
                model,
                precision,
                path,
                torch.randn(2, *shape),
                target=target or "onnxruntime-cpu",
                settings=PROBE_SETTINGS,
                calibration=(calib, spec),
            )
            runners[name] = OrtRunner(path, threads)
            ops[name] = optimized_op_counts(path, Path(tmp))
        x = torch.randn(64, *shape)
        res = measure(runners, lambda bs: x[:bs], [1, 64], warmup=10, repeats=args.repeats)
    print(f"{args.arch} at {args.size} px on ONNX Runtime CPU, {threads} threads, p50 ms")
    for name, r in res.items():
        interesting = {k: v for k, v in ops[name].items() if "Conv" in k or "Add" in k}
        print(f"{name:<34} batch 1 {r[1].p50:8.3f}   batch 64 {r[64].p50:8.2f}   {interesting}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
