"""Shared test helpers: tiny recipes, data availability, CLI invocation."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# One intra-op thread by default: the unit tests use tiny tensors, where thread start-up costs more
# than it saves, and on a loaded machine spinning OpenMP threads slow small models down many times.
torch.set_num_threads(int(os.environ.get("DEPLOYCRAFT_TEST_THREADS", "1")))
# No idle pause before timed blocks in tests (it makes measurements fair, tests do not measure; its own
# test sets it): in this process and in every CLI run the tests start.
os.environ.setdefault("DEPLOYCRAFT_BENCH_IDLE_S", "0")


def fashion_mnist_available() -> bool:
    from deploycraft.data import fashion_mnist

    return any(all((d / f).is_file() for f in fashion_mnist.FILES) for d in fashion_mnist.candidate_dirs(None))


needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; `make setup` does it as root)",
)

SMOKE_RECIPE = {
    "name": "smoke",
    "seed": 0,
    "model": {"arch": "resnet20", "num_classes": 10},
    "data": {"dataset": "synthetic", "image_size": 16, "channels": 3, "train_subset": 256, "val_subset": 128},
    "stages": [
        {"type": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "eval_each_epoch": False},
        {"type": "quantize", "num_calibration": 64},
        {"type": "export"},
        # The ceiling costs seconds per run; test_pipeline's smoke run measures it.
        {"type": "verify", "batch_sizes": [1], "repeats": 5, "warmup": 1, "max_accuracy_drop": 1.0, "ceiling": False},
    ],
}


def smoke_recipe(**changes) -> dict:
    """A deep copy of the smoke recipe with top-level sections updated (dicts merged one level deep)."""
    r = copy.deepcopy(SMOKE_RECIPE)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(r.get(key), dict):
            r[key].update(value)
        else:
            r[key] = value
    return r


def write_recipe(path: Path, recipe: dict | str) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "deploycraft", *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def tiny_resnet():
    from deploycraft.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=3)
    randomize_bn(model)
    return model.eval()


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.rand(n, generator=gen) - 0.5
            m.running_mean = torch.rand(n, generator=gen) - 0.5
            m.running_var = torch.rand(n, generator=gen) + 0.5


@contextlib.contextmanager
def killed_after_epoch(monkeypatch, epoch: int = 1):
    """Training dies (as if killed) right after it wrote the checkpoint of ``epoch``; restored on exit."""
    from deploycraft.stages import train as train_module

    save = train_module.save_epoch_checkpoint

    def save_then_die(path, state):
        save(path, state)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt(f"killed after epoch {epoch}")

    monkeypatch.setattr(train_module, "save_epoch_checkpoint", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(train_module, "save_epoch_checkpoint", save)
