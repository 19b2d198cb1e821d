"""The lesion of a few named units of a run's trained model on more held-out images than its diagnose stage used.

`deploycraft diagnose --images N` measures every unit; a diagnose stage on 2,000 images leaves a
top-1 drop with a binomial standard error near 0.8 points. Where an ordering of a few units decides a
finding (does deleting a downsampling block cost more than deleting the worst other block?), this
script measures just those units, and the intact model, on up to the whole held-out split, as deleted
and with every BN's statistics re-estimated on the same training images the diagnose stage takes
(`diagnostics.lesion_study`, the code the stage runs).

    .venv/bin/python benchmarks/lesion_units.py RUN_DIR layer1.0,layer2.0,layer3.0 \
        [--images 10000] [--recalibrate-images 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deploycraft import diagnostics as dg
from deploycraft.data import build_data
from deploycraft.diagnose_command import load_target, settings_from_options
from deploycraft.runtime.bench import physical_cores
from deploycraft.stages.diagnose import recalibration_batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("units", help="comma-separated unit names, as the lesion table names them")
    ap.add_argument("--images", type=int, default=10_000, help="held-out images (at most the split)")
    ap.add_argument("--recalibrate-images", type=int, default=2000, help="0: as deleted only")
    ap.add_argument("--threads", type=int, default=physical_cores(), help="torch threads (default: physical cores)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    settings = settings_from_options(
        {"images": args.images, "lesion_recalibration_images": args.recalibrate_images, "analyses": ["lesion"]}
    )
    target = load_target(args.run_dir, [], None, settings, recompute=True)
    data = build_data(target.recipe.data, target.recipe.seed)
    val = dg.take_images(data.val_batches(settings.batch_size), settings.images)
    recalibrate, _ = recalibration_batches(data, settings)
    model = target.model.eval()
    wanted = args.units.split(",")
    every = dg.lesion_units(model, val[0][0][:2])
    units = [u for u in every if u.name in wanted]
    missing = sorted(set(wanted) - {u.name for u in units})
    if missing:
        names = ", ".join(u.name for u in every)
        raise SystemExit(f"no lesion unit named {', '.join(missing)}; the model's units: {names}")
    start = time.perf_counter()
    out = dg.lesion_study(model, val, units=units, recalibrate=recalibrate)
    out.update(run=str(args.run_dir), seconds=round(time.perf_counter() - start, 1))

    print(f"{out['images']} held-out images; intact top-1 {out['base_top1'] * 100:.2f} %", end="")
    if recalibrate:
        print(f", {out['base_top1_recalibrated'] * 100:.2f} % with BN re-estimated on {out['recalibration_images']}")
    else:
        print()
    for u in out["units"]:
        line = f"{u['name']:>12} {'downsampling' if u['downsampling'] else '':>12}  drop {u['drop'] * 100:6.2f} pt"
        if recalibrate:
            line += f", BN re-estimated {u['drop_recalibrated'] * 100:6.2f} pt"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
