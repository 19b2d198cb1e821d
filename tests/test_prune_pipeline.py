"""train -> prune -> distill -> quantize -> export -> verify through the pipeline (synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deploycraft.errors import StageFailure, UserError
from deploycraft.models.io import load_model
from deploycraft.pipeline import Pipeline
from deploycraft.recipe import build_recipe
from tests.conftest import REPO, run_cli, smoke_recipe

PRUNE = {"type": "prune", "target_macs": 0.5, "round_to": 8, "steps": 2, "finetune": {"epochs": 1, "batch_size": 64}}
DISTILL = {"type": "distill", "epochs": 1, "batch_size": 64, "lr": 0.02, "control": True, "feature_weight": 0.5}


def chain(**prune_changes):
    raw = smoke_recipe()
    raw["stages"][0]["epochs"] = 2
    raw["stages"][3]["batch_sizes"] = [1, 8]
    raw["stages"][1:1] = [{**PRUNE, **prune_changes}, dict(DISTILL)]
    return raw


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    Pipeline(build_recipe(chain()), out).execute()
    return out, json.loads((out / "report.json").read_text())


def test_report_has_pruned_and_unpruned_models(pruned_run):
    out, report = pruned_run
    assert set(report["models"]) >= {
        "fp32_torch",
        "pruned_fp32_torch",
        "unpruned_fp32_onnx",
        "unpruned_int8_onnx",
        "fp32_onnx",
        "int8_onnx",
    }
    m = report["models"]
    assert m["int8_onnx"]["macs"] == m["pruned_fp32_torch"]["macs"] < m["fp32_torch"]["macs"]
    assert m["unpruned_int8_onnx"]["macs"] == m["fp32_torch"]["macs"]
    gated = {g["name"] for g in report["gates"]}
    assert gated == {"accuracy_drop:fp32_onnx", "accuracy_drop:int8_onnx"}  # comparisons are not gated
    # report.md's model line describes the shipped (pruned) model, the unpruned one beside it
    main = m[report["main"]]
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("Model: "))
    assert f"{main['macs'] / 1e6:.1f} M MACs per image (before pruning" in line


def test_predicted_vs_measured_speedup(pruned_run):
    _, report = pruned_run
    pairs = {(r["before"], r["after"]): r for r in report["pruning"]}
    assert set(pairs) == {
        ("fp32_torch", "pruned_fp32_torch"),
        ("unpruned_fp32_onnx", "fp32_onnx"),
        ("unpruned_int8_onnx", "int8_onnx"),
    }
    for r in pairs.values():
        assert r["predicted_speedup"] >= 2.0  # MACs at most half
        assert set(r["measured_speedup"]) == {"1", "8"} and all(v > 0 for v in r["measured_speedup"].values())


def test_prune_and_distill_metrics(pruned_run):
    out, report = pruned_run
    p, d = report["stages"]["prune"], report["stages"]["distill"]
    assert p["macs_ratio"] <= 0.5 and p["steps"] == 2 and len(p["history"]) == 2
    assert all(w % 8 == 0 for w in p["distinct_widths_after"])
    for key in ("top1_after_prune", "top1_after_finetune"):
        assert 0 <= p[key] <= 1
    for key in ("top1_kd", "top1_control", "top1_teacher", "top1_student_before"):
        assert 0 <= d[key] <= 1
    md = (out / "report.md").read_text()
    assert "## Pruning" in md and "predicted (MACs ratio)" in md and "plain fine-tuning control" in md


def test_pruned_model_reloads_identically_in_a_new_process(pruned_run, tmp_path):
    out, _ = pruned_run
    folder = next((out / "stages").glob("*-distill-*")) / "model"
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        here = load_model(folder)(x)
    code = (
        "import sys, torch; from deploycraft.models.io import load_model; "
        "m = load_model(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True); "
        "torch.save(m(x).detach(), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True, cwd=REPO
    )
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), here)
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["widths"] and not (folder / "model.pkl").exists()


def test_inspect_shows_widths_before_and_after(pruned_run):
    out, _ = pruned_run
    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "conv widths changed" in proc.stdout and "MACs" in proc.stdout and "->" in proc.stdout


def test_latency_target_is_searched_and_reported(tmp_path, monkeypatch):
    """A stand-in latency model (proportional to MACs) makes the search deterministic here; the real
    measurement runs in the slow ResNet-56 test."""
    from deploycraft.models.profile import count_macs
    from deploycraft.stages import prune as prune_stage

    def fake_latency(model, shape, *args, **kwargs):
        return count_macs(model, shape) / 1e6  # "1 ms per M MAC"

    monkeypatch.setattr(prune_stage, "onnx_latency_ms", fake_latency)
    raw = chain(target_macs=None, target_latency_ms=6.0, latency_batch_size=1, steps=1, finetune=None)
    raw["stages"] = raw["stages"][:2]
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    stage = json.loads(next((tmp_path / "run" / "stages").glob("*-prune-*/stage.json")).read_text())
    p = stage["output"]["metrics"]
    assert p["latency_after_ms"] <= 6.0 and abs(p["latency_error"]) <= 0.10
    assert p["latency_before_ms"] > 10


def test_prune_resumes_after_a_failed_step(tmp_path, monkeypatch):
    from deploycraft.stages import prune as prune_stage

    raw = chain()
    raw["stages"] = raw["stages"][:2]
    real = prune_stage.train_epochs
    calls = []

    def fail_second(model, data, cfg, workdir, seed, *args, **kwargs):
        calls.append(workdir.name)
        if workdir.name == "step1":
            raise RuntimeError("simulated crash in step 2")
        return real(model, data, cfg, workdir, seed, *args, **kwargs)

    monkeypatch.setattr(prune_stage, "train_epochs", fail_second)
    with pytest.raises(StageFailure, match="stage prune failed: RuntimeError: simulated crash in step 2"):
        Pipeline(build_recipe(raw), tmp_path / "run").execute()
    monkeypatch.setattr(prune_stage, "train_epochs", real)
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "resuming prune after step 1/2" in log
    assert calls == ["step0", "step1"]


def test_unreachable_target_is_a_user_error(tmp_path):
    raw = chain(target_macs=0.001, steps=1, finetune=None)
    raw["stages"] = raw["stages"][:2]
    with pytest.raises(UserError, match="cannot be reached"):
        Pipeline(build_recipe(raw), tmp_path / "run").execute()


def test_distill_needs_a_teacher():
    raw = smoke_recipe()
    raw["stages"].insert(1, dict(DISTILL))
    with pytest.raises(UserError, match="no teacher"):
        build_recipe(raw)


def test_depth_pruning_through_the_stage(tmp_path):
    raw = chain(target_macs=None, channel_ratio=0.0, remove_blocks=3, block_cost="none", steps=1, finetune=None)
    raw["stages"] = raw["stages"][:2]
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    stage = json.loads(next((tmp_path / "run" / "stages").glob("*-prune-*/stage.json")).read_text())
    p = stage["output"]["metrics"]
    assert len(p["removed_blocks"]) == 3 and set(p["removed_blocks"]) <= set(p["block_scores"])
    kept = sorted(p["block_scores"], key=p["block_scores"].get)[:3]
    assert sorted(p["removed_blocks"]) == sorted(kept)  # the three that cost the least loss
    assert p["macs_ratio"] < 1.0
    model = load_model(next((tmp_path / "run" / "stages").glob("*-prune-*")) / "model")
    assert sum(isinstance(m, torch.nn.Identity) for m in model.modules()) >= 3
    # The lesion study of the same blocks on the same batches: deleting a block's branch is removing the block,
    # so its loss increase is the block score.
    lesion = p["block_lesion"]["blocks"]
    assert set(lesion) == set(p["block_scores"])
    for name, b in lesion.items():
        assert b["loss_increase"] == pytest.approx(p["block_scores"][name], abs=1e-5)
    assert sorted(b["rank"] for b in lesion.values()) == list(range(1, len(lesion) + 1))
    rel = p["lesion_relation"]
    assert rel["removed_lesion_ranks"] == {n: lesion[n]["rank"] for n in p["removed_blocks"]}
    assert -1 <= rel["spearman_loss_vs_lesion"] <= 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Lesion ranking (Veit et al. 2016" in report and "raised the training loss least" in report


def test_depth_pruning_by_the_lesion_ranking(tmp_path):
    raw = chain(
        target_macs=None,
        channel_ratio=0.0,
        remove_blocks=3,
        block_cost="none",
        block_ranking="lesion",
        steps=1,
        finetune=None,
    )
    raw["stages"] = raw["stages"][:2]
    Pipeline(build_recipe(raw), tmp_path / "run").execute()
    p = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]["prune"]
    assert p["block_ranking"] == "lesion"
    assert sorted(p["lesion_relation"]["removed_lesion_ranks"].values()) == [1, 2, 3]
    assert p["lesion_relation"]["overlap"] == 3
    assert "least top-1 (lesion ranking)" in (tmp_path / "run" / "report.md").read_text()


def test_lesion_relation_spearman():
    from deploycraft.stages.prune import lesion_relation

    lesion = {"blocks": {b: {"rank": r, "top1_drop": r / 100} for b, r in (("a", 1), ("b", 2), ("c", 3))}}
    same = lesion_relation(["a"], lesion, {"a": 0.1, "b": 0.2, "c": 0.3})
    assert same["spearman_loss_vs_lesion"] == 1 and same["overlap"] == 1 and same["lesion_choice"] == ["a"]
    reverse = lesion_relation(["c"], lesion, {"a": 0.3, "b": 0.2, "c": 0.1})
    assert reverse["spearman_loss_vs_lesion"] == -1 and reverse["removed_lesion_ranks"] == {"c": 3}
    assert reverse["removed_top1_drop_sum"] == pytest.approx(0.03)


def test_too_many_blocks_is_a_user_error(tmp_path):
    raw = chain(target_macs=None, channel_ratio=0.0, remove_blocks=50, steps=1, finetune=None)
    raw["stages"] = raw["stages"][:2]
    with pytest.raises(UserError, match="remove_blocks"):
        Pipeline(build_recipe(raw), tmp_path / "run").execute()


def test_prune_reruns_when_a_later_stage_changes_its_defaults(tmp_path):
    """round_to and latency_precision default by whether an INT8 CPU deployment follows: disabling the
    quantize stage changes the pruned widths, so the prune stage must not be reused (the review's case)."""
    raw = chain(round_to=None, finetune=None, steps=1, target_macs=0.8)
    raw["stages"] = [raw["stages"][0], raw["stages"][1], raw["stages"][3]]  # train, prune, quantize
    out = tmp_path / "run"

    def prune_record():
        status = json.loads((out / "run.json").read_text())
        entry = next(s for s in status["stages"] if s["type"] == "prune")
        record = json.loads((out / "stages" / entry["dir"] / "stage.json").read_text())
        return entry["cached"], record["output"]["metrics"]["round_to"]

    Pipeline(build_recipe(raw), out).execute()
    assert prune_record() == (False, 16)
    raw["stages"][2]["enabled"] = False
    Pipeline(build_recipe(raw), out).execute()
    assert prune_record() == (False, 8)
    raw["stages"][2]["enabled"] = True
    Pipeline(build_recipe(raw), out).execute()
    assert prune_record() == (True, 16)


def test_latency_precision_joins_the_prune_key_only_with_a_latency_target():
    """Toggling the quantize stage must not re-run a prune stage whose widths it cannot change: with an
    explicit round_to and a MAC target, latency_precision (unused) stays out of the key."""
    from deploycraft.stages.prune import PruneStage

    def derived(quantize_enabled: bool, **prune):
        raw = chain(round_to=8, finetune=None, steps=1, **prune)
        raw["stages"][3]["enabled"] = quantize_enabled
        recipe = build_recipe(raw)
        return PruneStage.derived(recipe, recipe.stages[1])

    assert derived(True, target_macs=0.8) == derived(False, target_macs=0.8) == {"round_to": 8}
    latency = {"target_macs": None, "target_latency_ms": 5.0}
    assert derived(True, **latency) == {"round_to": 8, "latency_precision": "int8"}
    assert derived(False, **latency) == {"round_to": 8, "latency_precision": "fp32"}


def test_prune_settings_its_objective_ignores_stay_out_of_the_key():
    """latency_batch_size under a MAC target, or taylor_batches under L1 importance, change no pruned width:
    the key stays; under a latency target (or Taylor importance) they join it."""
    from deploycraft.stages.prune import PruneStage

    def key(**prune):
        raw = chain(round_to=8, finetune=None, steps=1, **prune)
        return PruneStage.key_config(build_recipe(raw).stages[1])

    macs = key(target_macs=0.8, importance="l1")
    assert key(target_macs=0.8, importance="l1", latency_batch_size=8, latency_threads=1, taylor_batches=3) == macs
    latency = {"target_macs": None, "target_latency_ms": 5.0}
    assert key(**latency, latency_batch_size=8) != key(**latency)
    assert key(target_macs=0.8, importance="taylor", taylor_batches=3) != key(target_macs=0.8, importance="taylor")
