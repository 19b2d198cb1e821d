"""Acceptance 4: generated bad recipes (mutated keys, types, values, nesting, aliases, tags, bad
calibration files and checkpoints) all stop with exit 2 and one line, in `validate` and in `run`,
before any stage starts, each in under 2 s and 500 MB; what `validate` accepts, `run`'s checks accept.

The CLI runs in-process (typer's CliRunner over the real app), so the 2 s bound measures deploycraft,
not the interpreter's start-up; test_inputs.py checks a few of the same cases in a real subprocess.
"""

from __future__ import annotations

import copy
import random
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from deploycraft.cli import app
from tests.conftest import smoke_recipe

N_CASES = 240
SEED = 20261128


def _paths(node, prefix=()):
    """Every (path, value) in a nested dict/list."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(raw, path, value):
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


WRONG_TYPES = ["many", [1, 2], {"a": 1}, None, True, -3.5, "", [[[]]]]
BAD_VALUES = {
    "epochs": [-1, 10**12 + 0.5, "1e3"],
    "lr": [0, -0.1, float("inf"), float("nan")],
    "batch_size": [0, -64],
    "image_size": [3, 100000],
    "percentile": [0, 200],
    "num_calibration": [0],
    "batch_sizes": [[], [0], [-1]],
    "repeats": [0, 1],
    "momentum": [1.5],
    "channels": [2, 4],
    "mean": [[0.5], [float("nan")] * 3],
    "std": [[0.0, 0.1, 0.1], [-1.0] * 3],
    "arch": ["resnet19", "../../etc/passwd", ""],
    "name": ["../x", "", "a/b", " "],
    "dataset": ["mnist", 3],
    "num_classes": [0, -10, 5],
    "type": ["tensorrt", "train2", None],
    "target": ["coreml", ""],
    "max_accuracy_drop": [2.0, -0.1],
    "warmup_epochs": [-1],
}


def _mutate_structure(rng, raw, tmp: Path) -> tuple[str, str]:
    """A mutated recipe as YAML text, and the kind of mutation."""
    kind = rng.choice(
        ["key", "type", "value", "nest", "stage_order", "stage_dup", "calibration", "checkpoint", "teacher"]
    )
    leaves = [(p, v) for p, v in _paths(raw) if p]
    if kind == "key":
        path, _ = rng.choice([(p, v) for p, v in leaves if isinstance(p[-1], str)])
        parent = raw
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1] + rng.choice(["x", "_", "s", "Z"])] = parent.pop(path[-1])
    elif kind == "type":
        path, value = rng.choice([(p, v) for p, v in leaves if not isinstance(v, (dict, list))])
        choices = [w for w in WRONG_TYPES if type(w) is not type(value)]
        _set(raw, path, rng.choice(choices))
    elif kind == "value":
        path, _ = rng.choice([(p, v) for p, v in leaves if isinstance(p[-1], str) and p[-1] in BAD_VALUES])
        _set(raw, path, rng.choice(BAD_VALUES[path[-1]]))
    elif kind == "nest":
        depth = rng.choice([40, 200, 5000])
        opener, closer = rng.choice([("[", "]"), ("{k: ", "}")])
        raw["model"]["kwargs"] = {"deep": "NEST"}
        text = yaml.safe_dump(raw, sort_keys=False)
        return text.replace("NEST", opener * depth + "1" + closer * depth), kind
    elif kind == "stage_order":
        rng.shuffle(raw["stages"])
        if [s["type"] for s in raw["stages"]] == ["train", "quantize", "export", "verify"]:
            raw["stages"].reverse()
    elif kind == "stage_dup":
        raw["stages"].insert(rng.randrange(len(raw["stages"])), copy.deepcopy(rng.choice(raw["stages"])))
    elif kind == "calibration":
        path = tmp / f"calib{rng.randrange(10**9)}.npz"
        _bad_calibration(rng, path)
        raw["data"]["calibration"] = str(path)
    elif kind == "checkpoint":
        path = tmp / f"w{rng.randrange(10**9)}.pt"
        _bad_checkpoint(rng, path)
        raw["model"]["weights"] = str(path)
    elif kind == "teacher":
        path = tmp / f"t{rng.randrange(10**9)}.pt"
        _bad_checkpoint(rng, path)
        raw["stages"].insert(1, {"type": "distill", "epochs": 1, "teacher": {"arch": "resnet20", "weights": str(path)}})
    return yaml.safe_dump(raw, sort_keys=False), kind


def _bad_calibration(rng, path: Path) -> None:
    images, labels = np.zeros((8, 3, 16, 16), np.uint8), np.arange(8) % 10
    choice = rng.randrange(7)
    if choice == 0:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400))))
    elif choice == 1:
        np.savez(path, images=images, labels=labels)
        path.write_bytes(path.read_bytes()[: rng.randrange(1, 400)])
    elif choice == 2:
        np.savez(path, images=images[:0], labels=labels[:0])
    elif choice == 3:
        np.savez(path, images=images.transpose(0, 2, 3, 1), labels=labels)
    elif choice == 4:
        np.savez(path, images=images.astype(np.float32), labels=labels)
    elif choice == 5:
        np.savez(path, images=images, labels=labels.astype(np.float64) + 0.5)
    else:
        np.savez(path, images=np.zeros((8, 5, 16, 16), np.uint8), labels=labels)


def _bad_checkpoint(rng, path: Path) -> None:
    from deploycraft.models import create_model

    choice = rng.randrange(7)
    state = create_model("resnet20", num_classes=10).state_dict()
    if choice == 0:
        path.write_bytes(b"")
    elif choice == 1:
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: rng.randrange(1, 5000)])
    elif choice == 2:
        state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
        torch.save(state, path)
    elif choice == 3:
        state["conv1.weight"] = torch.zeros(7, 7)
        torch.save(state, path)
    elif choice == 4:
        torch.save(
            {"format": "deploycraft.model/1", "spec": rng.choice([[], "x", {"widths": 3}]), "model": state}, path
        )
    elif choice == 5:
        torch.save({"not": "weights"}, path)
    else:
        torch.save({"format": "deploycraft.model/1", "spec": {"widths": {"fc": {"type": "Linear", "bad": 1}}}}, path)


TEXT_ATTACKS = [
    # YAML tags that would build objects; aliases; syntax
    lambda rng: (
        "name: !!python/object/apply:os.system ['echo pwned']\nmodel: {arch: resnet20}\nstages: [{type: train}]\n"
    ),
    lambda rng: "name: x\nmodel: !!python/name:os.system {}\nstages: [{type: train}]\n",
    lambda rng: "name: x\nmodel: {arch: resnet20, kwargs: !!binary aGVsbG8=}\nstages: [{type: train}]\n",
    lambda rng: _alias_bomb(rng.randrange(6, 12)),
    lambda rng: "name: x\nmodel: &m {arch: resnet20, kwargs: {self: *m}}\nstages: [{type: train}]\n",
    lambda rng: "name: x\nmodel: {arch: resnet20\nstages: [",
    lambda rng: "name: x\nname: y\nmodel: {arch: resnet20}\nstages: [{type: train}]\n",
    lambda rng: "- just\n- a list\n",
    lambda rng: "",
    lambda rng: "\t\x00\x01",
]


def _alias_bomb(levels: int) -> str:
    lines = ["  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return (
        "name: bomb\nmodel:\n  arch: resnet20\n  kwargs:\n"
        + "\n".join("  " + x for x in lines)
        + "\nstages: [{type: train}]\n"
    )


def _cases(tmp: Path) -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    cases = []
    for i in range(N_CASES):
        if i % 6 == 5:
            cases.append((rng.choice(TEXT_ATTACKS)(rng), "text"))
        else:
            cases.append(_mutate_structure(rng, smoke_recipe(), tmp))
    return cases


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports kB)


def _invoke(runner, args) -> tuple[int, str, float, int]:
    """Exit code, stderr, seconds, and how far the process's peak memory rose during the call."""
    peak_before = _maxrss()
    started = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - started
    return result.exit_code, result.stderr, seconds, _maxrss() - peak_before


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    runner = CliRunner()
    # Warm up once (imports, the model zoo, torch.load): the bounds are for each recipe, not start-up.
    warm = tmp / "warm.pt"
    from deploycraft.models import create_model

    torch.save(create_model("resnet20", num_classes=10).state_dict(), warm)
    (tmp / "warm.yaml").write_text(yaml.safe_dump(smoke_recipe(model={"arch": "resnet20", "weights": str(warm)})))
    assert runner.invoke(app, ["validate", str(tmp / "warm.yaml")]).exit_code == 0
    results = []
    for i, (text, kind) in enumerate(_cases(tmp)):
        path = tmp / f"r{i}.yaml"
        path.write_text(text)
        out = tmp / f"run{i}"
        v = _invoke(runner, ["validate", str(path)])
        r = _invoke(runner, ["run", str(path), "--output-dir", str(out)]) if v[0] != 0 else None
        results.append({"i": i, "kind": kind, "text": text[:300], "validate": v, "run": r, "out": out, "path": path})
    return results


def test_at_least_200_bad_recipes(fuzz_results):
    rejected = [r for r in fuzz_results if r["validate"][0] != 0]
    assert len(rejected) >= 200, f"only {len(rejected)} of {len(fuzz_results)} mutants were bad"
    assert len({r["kind"] for r in rejected}) >= 9


def test_every_bad_recipe_exits_2_with_one_line(fuzz_results):
    for r in fuzz_results:
        for name in ("validate", "run"):
            res = r[name]
            if res is None or (name == "validate" and res[0] == 0):
                continue
            code, stderr, _, _ = res
            lines = [x for x in stderr.splitlines() if x.strip()]
            assert code == 2, (name, r["kind"], r["text"], stderr)
            assert len(lines) == 1 and lines[0].startswith("error: ") and " — fix: " in lines[0], (name, stderr)
            assert "Traceback" not in stderr


def test_validate_and_run_agree_and_nothing_starts(fuzz_results):
    for r in fuzz_results:
        if r["run"] is None:
            continue
        assert r["run"][1] == r["validate"][1], (r["kind"], r["validate"][1], r["run"][1])
        assert not r["out"].exists(), r["kind"]  # refused before the run folder is made


def test_each_within_2_s_and_500_mb(fuzz_results):
    worst_s = max(res[2] for r in fuzz_results for res in (r["validate"], r["run"]) if res)
    worst_mb = max(res[3] for r in fuzz_results for res in (r["validate"], r["run"]) if res) / 2**20
    assert worst_s < 2.0, worst_s
    assert worst_mb < 500, worst_mb  # the most the process's peak memory rose during one call


def test_what_validate_accepts_run_accepts(fuzz_results, tmp_path):
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import load_recipe

    accepted = [r for r in fuzz_results if r["validate"][0] == 0]
    for r in accepted:
        Pipeline(load_recipe(r["path"]), tmp_path / f"ok{r['i']}").preflight()  # raises if run would refuse
