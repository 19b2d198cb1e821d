"""GPU deployables of a trained ResNet on the held-out split: the AOTInductor FP16 package against FP32 torch.

From a torchvision-format checkpoint (a plain state dict, e.g. a run's ``deploy/torch/weights.pt``):
builds the AOTInductor package (``deployables.build_aoti_package``: BN folded, channels_last, dynamic batch),
measures top-1 and top-1 agreement with FP32 on the whole held-out split (the FP32 reference with TF32 off:
true FP32), then times, interleaved and with CUDA events, FP32 eager (cuDNN's default TF32 convolutions),
FP16 eager replayed as a CUDA graph, and the package (which a CUDA graph cannot capture: runtime/aoti.py).

    python benchmarks/gpu_deployables.py --weights W.pt [--image-size 224] [--json out.json]
    python benchmarks/gpu_deployables.py --weights W.pt --build-only     (compile; time it later, alone)

Issue 11's bar for ResNet-50 at 224 px on the H200: batch-1 p50 <= 0.9 ms, >= 20k img/s at batch 256,
agreement >= 99.5 %. ``--device cpu --precision fp32`` runs the same steps on the CPU (small models).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path

import torch

from deploycraft.data import DataModule
from deploycraft.deployables import build_aoti_package
from deploycraft.evaluate import top1, torch_predictor
from deploycraft.models.io import load_checkpoint
from deploycraft.models.registry import create_model
from deploycraft.recipe import DataConfig
from deploycraft.runtime.aoti import AotiRunner
from deploycraft.runtime.bench import measure
from deploycraft.runtime.torch_rt import TorchRunner

BARS = {"batch1_p50_ms": 0.9, "images_per_s_large": 20_000, "agreement": 0.995}


def gpu_info() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "no nvidia-smi"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="torchvision-format state dict")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--val-subset", type=int, default=None, help="held-out images (default: all)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--package", type=Path, default=Path("/tmp/deploycraft_gpu/model.pt2"))
    ap.add_argument("--build-only", action="store_true", help="compile the package and stop")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    data = DataModule(
        DataConfig(
            dataset="fashion-mnist", image_size=args.image_size, channels=args.channels, val_subset=args.val_subset
        )
    )
    model = create_model(args.arch, num_classes=args.num_classes, in_chans=args.channels)
    load_checkpoint(model, args.weights)
    model.eval()
    out: dict = {"gpu": gpu_info() if cuda else None, "torch": torch.__version__, "cuda": torch.version.cuda}
    out.update(arch=args.arch, image_size=args.image_size, precision=args.precision, held_out=data.num_val)

    try:
        return run(args, model, data, out, cuda)
    finally:  # what was measured before a failure (a loader that crashes ends the process before this)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))


def run(args, model, data, out: dict, cuda: bool) -> int:
    if args.build_only or not args.package.is_file():
        built = build_aoti_package(
            copy.deepcopy(model),
            args.package,
            data.sample_input(2),
            precision=args.precision,
            device=args.device,
            max_batch=max(args.batch_sizes + [256]),
            channels_last=cuda,
        )
        out["compile_s"] = round(built.compile_seconds, 1)
        print(f"compiled {args.package} in {built.compile_seconds:.0f} s", flush=True)
        if args.build_only:
            return 0

    # Accuracy: FP32 with TF32 off is the reference; the package and FP16 eager against it, image for image.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref_model = copy.deepcopy(model).to(args.device)
    preds: dict[str, list[torch.Tensor]] = {"fp32": [], "package": []}
    acc = {
        "fp32": top1(
            torch_predictor(ref_model, args.device),
            data,
            256,
            "FP32",
            predictions=preds["fp32"],
            device=args.device if cuda else None,
        )
    }
    package = AotiRunner(args.package)
    acc["package"] = top1(
        package, data, 256, "package", predictions=preds["package"], device=args.device if cuda else None
    )
    ref = torch.cat(preds["fp32"])
    out["top1"] = acc
    out["agreement"] = {"package": float((torch.cat(preds["package"]) == ref).float().mean())}
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default for FP32 convolutions: the fastest FP32 is timed

    runners: dict = {"fp32 eager": TorchRunner(ref_model, args.device), "package": package}
    if cuda:
        from deploycraft.runtime.torch_gpu import CudaRunner

        runners[f"{args.precision} eager, CUDA graph"] = CudaRunner(copy.deepcopy(model), args.precision)
    sample = data.sample_input(1)
    start = time.perf_counter()
    res = measure(
        runners,
        lambda bs: sample.expand(bs, -1, -1, -1).contiguous(),
        args.batch_sizes,
        warmup=20,
        repeats=args.repeats,
        rounds=10,
        show=False,
    )
    out["timing_s"] = round(time.perf_counter() - start, 1)
    out["latency_ms"] = {n: {str(bs): res[n][bs].p50 for bs in args.batch_sizes} for n in runners}
    large = 256 if 256 in args.batch_sizes else max(args.batch_sizes)  # the bar is set at batch 256
    print(f"{out['gpu']}, torch {torch.__version__}, CUDA {torch.version.cuda}; {args.arch} at {args.image_size} px")
    print(
        f"held-out top-1: FP32 {acc['fp32']:.4f}, package {acc['package']:.4f}; "
        f"agreement {out['agreement']['package']:.4%} over {data.num_val} images"
    )
    for name in runners:
        row = out["latency_ms"][name]
        print(
            f"{name:<28}"
            + "".join(
                f"  batch {bs}: {row[str(bs)]:8.3f} ms ({bs * 1000 / row[str(bs)]:8.0f} img/s)"
                for bs in args.batch_sizes
            )
        )
    if cuda and 1 in args.batch_sizes:
        b1 = out["latency_ms"]["package"]["1"]
        ips = large * 1000 / out["latency_ms"]["package"][str(large)]
        out["bars"] = {
            "batch1_p50_ms": [b1, b1 <= BARS["batch1_p50_ms"]],
            "images_per_s_large": [ips, ips >= BARS["images_per_s_large"]],
            "agreement": [out["agreement"]["package"], out["agreement"]["package"] >= BARS["agreement"]],
        }
        print("bars (value, met):", json.dumps(out["bars"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
