"""The data-parallel helpers that need no second process (the launched runs are in tests/integration)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deploycraft.distributed import World, launched, sync_batchnorm
from deploycraft.errors import UserError
from deploycraft.models import create_model
from deploycraft.stages.train import TrainConfig, train_epochs


def test_a_single_process_world_passes_everything_through(tiny_resnet):
    world = World()
    assert world.size == 1 and world.is_main and not world.parallel and world.shard is None and world.label == ""
    record = {"a": [1, 2.5]}
    assert world.publish(record) is record
    assert world.claim_failure("anything") and world.failure() is None
    assert world.broadcast_bytes(b"xyz") == b"xyz" and world.all_reduce_sum([1, 2]) == [1, 2]
    assert world.wrap(tiny_resnet, "cpu") is tiny_resnet


def test_not_launched_without_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()


def test_sync_batchnorm_trains_the_models_own_batchnorm_layers():
    model = create_model("resnet20", num_classes=10)
    weight, mean = model.bn1.weight, model.bn1.running_mean
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with sync_batchnorm(model, True):
        assert isinstance(model.bn1, nn.SyncBatchNorm) and model.bn1.weight is weight
        with torch.no_grad():
            model.bn1.weight.add_(1.0)
            model.bn1.running_mean.add_(2.0)
    assert type(model.bn1) is nn.BatchNorm2d and model.bn1.weight is weight and model.bn1.running_mean is mean
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert torch.equal(model.state_dict()["bn1.weight"], before["bn1.weight"] + 1.0)
    assert torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"] + 2.0)


class _TwoRanks(World):
    """A world that claims two ranks but never talks: enough to reach the checks before any collective."""

    def __init__(self):
        super().__init__(rank=0, size=2)


def test_sync_batchnorm_on_cpu_is_a_user_error(tmp_path):
    cfg = TrainConfig(epochs=1, sync_batchnorm=True)
    with pytest.raises(UserError, match="sync_batchnorm needs GPUs") as info:
        train_epochs(create_model("resnet20"), None, cfg, tmp_path, 0, world=_TwoRanks())
    assert info.value.field == "stages.train.sync_batchnorm"
