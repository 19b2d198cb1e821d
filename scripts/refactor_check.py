"""Prove that a refactor changes nothing: snapshot before, snapshot after, compare.

    python scripts/refactor_check.py snapshot before.json --runs /tmp/before   # on the old commit
    python scripts/refactor_check.py snapshot after.json --runs /tmp/after     # on the new one
    python scripts/refactor_check.py compare before.json after.json
    python scripts/refactor_check.py render /tmp/before                        # new renderer, old report.json

A snapshot holds, for every registered model, a hash of its seeded initial weights and of its
outputs (float, BN-folded, and the INT8 simulation for both targets) on a fixed input; and, for
every shipped recipe run tiny (data subsets, one epoch), the hash of every stage's model weights,
of the ORT outputs of every ONNX deployable, and the report with the machine-dependent numbers
(latencies, durations, hardware) taken out. ``render`` re-renders report.md from each old run's
report.json with the current code and compares it byte for byte with the old report.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {
    "latency_ms",
    "throughput_ips",
    "latency_by_batch",
    "latency",
    "seconds",
    "duration_s",
    "started",
    "finished",
    "hardware",
    "versions",
    "run_dir",
    "path",
    "deploy_path",
    "threads",
    "latency_before_ms",
    "latency_after_ms",
    "latency_error",
    "measured_speedup",
    "throughput_ratio",
    "calibration",
    "location",
    "ort_optimized_ops",
    "bytes",
    "device",
}


def _hash_tensors(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _hash_array(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes()).hexdigest()[:16]


def model_snapshot() -> dict:
    from deploycraft.models.registry import create_model, list_models, model_info
    from deploycraft.quant.graph import fold_bn
    from deploycraft.quant.placement import act_quantizers, insert_quantizers

    out = {}
    for name in list_models():
        size = 32 if model_info(name).input_style == "cifar" else 64
        torch.manual_seed(0)
        m = create_model(name, num_classes=10, in_chans=3).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        entry = {"weights": _hash_tensors(m.state_dict().items())}
        with torch.no_grad():
            entry["out"] = _hash_array(m(x))
            entry["folded"] = _hash_array(fold_bn(m)(x))
            for target in ("onnxruntime-cpu", "tensorrt"):
                q = insert_quantizers(m, target)
                for _, a in act_quantizers(q):
                    a.start_calibration()
                q(x)
                for _, a in act_quantizers(q):
                    a.finish_calibration("max", 100.0)
                entry[f"int8_{target}"] = _hash_array(q(x))
        out[name] = entry
        print(f"  model {name}", file=sys.stderr)
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.startswith("speedup")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _strip_gates(gates: list) -> list:
    keep = []
    for g in gates:
        if g["name"].startswith(("latency", "speedup")):
            keep.append({"name": g["name"], "limit": g["limit"]})
        else:
            keep.append(g)
    return keep


_NUM = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def mask_markdown(text: str) -> str:
    """report.md with latencies, throughputs, speed-ups and durations replaced by '#'."""
    lines = []
    in_models = False
    for line in text.splitlines():
        if line.startswith("| model | precision"):
            in_models = True
        elif not line.startswith("|"):
            in_models = False
        if in_models and line.startswith("| ") and not line.startswith(("| model", "|---")):
            cells = line.split(" | ")
            # columns: model, precision, backend, top-1, drop, p50, p99, img/s, x torch, x onnx, MACs, size
            for i in (5, 6, 7, 8, 9, 11):
                if i < len(cells):
                    cells[i] = "#"
            line = " | ".join(cells)
        line = re.sub(_NUM + r" ms", "# ms", line)
        line = re.sub(_NUM + r" img/s", "# img/s", line)
        line = re.sub(_NUM + r"[x×]", "#x", line)
        line = re.sub(_NUM + r" s([.;)])", r"# s\1", line)
        line = re.sub(_NUM + r" MB", "# MB", line)
        line = re.sub(r"[+-]" + _NUM + r" %\)", "# %)", line)
        line = re.sub(r"run folder `[^`]*`", "run folder `#`", line)
        line = re.sub(r"^Hardware: .*$", "Hardware: #", line)
        lines.append(line)
    return "\n".join(lines)


TINY = [
    "data.train_subset=256",
    "data.val_subset=128",
    "stages.verify.repeats=3",
    "stages.verify.warmup=1",
    "stages.verify.batch_sizes=[1]",
    "stages.verify.max_accuracy_drop=null",
    "stages.verify.min_speedup=null",
    "stages.verify.max_latency_ms=null",
]


def _overrides(raw: dict) -> list[str]:
    types = {s["type"] for s in raw["stages"]}
    sets = list(TINY)
    if "train" in types:
        sets.append("stages.train.epochs=1")
    if "distill" in types:
        sets.append("stages.distill.epochs=1")
    if "quantize" in types:
        sets.append("stages.quantize.num_calibration=64")
    if "prune" in types:
        prune = next(s for s in raw["stages"] if s["type"] == "prune")
        if "target_latency_ms" in prune:  # measured latency is machine noise: search MACs instead
            sets += ["stages.prune.target_latency_ms=null", "stages.prune.target_macs=0.6"]
    return sets


def run_snapshot(runs_dir: Path, only: list[str] | None) -> dict:
    import onnxruntime  # noqa: F401
    import yaml

    from deploycraft.models.io import load_model
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import load_recipe
    from deploycraft.runtime.ort import OrtRunner

    out = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if only and path.stem not in only:
            continue
        raw = yaml.safe_load(path.read_text())
        recipe = load_recipe(path, _overrides(raw))
        run_dir = runs_dir / path.stem
        Pipeline(recipe, run_dir).execute()
        report = json.loads((run_dir / "report.json").read_text())
        entry = {"report": _strip({**report, "gates": _strip_gates(report["gates"])})}
        entry["report_md"] = mask_markdown((run_dir / "report.md").read_text())
        models = {}
        for spec in sorted((run_dir / "stages").rglob("spec.json")):
            folder = spec.parent
            rel = str(folder.relative_to(run_dir / "stages"))
            rel = re.sub(r"^\d\d-([a-z]+)-[0-9a-f]+", r"\1", rel)
            models[rel] = _hash_tensors(load_model(folder).state_dict().items())
        entry["models"] = models
        x = torch.randn(
            4,
            recipe.model.in_chans or recipe.data.channels,
            recipe.data.image_size,
            recipe.data.image_size,
            generator=torch.Generator().manual_seed(3),
        ).numpy()
        onnx_out = {}
        for f in sorted((run_dir / "deploy").glob("*.onnx")):
            onnx_out[f.name] = _hash_array(OrtRunner(f, threads=1)(x))
        entry["onnx_outputs"] = onnx_out
        out[path.stem] = entry
        print(f"  recipe {path.stem}", file=sys.stderr)
    return out


def _diff(a, b, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                found.append(f"{where}.{k}: only after ({json.dumps(b[k])[:120]})")
            elif k not in b:
                found.append(f"{where}.{k}: only before ({json.dumps(a[k])[:120]})")
            else:
                _diff(a[k], b[k], f"{where}.{k}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", found)
    elif isinstance(a, str) and isinstance(b, str) and "\n" in a:
        if a != b:
            import difflib

            d = "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0))
            found.append(f"{where}: text differs\n{d}")
    elif a != b:
        found.append(f"{where}: {json.dumps(a)[:120]} -> {json.dumps(b)[:120]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("output", type=Path)
    s.add_argument("--runs", type=Path, required=True, help="where the tiny runs' folders go")
    s.add_argument("--only", nargs="*", help="recipe stems to run (default: all)")
    s.add_argument("--skip-models", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    r = sub.add_parser("render")
    r.add_argument("runs", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.cmd == "snapshot":
        snap = {"models": {} if args.skip_models else model_snapshot(), "runs": run_snapshot(args.runs, args.only)}
        args.output.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"{len(snap['models'])} models, {len(snap['runs'])} runs -> {args.output}")
        return 0
    if args.cmd == "compare":
        a, b = json.loads(args.before.read_text()), json.loads(args.after.read_text())
        found: list[str] = []
        _diff(a, b, "snapshot", found)
        print("\n".join(found) if found else "identical")
        print(f"{len(a['models'])}/{len(b['models'])} models, {len(a['runs'])}/{len(b['runs'])} runs compared")
        return 1 if found else 0
    from deploycraft.report import render_markdown

    bad = 0
    runs = sorted(p.parent for p in args.runs.rglob("report.json"))
    for run in runs:
        old = (run / "report.md").read_text()
        new = render_markdown(json.loads((run / "report.json").read_text()))
        if old != new:
            bad += 1
            print(f"{run}: report.md differs")
    print(f"{len(runs) - bad}/{len(runs)} reports render identically")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
