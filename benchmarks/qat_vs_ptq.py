"""QAT against PTQ on the shipped INT8 recipes (issue 10, acceptance 3: QAT never more than 0.1 points below PTQ).

Runs each recipe with ``--set stages.quantize.method=qat`` (QAT with KD from the FP32 model, the stage's
defaults; the plain-QAT control off unless ``--control``) and reads, per INT8 target, the quantize stage's
held-out top-1 of the PTQ simulation, of the QAT simulation and of the deployed QAT file (the full test
split). The PTQ and QAT simulations are evaluated on the same images in the same run (the QAT one on
the recipe's device, where QAT trained), so their difference is the comparison; the deployed file's top-1
is beside it.

    python benchmarks/qat_vs_ptq.py resnet20_fmnist_int8 wrn_16_2_fmnist --json qat_vs_ptq.json
    python benchmarks/qat_vs_ptq.py --read RUN_DIR [RUN_DIR ...]      # tabulate finished runs only

Run from anywhere; recipes are looked up in the repository's recipes/. Extra ``--set`` overrides
(``--set stages.train.epochs=2``) go to every run; they are printed above the table and kept in the JSON.
A run that fails (a verify gate, say) still gives its row when its quantize stage finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MARGIN = 0.001  # QAT may end at most 0.1 points below PTQ
REPO = Path(__file__).resolve().parents[1]


class NoQAT(Exception):
    pass


def rows(run_dir: Path) -> list[dict]:
    """One row per INT8 target of a finished run with ``method: qat``."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise NoQAT(f"{run_dir}: no report.json")
    report = json.loads(path.read_text())
    q = report.get("stages", {}).get("quantize")
    if not q or q.get("method") != "qat" or not all("qat" in t for t in q.get("targets", {q["target"]: q}).values()):
        raise NoQAT(f"{run_dir}: no finished QAT in this run's quantize stage")
    out = []
    for target, t in q.get("targets", {q["target"]: q}).items():
        qat, held = t["qat"], t.get("held_out") or {}
        out.append(
            {
                "recipe": report["recipe"],
                "run_dir": run_dir.name,
                "target": target,
                "epochs": qat["epochs"],
                "kd": bool(qat.get("teacher")),
                "top1_fp32": qat["top1_fp32"],
                "top1_ptq_sim": qat["top1_ptq"],
                "top1_qat_sim": qat["top1_qat"],
                "top1_qat_deployed": held.get("top1_deployed"),
                "qat_minus_ptq": round(qat["top1_qat"] - qat["top1_ptq"], 6),
                "holds": qat["top1_qat"] >= qat["top1_ptq"] - MARGIN - 1e-9,
            }
        )
    return out


def table(all_rows: list[dict]) -> str:
    lines = [
        "| recipe | target | FP32 | PTQ (sim) | QAT (sim) | QAT − PTQ | QAT deployed | ≥ PTQ − 0.1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        qat = "QAT+KD" if r["kd"] else "QAT"
        dep = f"{r['top1_qat_deployed'] * 100:.2f} %" if r["top1_qat_deployed"] is not None else "—"
        lines.append(
            f"| {r['recipe']} | {r['target']} | {r['top1_fp32'] * 100:.2f} % | {r['top1_ptq_sim'] * 100:.2f} % | "
            f"{qat} {r['top1_qat_sim'] * 100:.2f} % | {r['qat_minus_ptq'] * 100:+.2f} pt | {dep} | "
            f"{'yes' if r['holds'] else '**no**'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="*", help="recipe names under recipes/ (without .yaml)")
    ap.add_argument("--read", nargs="+", type=Path, default=[], help="tabulate these finished run folders")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="an override for every run")
    ap.add_argument("--control", action="store_true", help="also train the plain-QAT control")
    ap.add_argument("--out", type=Path, default=Path("artifacts/qat_vs_ptq"), help="run folders go here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.recipes and not args.read:
        ap.error("name recipes to run or --read run folders")
    all_rows, runs, problems = [], [], []
    sets = ["stages.quantize.method=qat", *args.sets]
    if not args.control:
        sets.append("stages.quantize.qat.distill.control=false")
    for name in args.recipes:
        recipe = Path(name) if name.endswith(".yaml") else REPO / "recipes" / f"{name}.yaml"
        if not recipe.is_file():
            raise SystemExit(f"{recipe}: no such recipe (give a name under {REPO / 'recipes'} or a .yaml path)")
        run_dir = args.out / recipe.stem
        cmd = [sys.executable, "-m", "deploycraft", "run", str(recipe), "-o", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        print("$", " ".join(cmd), flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        runs.append({"recipe": recipe.stem, "rc": rc, "wall_s": round(time.monotonic() - t0, 1)})
        try:
            got = rows(run_dir)
        except NoQAT as exc:
            problems.append(f"{recipe.stem}: exit {rc}; {exc}")
            continue
        if rc != 0:
            problems.append(f"{recipe.stem}: exit {rc} after its quantize stage (its row is below)")
        all_rows += [{**r, "rc": rc} for r in got]
    for run_dir in args.read:
        try:
            all_rows += rows(run_dir)
        except NoQAT as exc:
            problems.append(str(exc))
    if args.recipes:
        print("overrides: " + " ".join(f"--set {s}" for s in sets))
    print(table(all_rows))
    for p in problems:
        print(p)
    if args.json:
        args.json.write_text(json.dumps({"sets": sets, "runs": runs, "rows": all_rows}, indent=1) + "\n")
    return 1 if problems or not all(r["holds"] for r in all_rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
