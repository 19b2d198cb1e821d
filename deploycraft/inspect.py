"""`deploycraft inspect RUN_DIR`: what a run folder holds, read back without re-running anything.

Every stage is checked against its record (the same check a re-run makes before reusing it), so a
damaged stage is named here too; nothing is read from a stage that does not check out.
"""

from __future__ import annotations

from pathlib import Path

from deploycraft.artifacts import manifest_files, read_status, sha256_file, verify_stage
from deploycraft.errors import UserError


def _widths(model) -> dict[str, int]:
    import torch.nn as nn

    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _stage_entries(status: dict) -> list[dict]:
    stages = status.get("stages")
    if not isinstance(stages, list):
        return []
    return [s for s in stages if isinstance(s, dict) and isinstance(s.get("dir"), str) and "/" not in s["dir"]]


def describe(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "run.json").is_file():
        raise UserError(
            f"{run_dir} is not a deploycraft run folder (no run.json)",
            field="RUN_DIR",
            fix="give a folder under artifacts/<recipe>/ made by `deploycraft run`",
        )
    status = read_status(run_dir)
    lines = [f"run {run_dir}: {status.get('recipe', '?')} — {status.get('status')}"]
    if status.get("status") == "interrupted":
        lines.append("  the run was stopped before it finished: `deploycraft run` with the same recipe resumes it")
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    models = []  # (stage type, model folder) of stages that check out
    image_size, in_chans = None, None
    for st in _stage_entries(status):
        folder = run_dir / "stages" / st["dir"]
        record, problems = verify_stage(folder, str(st.get("key")))
        took = "cached" if st.get("cached") else f"{st.get('duration_s', '?')} s"
        if record is None:
            state = "incomplete" if problems == ["stage.json is missing"] else "DAMAGED: " + "; ".join(problems[:2])
            lines.append(f"  {st['dir']:<40} {state}")
            continue
        lines.append(f"  {st['dir']:<40} {took}")
        out = record["output"]
        if out.get("model"):
            models.append((record["type"], folder / out["model"]))
        if record["type"] == "init":
            in_chans = out.get("metrics", {}).get("in_chans")
    try:
        import yaml

        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        image_size = recipe["data"]["image_size"]
    except Exception:  # noqa: BLE001 - a missing or edited recipe.yaml only costs the MACs lines
        recipe = None
    if models and image_size:
        lines += _model_lines(models, image_size, in_chans or 3)
    deploy = run_dir / "deploy"
    listed = manifest_files(run_dir)
    shipped = sorted(rel for rel in (listed or {}) if rel.startswith("deploy/"))
    if shipped and not deploy.is_dir():
        lines.append(
            f"deployables: deploy/ is MISSING ({len(shipped)} files in manifest.json; a re-run ships them again)"
        )
    if deploy.is_dir():
        lines.append("deployables:")
        for rel in shipped:
            if not (run_dir / rel).is_file() and not (run_dir / rel).is_symlink():
                lines.append(f"  {rel}  MISSING: in manifest.json, not in deploy/ (a re-run ships it again)")
        for f in sorted(p for p in deploy.rglob("*") if p.is_file() or p.is_symlink()):
            rel = f.relative_to(run_dir).as_posix()
            entry = listed.get(rel) if listed is not None else None
            if listed is None:
                state = "not checked: manifest.json is missing or unreadable"
            elif entry is None or f.is_symlink():
                state = "NOT SHIPPED by deploycraft (not in manifest.json)"
            elif entry.get("sha256") != sha256_file(f):
                state = "DAMAGED: differs from manifest.json (a re-run keeps it as deploy.kept-*/ and ships again)"
            else:
                state = ""
            size = f"{f.stat().st_size / 1e6:.2f} MB" if f.is_file() else "link"
            lines.append(f"  {rel}  ({size}){'  ' + state if state else ''}")
    return "\n".join(lines)


def _model_lines(models: list[tuple[str, Path]], size: int, in_chans: int) -> list[str]:
    from deploycraft.models.io import load_model, read_spec
    from deploycraft.models.profile import count_macs, count_params

    (first_type, first), (last_type, last) = models[0], models[-1]
    spec = read_spec(last)
    m0, m1 = load_model(first), load_model(last)
    shape = (in_chans, size, size)
    p0, p1 = count_params(m0), count_params(m1)
    c0, c1 = count_macs(m0, shape), count_macs(m1, shape)
    lines = [f"model {spec['arch']} at {size} px:", f"  {'':<12}{'params':>12}{'MACs':>14}"]
    lines.append(f"  {first_type:<12}{p0 / 1e6:>10.3f} M{c0 / 1e6:>12.2f} M")
    if last != first:
        lines.append(
            f"  {last_type:<12}{p1 / 1e6:>10.3f} M{c1 / 1e6:>12.2f} M   ({p1 / p0:.2f}x params, {c1 / c0:.2f}x MACs)"
        )
    w0, w1 = _widths(m0), _widths(m1)
    changed = {n: (w0.get(n), w) for n, w in w1.items() if w0.get(n) != w}
    if changed:
        lines.append(f"  conv widths changed in {len(changed)} of {len(w1)} convs:")
        for n, (a, b) in changed.items():
            lines.append(f"    {n:<36}{a:>6} -> {b}")
    else:
        lines.append(f"  conv widths: unchanged ({len(w1)} convs)")
    return lines
