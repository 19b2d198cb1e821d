"""`deploycraft inspect RUN_DIR`: what a run folder holds, read back without re-running anything."""

from __future__ import annotations

from pathlib import Path

from deploycraft.artifacts import read_json
from deploycraft.errors import UserError
from deploycraft.models.io import load_model, read_spec
from deploycraft.models.profile import count_macs, count_params


def _models_in(run_dir: Path) -> list[tuple[str, Path]]:
    found = []
    for stage in sorted((run_dir / "stages").glob("*/stage.json")):
        record = read_json(stage)
        model = record.get("output", {}).get("model")
        if model:
            found.append((record["type"], stage.parent / model))
    return found


def _widths(model) -> dict[str, int]:
    import torch.nn as nn

    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def describe(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(
            f"{run_dir} is not a deploycraft run folder (no run.json)",
            field="RUN_DIR",
            fix="give a folder under artifacts/<recipe>/ made by `deploycraft run`",
        )
    status = read_json(run_dir / "run.json")
    recipe_yaml = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else ""
    lines = [f"run {run_dir}: {status.get('recipe')} — {status.get('status')}"]
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    for st in status.get("stages", []):
        lines.append(f"  {st['dir']:<40} {'cached' if st.get('cached') else str(st.get('duration_s', '')) + ' s'}")
    models = _models_in(run_dir)
    if models:
        import yaml

        recipe = yaml.safe_load(recipe_yaml) if recipe_yaml else {}
        size = recipe.get("data", {}).get("image_size", 32)
        first_type, first = models[0]
        last_type, last = models[-1]
        spec = read_spec(last)
        m0, m1 = load_model(first), load_model(last)
        chans = spec["kwargs"].get("in_chans", 3)
        shape = (chans, size, size)
        p0, p1 = count_params(m0), count_params(m1)
        c0, c1 = count_macs(m0, shape), count_macs(m1, shape)
        lines.append(f"model {spec['arch']} at {size} px:")
        lines.append(f"  {'':<12}{'params':>12}{'MACs':>14}")
        lines.append(f"  {first_type:<12}{p0 / 1e6:>10.3f} M{c0 / 1e6:>12.2f} M")
        if last != first:
            lines.append(
                f"  {last_type:<12}{p1 / 1e6:>10.3f} M{c1 / 1e6:>12.2f} M   "
                f"({p1 / p0:.2f}x params, {c1 / c0:.2f}x MACs)"
            )
        w0, w1 = _widths(m0), _widths(m1)
        changed = {n: (w0.get(n), w) for n, w in w1.items() if w0.get(n) != w}
        if changed:
            lines.append(f"  conv widths changed in {len(changed)} of {len(w1)} convs:")
            for n, (a, b) in list(changed.items()):
                lines.append(f"    {n:<36}{a:>6} -> {b}")
        else:
            lines.append(f"  conv widths: unchanged ({len(w1)} convs)")
    deploy = run_dir / "deploy"
    if deploy.is_dir():
        lines.append("deployables:")
        for f in sorted(p for p in deploy.rglob("*") if p.is_file()):
            lines.append(f"  {f.relative_to(run_dir)}  ({f.stat().st_size / 1e6:.2f} MB)")
    return "\n".join(lines)
