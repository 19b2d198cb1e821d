"""Batch transforms: any dataset to any model input, reproducibly."""

from __future__ import annotations

import torch

from deploycraft.data.transforms import Augment, InputSpec, convert_channels, prepare_batch


def test_grey_to_rgb_resize_normalize():
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    spec = InputSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = prepare_batch(images, spec)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x), atol=1e-5)


def test_rgb_to_grey_uses_luma():
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[:, 1] = 1.0
    assert torch.allclose(convert_channels(rgb, 1), torch.full((1, 1, 2, 2), 0.587))


def test_augmentation_is_reproducible_and_changes_images():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = InputSpec(28, 1, (0.0,), (1.0,))
    a = prepare_batch(images, spec, Augment(4, True), torch.Generator().manual_seed(5))
    b = prepare_batch(images, spec, Augment(4, True), torch.Generator().manual_seed(5))
    plain = prepare_batch(images, spec)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)


def test_synthetic_splits_share_classes():
    from deploycraft.data import synthetic_source

    train, val = synthetic_source(200, seed=0), synthetic_source(200, seed=1)
    # class means agree across splits (same patterns), images differ (different noise)
    for c in range(10):
        a = train.images[train.labels == c].float().mean(0)
        b = val.images[val.labels == c].float().mean(0)
        assert (a - b).abs().mean() < 12
    assert not torch.equal(train.images, val.images)
