"""Which pruned ResNet-56 is fastest on ONNX Runtime CPU, FP32 and INT8, at the same MACs budget?

Prunes CIFAR ResNet-56 (28 px, 1 channel) to one MACs budget with widths rounded to 8 or 16, the same
ratio per layer or ranked globally, with or without the stem, and with 3-5 stage-1 blocks removed
first; exports each BN-folded FP32 and INT8 QDQ (ONNX Runtime placement) and times them interleaved
in one process at batch 1 and 64. Decisions it backs: the prune stage's default round_to before an
INT8 ONNX Runtime target, and depth pruning (remove_blocks) in the ResNet-56 recipe.

    .venv/bin/python benchmarks/prune_round_to.py [--budget 0.5] [--repeats 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from deploycraft.data.transforms import InputSpec
from deploycraft.deployables import PROBE_SETTINGS, build_deployable
from deploycraft.models import create_model
from deploycraft.pruning import PruneSettings, pruned_copy, remove_blocks, search_ratio, size_of
from deploycraft.runtime.bench import measure, physical_cores
from deploycraft.runtime.ort import OrtRunner

SHAPE = (1, 28, 28)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.5, help="MACs fraction to keep")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10, in_chans=1).eval()
    base = size_of(model, SHAPE)["macs"]
    spec = InputSpec(28, 1, (0.286,), (0.353,))
    calib = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    candidates = {"unpruned": model}
    for rt in (8, 16):
        for ranking in ("uniform", "global"):
            for stem in (False, True):
                settings = PruneSettings(
                    importance="l1",
                    round_to=rt,
                    global_pruning=ranking == "global",
                    max_layer_ratio=0.8,
                    prune_stem=stem,
                )
                ratio = search_ratio(
                    lambda r, s=settings: size_of(pruned_copy(model, r, s, SHAPE), SHAPE)["macs"] <= args.budget * base,
                    hi=0.8,
                )
                if ratio is not None:
                    name = f"r{rt}-{ranking}{'-stem' if stem else ''}"
                    candidates[name] = pruned_copy(model, ratio, settings, SHAPE)
    # Depth first: drop k of the nine 16-channel stage-1 blocks (fixed positions here: this model is
    # untrained; the prune stage picks the blocks by loss), then widths as above.
    settings = PruneSettings(importance="l1", round_to=16, global_pruning=True, max_layer_ratio=0.8)
    for k in (3, 4, 5):
        shallow = remove_blocks(copy.deepcopy(model), [f"layer1.{i}" for i in range(1, k + 1)])
        ratio = search_ratio(
            lambda r, m=shallow: size_of(pruned_copy(m, r, settings, SHAPE), SHAPE)["macs"] <= args.budget * base,
            hi=0.8,
        )
        if ratio is not None:
            candidates[f"r16-global-drop{k}"] = pruned_copy(shallow, ratio, settings, SHAPE)
    threads = physical_cores()
    runners, macs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in candidates.items():
            macs[name] = size_of(m, SHAPE)["macs"]
            for precision in ("fp32", "int8"):
                path = Path(tmp) / f"{name}-{precision}.onnx".replace("=", "")
                build_deployable(
                    m, precision, path, torch.randn(2, *SHAPE), settings=PROBE_SETTINGS, calibration=(calib, spec)
                )
                runners[f"{name} {precision}"] = OrtRunner(path, threads)
        x = torch.randn(64, *SHAPE)
        res = measure(runners, lambda bs: x[:bs], [1, 64], warmup=10, repeats=args.repeats)
    print(f"ResNet-56 at 28 px, MACs budget {args.budget:.2f}, ONNX Runtime CPU, {threads} threads, p50 ms")
    print(f"{'model':<26}{'MACs (M)':>10}{'batch 1':>10}{'batch 64':>10}  stage widths")
    out = {}
    for name, r in res.items():
        key = name.split()[0]
        widths = sorted({m.out_channels for m in candidates[key].modules() if isinstance(m, torch.nn.Conv2d)})
        print(f"{name:<26}{macs[key] / 1e6:>10.1f}{r[1].p50:>10.3f}{r[64].p50:>10.2f}  {widths}")
        out[name] = {"macs": macs[key], "p50_ms": {"1": r[1].p50, "64": r[64].p50}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
