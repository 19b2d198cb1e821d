"""torch-CUDA latency of ResNet-50 (224 px): eager FP32, channels_last + FP16, and CUDA graphs.

CUDA events around each timed call after warm-up; reports the GPU, driver and clocks. The anchors to
compare with are in docs/design.md (A100 eager FP32 about 6.5-7.4 ms at batch 1).

    python benchmarks/gpu_latency.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

import torch

from deploycraft.models import create_model
from deploycraft.runtime.torch_gpu import capture


def time_ms(fn, x, warmup=20, repeats=100) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(model, x):
    """The model replayed as one CUDA graph (``torch_gpu.capture``); its output is not copied per call."""
    graph, static, out = capture(model, x)

    def run(inp):
        static.copy_(inp)
        graph.replay()
        return out

    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    info = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    results = {"gpu": info, "torch": torch.__version__, "ms": {}}
    fp32 = create_model("resnet50", num_classes=1000).cuda().eval()
    half = create_model("resnet50", num_classes=1000).cuda().eval().half().to(memory_format=torch.channels_last)
    for bs in (1, 64, 256):
        x = torch.randn(bs, 3, 224, 224, device="cuda")
        xh = x.half().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            row = {
                "eager fp32": time_ms(fp32, x),
                "eager fp16 channels_last": time_ms(half, xh),
            }
        row["cuda graph fp16 channels_last"] = time_ms(graphed(half, xh), xh)
        results["ms"][str(bs)] = row
        print(
            f"batch {bs}: " + ", ".join(f"{k} {v:.3f} ms ({bs * 1000 / v:.0f} img/s)" for k, v in row.items()),
            flush=True,
        )
    print(info)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
