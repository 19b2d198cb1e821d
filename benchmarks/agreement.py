"""Simulation against deployed file, re-measured on finished runs (issue 10, acceptance 5: top-1 agreement
of at least 99.8 % on the whole held-out split for every INT8 deployable).

For each run folder and each INT8 target its quantize stage built, this rebuilds the saved simulation (the
stage's config, the model it quantized, ``quant_state*.pt``), runs the stage's INT8 file on the target's
runtime, and counts on the held-out split how often the two predict the same class: once with the
simulation in float32 (as the stage trains and evaluates it; before stop 24 the stage also compared it with
the file's) and once in float64 computing as the target's runtime does (``modules.exact_simulation`` with
the runtime: ONNX Runtime's requantization, quant/mlas.py; what the quantize stage reports since stop 26).
``--plain-float64`` adds the float64 simulation without the runtime's requantization (what the stage
reported in stops 23-25). ``--cross`` also runs each file on the other CPU runtime (verify measures the
file placed for ONNX Runtime on OpenVINO and the reverse, and ``target: auto`` may ship such a pairing),
against the simulation fused and rounded as that runtime runs the file (``placement.fused_as``, what the
quantize stage compares since stop 31; on a file's own runtime the simulation as placed, as the stage).
Nothing in the run folder is changed.

    .venv/bin/python benchmarks/agreement.py RUN_DIR [RUN_DIR ...] [--plain-float64] [--cross] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from deploycraft.data import build_data
from deploycraft.deployables import TARGET_RUNTIME
from deploycraft.models.io import load_model
from deploycraft.names import ARTIFACT_FILE, INT8_NAME
from deploycraft.progress import bar
from deploycraft.quant.modules import exact_simulation
from deploycraft.quant.placement import fused_as
from deploycraft.recipe import build_recipe
from deploycraft.runtime import onnx_runner
from deploycraft.stages.quantize import STATE_SUFFIX, QuantizeConfig, load_quantized

TARGET = 0.998


def stage_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "stages").iterdir() if p.is_dir())


def quantized_input(run: Path) -> tuple[Path, Path]:
    """The quantize stage's folder and the folder of the model it quantized (the last stage before it that
    wrote one)."""
    dirs = stage_dirs(run)
    q = next((i for i, d in enumerate(dirs) if d.name.split("-")[1] == "quantize"), None)
    if q is None:
        raise LookupError(f"{run}: no quantize stage")
    model = next((d / "model" for d in reversed(dirs[:q]) if (d / "model" / "spec.json").is_file()), None)
    if model is None:
        raise LookupError(f"{run}: no model before the quantize stage")
    return dirs[q], model


OTHER_RUNTIME = {"onnxruntime": "openvino", "openvino": "onnxruntime"}


def measure(run: Path, plain64: bool = False, cross: bool = False) -> list[dict]:
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe = build_recipe(raw)
    data = build_data(recipe.data, recipe.seed)
    qdir, model_dir = quantized_input(run)
    cfg = QuantizeConfig(**json.loads((qdir / "stage.json").read_text())["config"])
    report = json.loads((run / "report.json").read_text())["stages"]["quantize"]
    rows = []
    for target in report.get("targets", {report["target"]: None}):
        path = qdir / ARTIFACT_FILE[INT8_NAME[target]]
        model = load_model(model_dir).eval()
        qmodel = load_quantized(model, target, cfg, qdir / f"quant_state{STATE_SUFFIX[target]}.pt")
        for runtime in [TARGET_RUNTIME[target]] + ([OTHER_RUNTIME[TARGET_RUNTIME[target]]] if cross else []):
            rows.append(_measure_file(f"{recipe.name}/{run.name}", data, cfg, qmodel, target, path, runtime, plain64))
    return rows


def _measure_file(run_name, data, cfg, qmodel, target, path, runtime, plain64) -> dict:
    """The file placed for ``target`` on one runtime, against its saved simulation ``qmodel`` fused as that
    runtime runs the file."""
    if runtime != TARGET_RUNTIME[target]:  # as the quantize stage compares a file on the other runtime
        qmodel = fused_as(qmodel, runtime)
    exact = exact_simulation(qmodel, runtime)
    plain = exact_simulation(qmodel) if plain64 else None
    deployed = onnx_runner(runtime, path, threads=None)
    same32 = same64 = same_plain = n = 0
    start = time.time()
    with torch.inference_mode(), bar(f"{run_name} {target} on {runtime}", data.num_val_batches(256)) as b:
        for x, _ in data.val_batches(256):
            d = np.asarray(deployed(deployed.prepare(x))).argmax(1)
            same32 += int((qmodel(x).argmax(1).numpy() == d).sum())
            same64 += int((exact(x.double()).argmax(1).numpy() == d).sum())
            if plain is not None:
                same_plain += int((plain(x.double()).argmax(1).numpy() == d).sum())
            n += len(x)
            b.advance()
    row = {
        "run": run_name,
        "method": cfg.method,
        "weight_bits": cfg.weight_bits,
        "target": target,
        "runtime": runtime,
        "images": n,
        "agreement_float32": same32 / n,
        "agreement_float64": same64 / n,
        "float64_arithmetic": exact.simulation_arithmetic,
        **({"agreement_plain_float64": same_plain / n} if plain is not None else {}),
        "holds": same64 / n >= TARGET,
        "seconds": round(time.time() - start, 1),
    }
    print(
        f"{row['run']:<44} {target:<16} {runtime:<12} {row['method']:<4} "
        f"float32 {row['agreement_float32'] * 100:6.2f} %  "
        f"float64 {row['agreement_float64'] * 100:6.2f} %  "
        + (f"plain float64 {row['agreement_plain_float64'] * 100:6.2f} %  " if plain is not None else "")
        + ("holds" if row["holds"] else "BELOW 99.8 %"),
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--plain-float64", action="store_true", help="also the float64 simulation without the runtime's requantization"
    )
    ap.add_argument("--cross", action="store_true", help="also run each file on the other CPU runtime")
    args = ap.parse_args()
    rows, failed = [], []
    for run in args.runs:
        try:
            rows += measure(run, args.plain_float64, args.cross)
        except (LookupError, OSError, RuntimeError, ValueError, ImportError) as exc:  # one run's problem
            failed.append({"run": run.name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{run}: skipped ({failed[-1]['error']})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"target": TARGET, "rows": rows, "skipped": failed}, indent=2) + "\n")
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
