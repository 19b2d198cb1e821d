"""Model persistence without pickled modules, and user checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deploycraft.errors import UserError
from deploycraft.models import create_model
from deploycraft.models.io import apply_widths, load_checkpoint, load_model, read_spec, save_model, width_diff


def test_save_load_roundtrip_identical_outputs(tmp_path, tiny_resnet):
    save_model(tiny_resnet, tmp_path / "m", "resnet20", {"num_classes": 10, "in_chans": 3})
    again = load_model(tmp_path / "m")
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(tiny_resnet(x), again(x))
    assert read_spec(tmp_path / "m")["widths"] == {}


def test_resized_layers_are_recorded_and_rebuilt(tmp_path):
    model = create_model("resnet20", num_classes=10)
    # Shrink one branch by hand, as pruning would: conv1 16 -> 8 output channels, bn1 and conv2 follow.
    block = model.layer1[0]
    block.conv1 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    block.bn1 = nn.BatchNorm2d(8)
    block.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    diff = width_diff(model, create_model("resnet20", num_classes=10))
    assert set(diff) == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    model.eval()
    save_model(model, tmp_path / "m", "resnet20", {"num_classes": 10})
    again = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), again(x))
    rebuilt = apply_widths(create_model("resnet20", num_classes=10), diff)
    assert rebuilt.layer1[0].conv1.out_channels == 8


def _pruned(tmp_path) -> tuple[nn.Module, Path]:
    """A resnet20 with one block's inner width halved and another block removed, as a run folder's
    deploy/torch/ holds it (spec.json + weights.pt)."""
    model = create_model("resnet20", num_classes=10)
    block = model.layer1[0]
    block.conv1 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    block.bn1 = nn.BatchNorm2d(8)
    block.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    model.layer2[1] = nn.Identity()
    return model.eval(), save_model(model, tmp_path / "deploy" / "torch", "resnet20", {"num_classes": 10})


def test_a_pruned_models_weights_are_named_as_such_with_the_way_to_load_them(tmp_path):
    import subprocess
    import sys

    model, folder = _pruned(tmp_path)
    with pytest.raises(UserError) as info:
        load_checkpoint(create_model("resnet20", num_classes=10), folder / "weights.pt")
    err = info.value
    assert err.field == "model.weights" and "holds a pruned resnet20 (4 layer(s) resized or removed" in err.message
    assert "layer1.0.conv1.weight is (8, 16, 3, 3), the model has (16, 16, 3, 3)" in err.message
    # the fix's command packs spec and weights into one file, which loads as the pruned model
    command = err.fix.split("weights file: ", 1)[1].split(", then set", 1)[0]
    assert command.startswith('python -c "')
    subprocess.run([sys.executable, "-c", command[len('python -c "') : -1]], cwd=tmp_path, check=True)
    again = load_checkpoint(create_model("resnet20", num_classes=10), tmp_path / "pruned.pt")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), again.eval()(x))
    # depth pruning alone (keys missing, no shape differs) is named too
    only_depth = create_model("resnet20", num_classes=10)
    only_depth.layer2[1] = nn.Identity()
    folder = save_model(only_depth, tmp_path / "depth", "resnet20", {"num_classes": 10})
    with pytest.raises(UserError, match=r"holds a pruned resnet20 \(1 layer\(s\) .* missing key"):
        load_checkpoint(create_model("resnet20", num_classes=10), folder / "weights.pt")


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_torchvision_style_checkpoint_loads(tmp_path):
    src = create_model("resnet18", num_classes=10)
    path = _save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.pth")
    dst = load_checkpoint(create_model("resnet18", num_classes=10), path)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_rgb_checkpoint_into_grey_model(tmp_path):
    src = create_model("resnet18", num_classes=10, in_chans=3)
    path = _save(src.state_dict(), tmp_path / "c.pth")
    dst = load_checkpoint(create_model("resnet18", num_classes=10, in_chans=1), path)
    assert torch.allclose(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_classifier_mismatch_and_reset(tmp_path):
    path = _save(create_model("resnet18", num_classes=1000).state_dict(), tmp_path / "c.pth")
    with pytest.raises(UserError) as info:
        load_checkpoint(create_model("resnet18", num_classes=10), path)
    assert info.value.field == "model.num_classes" and "reset_classifier" in info.value.fix
    model = load_checkpoint(create_model("resnet18", num_classes=10), path, reset_classifier=True)
    assert model.fc.out_features == 10


def test_checkpoint_without_batchnorm_counters_loads_under_strict_as_torch_does(tmp_path):
    """Files from before PyTorch 0.4.1 (torchvision's original downloads among them) have no
    num_batches_tracked; torch's strict loading accepts them, keeping each BN's own counter."""
    src = create_model("resnet18", num_classes=10)
    src.train()(torch.randn(2, 3, 32, 32))  # running statistics that differ from a fresh build
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = _save(old, tmp_path / "c.pth")
    ours = load_checkpoint(create_model("resnet18", num_classes=10), path, strict=True)
    theirs = create_model("resnet18", num_classes=10)
    theirs.load_state_dict(dict(old), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    # any other key missing is still refused under strict
    del old["layer1.0.bn1.running_mean"]
    with pytest.raises(UserError) as info:
        load_checkpoint(create_model("resnet18", num_classes=10), _save(old, tmp_path / "d.pth"), strict=True)
    assert "1 missing key(s) (layer1.0.bn1.running_mean)" in info.value.message


def test_wrong_architecture(tmp_path):
    path = _save(create_model("resnet18", num_classes=10).state_dict(), tmp_path / "c.pth")
    with pytest.raises(UserError) as info:
        load_checkpoint(create_model("resnet34", num_classes=10), path)
    assert "missing key" in info.value.message and info.value.field == "model.weights"


def test_pickled_module_is_refused(tmp_path):
    path = _save(create_model("resnet20", num_classes=10), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint(create_model("resnet20", num_classes=10), path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        load_checkpoint(create_model("resnet20", num_classes=10), path)
