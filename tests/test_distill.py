"""Knowledge distillation: the loss behaves as defined; feature adapters bridge pruned widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deploycraft.distill import Distiller, kd_loss
from deploycraft.models import create_model
from deploycraft.pruning import PruneSettings, pruned_copy


def test_kd_loss_limits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    assert kd_loss(t, t, y, 4.0, 1.0).abs() < 1e-6  # matching the teacher costs nothing
    soft = kd_loss(s, t, y, 4.0, 1.0)
    manual = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(soft, manual, atol=1e-6)


def test_temperature_scaling_keeps_gradient_magnitude():
    """The T^2 factor keeps soft-target gradients on the same scale across temperatures (Hinton et al.)."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 10, generator=g) * 0.5
    s0 = torch.randn(64, 10, generator=g) * 0.5
    norms = []
    for temp in (2.0, 8.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, torch.zeros(64, dtype=torch.long), temp, 1.0).backward()
        norms.append(s.grad.norm().item())
    assert 0.5 < norms[0] / norms[1] < 2.0


def test_feature_distillation_with_pruned_student():
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=10).eval()
    student = pruned_copy(teacher, 0.5, PruneSettings(round_to=8), (3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    d = Distiller(student, teacher, 4.0, 0.9, 1.0, x[:2])
    try:
        assert d.adapters is not None
        widths = {
            n: a.in_channels
            for n, a in zip(d.adapters.names, d.adapters.adapters.values(), strict=True)
            if isinstance(a, torch.nn.Conv2d)
        }
        assert widths, "pruned stages need 1x1 adapters"
        student.train()
        loss, logits = d.loss(student, x, torch.randint(0, 10, (4,)))
        loss.backward()
        assert logits.shape == (4, 10)
        assert all(p.grad is not None for p in d.adapters.parameters())
        assert all(p.grad is None for p in teacher.parameters())
    finally:
        d.close()


def test_feature_distillation_needs_matching_stages():
    a = create_model("resnet20", num_classes=10)
    b = create_model("resnet50", num_classes=10)
    with pytest.raises(ValueError, match="stage_names"):
        Distiller(a, b, 4.0, 0.9, 1.0, torch.randn(2, 3, 32, 32))
