"""Sharding for data-parallel runs: each rank's part of a global batch, augmented as in one process."""

from __future__ import annotations

import pytest
import torch

from deploycraft.data import DataModule
from deploycraft.data.transforms import Augment
from deploycraft.recipe import DataConfig
from tests.data.test_datasets import make_imagefolder


def synthetic(n_train: int = 133, n_val: int = 70) -> DataModule:
    cfg = DataConfig(dataset="synthetic", image_size=16, train_subset=n_train, val_subset=n_val)
    return DataModule(cfg, seed=3)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_parts_put_together_are_the_single_process_batches(world_size):
    """133 = 2 x 64 + 5: with 3 ranks the last batch splits 2/2/1; images, labels and augmentation match."""
    dm, aug = synthetic(), Augment(crop_padding=4, hflip=True)
    whole = list(dm.train_epoch(64, epoch=2, augment=aug))
    parts = [list(dm.train_epoch(64, epoch=2, augment=aug, shard=(r, world_size))) for r in range(world_size)]
    assert all(len(p) == len(whole) for p in parts)
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    assert [len(p[-1][1]) for p in parts] == {1: [5], 2: [3, 2], 3: [2, 2, 1]}[world_size]


def test_an_empty_part_of_a_last_small_batch():
    dm = synthetic(n_train=129)  # 2 x 64 + 1
    last = [list(dm.train_epoch(64, epoch=0, augment=None, shard=(r, 2)))[-1] for r in range(2)]
    assert [len(y) for _, y in last] == [1, 0]
    assert last[1][0].shape == (0, 3, 16, 16)


def test_imagefolder_parts_match_the_whole(tmp_path):
    make_imagefolder(tmp_path, per_class=5)  # 10 training images, batches of 4: 4 + 4 + 2
    dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16), seed=0)
    aug = Augment(crop_padding=2, hflip=True)
    whole = list(dm.train_epoch(4, epoch=1, augment=aug))
    parts = [list(dm.train_epoch(4, epoch=1, augment=aug, shard=(r, 3))) for r in range(3)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    assert parts[2][-1][0].shape == (0, 3, 16, 16)  # the last batch of 2 leaves rank 2 nothing


def test_held_out_batches_go_to_one_rank_each():
    dm = synthetic(n_val=70)  # batches of 16: 5 batches, the last of 6
    whole = list(dm.val_batches(16))
    parts = [list(dm.val_batches(16, shard=(r, 2))) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2] == [dm.num_val_batches(16, (r, 2)) for r in range(2)]
    interleaved = [parts[i % 2][i // 2] for i in range(len(whole))]
    for (x, y), (px, py) in zip(whole, interleaved, strict=True):
        assert torch.equal(x, px) and torch.equal(y, py)


def test_batches_prepared_on_a_named_device_are_the_cpu_batches():
    """``device`` moves the uint8 images before they are prepared; on the CPU that changes nothing at all (the
    GPU case is tests/test_gpu.py). Resized (native 32 px to 24), cropped, flipped, sharded and held out."""
    dm = DataModule(DataConfig(dataset="synthetic", image_size=24, train_subset=70, val_subset=40), seed=3)
    aug = Augment(crop_padding=3, hflip=True)
    for shard in (None, (1, 2)):
        ref = list(dm.train_epoch(16, epoch=1, augment=aug, shard=shard))
        got = list(dm.train_epoch(16, epoch=1, augment=aug, shard=shard, device="cpu"))
        assert len(got) == len(ref)
        for (x, y), (gx, gy) in zip(ref, got, strict=True):
            assert x.shape[-1] == 24 and torch.equal(gx, x) and torch.equal(gy, y)
        for (x, y), (gx, gy) in zip(dm.val_batches(16, shard), dm.val_batches(16, shard, "cpu"), strict=True):
            assert torch.equal(gx, x) and torch.equal(gy, y)


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_preparation_keeps_every_tensor_on_the_images_device(channels):
    """On the meta device (shapes only) any constant left on the CPU (normalization, luma weights, flips) raises:
    a GPU-free check of what training on CUDA needs."""
    dm = DataModule(DataConfig(dataset="synthetic", image_size=24, channels=channels, train_subset=40, val_subset=20))
    aug = Augment(crop_padding=3, hflip=True)
    for x, _ in list(dm.train_epoch(16, 0, aug, device="meta")) + list(dm.val_batches(16, device="meta")):
        assert x.is_meta and x.shape[1:] == (channels, 24, 24)
