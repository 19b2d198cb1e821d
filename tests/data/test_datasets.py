"""Fashion-MNIST lookup and checks, ImageFolder decoding, calibration subsets."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from deploycraft.data import (
    SHIPPED_CALIBRATION,
    DataModule,
    class_balanced_indices,
    fashion_mnist,
    load_calibration_file,
)
from deploycraft.errors import UserError
from deploycraft.recipe import DataConfig
from tests.conftest import needs_fmnist


@needs_fmnist
def test_fashion_mnist_splits():
    folder = fashion_mnist.locate()
    x, y = fashion_mnist.load_split(folder, "test")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


@needs_fmnist
def test_corrupt_file_is_detected(tmp_path):
    src = fashion_mnist.locate()
    for name in fashion_mnist.FILES:
        shutil.copy(src / name, tmp_path / name)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00" * 100)
    with pytest.raises(UserError, match="checksum"):
        fashion_mnist.load_split(tmp_path, "test")


def test_missing_dataset_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DEPLOYCRAFT_DATA", raising=False)
    with pytest.raises(UserError) as info:
        fashion_mnist.locate(None, download=False)
    assert "apt-get install dataset-fashion-mnist" in info.value.fix
    with pytest.raises(UserError, match="lacks"):
        fashion_mnist.locate(tmp_path, download=False)


def test_explicit_root_is_used_alone(tmp_path, monkeypatch):
    """A data.root without the files is an error even where a default folder has them."""
    default = tmp_path / "default"
    default.mkdir()
    for name in fashion_mnist.FILES:
        (default / name).write_bytes(b"complete-looking default")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", default)
    monkeypatch.delenv("DEPLOYCRAFT_DATA", raising=False)
    root = tmp_path / "mine"
    root.mkdir()
    assert fashion_mnist.candidate_dirs(root) == [root]
    for download in (False, True):
        with pytest.raises(UserError, match="lacks") as info:
            fashion_mnist.locate(root, download=download)
        assert info.value.field == "data.root" and str(root) in info.value.message


def _fake_gz(folder, name, data: bytes):
    with gzip.open(folder / name, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize(
    "write, needle",
    [
        (lambda p, n: (p / n).write_bytes(b"junk"), "is not a gzip file"),
        (lambda p, n: (p / n).write_bytes(b"\x1f\x8b junk after the magic"), "cannot be read as gzip"),
        (lambda p, n: _fake_gz(p, n, b"\x00" * 100), "does not hold the IDX data"),
        (lambda p, n: _fake_gz(p, n, fashion_mnist.IDX_HEADERS[n][1] + b"\x00" * 100), "truncated or altered"),
    ],
)
def test_damaged_files_in_root_are_caught_before_reading(tmp_path, write, needle):
    for name in fashion_mnist.FILES:
        write(tmp_path, name)
    with pytest.raises(UserError, match=needle) as info:
        fashion_mnist.locate(tmp_path, download=False)
    assert info.value.field == "data.root" and "train-images-idx3-ubyte.gz" in info.value.message


def test_undecompressable_file_is_a_user_error_when_read(tmp_path):
    for name in fashion_mnist.FILES:
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot be decompressed") as info:
        fashion_mnist.load_split(tmp_path, "test")
    assert info.value.field == "data.root"


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fashion_mnist, "MIRROR", "http://127.0.0.1:9/")  # nothing listens on the discard port
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DEPLOYCRAFT_DATA", raising=False)
    with pytest.raises(UserError, match="download failed"):
        fashion_mnist.locate(None, download=True)


def make_imagefolder(root, classes=("cat", "dog"), per_class=6, size=20, splits=("train", "val")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.full((size, size + 4, 3), (60 + 120 * k) % 216, dtype=np.uint8)
                noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_module(tmp_path):
    make_imagefolder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, image_size=16, channels=1)
    dm = DataModule(cfg, seed=0)
    assert dm.class_names == ["cat", "dog"] and dm.num_val == 12 and dm.num_train == 12
    x, y = next(dm.val_batches(5))
    assert x.shape == (5, 1, 16, 16) and y.tolist() == [0, 0, 0, 0, 0]
    images, provenance = dm.calibration_images(4)
    assert images.shape == (4, 3, 16, 16) and "training split" in provenance
    batches = list(dm.train_epoch(4, epoch=0, augment=None))
    assert sum(len(b[1]) for b in batches) == 12


def test_held_out_classes_the_training_split_lacks_are_an_error(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b", "c"), per_class=2, splits=("train",))
    make_imagefolder(tmp_path, classes=("a", "b", "c", "d", "z"), per_class=2, splits=("val",))
    with pytest.raises(UserError) as info:
        DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16), seed=0)
    assert info.value.field == "data.val_split"
    assert str(tmp_path / "val") in info.value.message and "(d, z)" in info.value.message
    # a held-out split lacking a training class is fine: the labels still follow the training split
    make_imagefolder(tmp_path / "fewer", classes=("a", "b", "c"), per_class=2, splits=("train",))
    make_imagefolder(tmp_path / "fewer", classes=("a", "c"), per_class=2, splits=("val",))
    dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path / "fewer", image_size=16), seed=0)
    assert dm.num_val == 4 and sorted(set(dm.val.labels.tolist())) == [0, 2]


def test_an_image_replaced_in_place_changes_the_data_fingerprint(tmp_path):
    """The stages' cache key sees an image rewritten with other content of the same size (a new mtime)."""
    import os

    from deploycraft.pipeline import data_fingerprint
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    make_imagefolder(tmp_path)
    recipe = build_recipe(smoke_recipe(data={"dataset": "imagefolder", "root": str(tmp_path), "image_size": 16}))
    before = data_fingerprint(recipe)
    assert set(before) == {"train", "val"} and data_fingerprint(recipe) == before
    image = tmp_path / "train" / "dog" / "3.png"
    other = tmp_path / "train" / "cat" / "3.png"
    st = image.stat()
    data = other.read_bytes()[: st.st_size].ljust(st.st_size, b"\0")
    image.write_bytes(data)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = data_fingerprint(recipe)
    assert image.stat().st_size == st.st_size and after["train"] != before["train"] and after["val"] == before["val"]


def test_the_data_fingerprint_covers_exactly_the_images_a_split_reads(tmp_path):
    """A class folder that is a link (images kept elsewhere) is read by the split, so an image replaced there
    re-runs the stages; notes, hidden files and a class-less top-level file are not read, so they do not."""
    import os
    import shutil

    from deploycraft.pipeline import data_fingerprint
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    make_imagefolder(tmp_path / "store")
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "cat").symlink_to(tmp_path / "store" / split / "cat", target_is_directory=True)
        shutil.copytree(tmp_path / "store" / split / "dog", root / split / "dog")
    recipe = build_recipe(smoke_recipe(data={"dataset": "imagefolder", "root": str(root), "image_size": 16}))
    before = data_fingerprint(recipe)
    (root / "train" / "README.txt").write_text("where the images came from")
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "dog" / "notes.txt").write_text("checked")
    assert data_fingerprint(recipe) == before
    image = tmp_path / "store" / "train" / "cat" / "0.png"
    st = image.stat()
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = data_fingerprint(recipe)
    assert after["train"] != before["train"] and after["val"] == before["val"]
    # an empty class folder is a label: renaming it renumbers the classes after it
    (root / "train" / "aaa").mkdir()
    with_empty = data_fingerprint(recipe)
    assert with_empty["train"] != after["train"]
    (root / "train" / "aaa").rename(root / "train" / "zzz")
    assert data_fingerprint(recipe)["train"] != with_empty["train"]


def test_broken_image_is_a_user_error(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "val" / "cat" / "broken.png").write_bytes(b"not a png")
    dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16), seed=0)
    with pytest.raises(UserError, match="cannot decode"):
        list(dm.val_batches(32))


def test_broken_image_in_a_worker_process_is_the_same_one_line(tmp_path):
    """With data.num_workers, a UserError raised in a DataLoader worker reaches the user as it was (message, field,
    fix), not as torch's flattened worker traceback ("Caught UserError in DataLoader worker process 0...")."""
    make_imagefolder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    errors = []
    for workers in (0, 1):
        dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16, num_workers=workers), seed=0)
        for shard in (None, (0, 1)):  # one process's batches, a data-parallel rank's
            with pytest.raises(UserError) as info:
                list(dm.train_epoch(4, 0, None, shard=shard))
            errors.append(info.value.one_line())
    assert len(set(errors)) == 1 and "Traceback" not in errors[0], errors
    assert errors[0].startswith("data.train_split: cannot decode image") and "broken.png" in errors[0]


def test_image_over_the_decompression_bomb_limit_is_a_user_error(tmp_path, monkeypatch):
    """Pillow refuses an image of too many pixels (DecompressionBombError, not an OSError): one line that names the
    file and what to do, not an internal error; the limit itself stays."""
    from PIL import Image

    make_imagefolder(tmp_path)
    dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16), seed=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20x24 images: over twice the limit, as 14000x14000 is
    with pytest.raises(UserError) as info:
        next(dm.train_epoch(4, epoch=0, augment=None))
    assert info.value.field == "data.train_split" and "too large to decode" in info.value.message
    assert str(tmp_path / "train") in info.value.message and "shrink it" in info.value.fix


def test_class_balanced_indices():
    labels = torch.arange(100) % 4
    idx = class_balanced_indices(labels, 10, seed=0)
    assert len(idx) == 10 and sorted(torch.bincount(labels[idx]).tolist()) == [2, 2, 3, 3]
    assert torch.equal(idx, class_balanced_indices(labels, 10, seed=0))


@needs_fmnist
def test_shipped_calibration_file_is_what_its_provenance_says():
    images, labels = load_calibration_file(SHIPPED_CALIBRATION)
    with np.load(SHIPPED_CALIBRATION) as z:
        indices = torch.from_numpy(z["indices"])
    train_x, train_y = fashion_mnist.load_split(fashion_mnist.locate(), "train")
    assert torch.equal(indices, class_balanced_indices(train_y, 512, seed=0))
    assert torch.equal(images, train_x[indices]) and torch.equal(labels, train_y[indices])


@pytest.mark.parametrize(
    "val_split, how",
    [
        ("train", "is also the training split"),
        ("train/.", "is also the training split"),
        ("../data/train", "is also the training split"),
        ("link", "is also the training split"),
        ("absolute", "is also the training split"),
        ("train/cat", "lies inside the training split"),
        (".", "holds the training split"),
    ],
)
def test_held_out_split_that_is_the_training_split_is_refused(tmp_path, val_split, how):
    """However it is spelt, a held-out split that is (or overlaps) the training split would measure the gates and
    the shipped top-1 on training images."""
    root = make_imagefolder(tmp_path / "data", per_class=1)
    (root / "link").symlink_to(root / "train")
    if val_split == "absolute":
        val_split = str((root / "train").resolve())
    with pytest.raises(UserError) as info:
        DataConfig(dataset="imagefolder", root=root, val_split=val_split)
    assert info.value.field == "data.val_split" and how in info.value.message
    assert "training images" in info.value.message
    DataConfig(dataset="imagefolder", root=root, val_split="val")  # apart: fine


@pytest.mark.parametrize("form", ["png16", "pgm16", "tiff32"])
def test_high_bit_depth_images_decode_like_their_8bit_originals(tmp_path, form):
    """A 16-bit (or 32-bit integer) grey image gives the pixels of its 8-bit original (within 1): Pillow's convert
    alone clips such values at 255 and turns the image white."""
    from PIL import Image

    from deploycraft.data.imagefolder import ImageFolderSource

    make_imagefolder(tmp_path / "eight", per_class=2, splits=("val",))
    for src in sorted((tmp_path / "eight").rglob("*.png")):
        grey = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(grey).save(src)  # the 8-bit original
        dst = (tmp_path / "deep" / src.relative_to(tmp_path / "eight")).with_suffix(
            {"png16": ".png", "pgm16": ".pgm", "tiff32": ".tif"}[form]
        )
        dst.parent.mkdir(parents=True, exist_ok=True)
        if form == "tiff32":
            Image.fromarray(grey.astype(np.int32) << 23).save(dst)
        else:
            Image.fromarray(grey.astype(np.uint16) * 257).save(dst)
    eight = ImageFolderSource(tmp_path / "eight" / "val", image_size=16)
    deep = ImageFolderSource(tmp_path / "deep" / "val", image_size=16)
    assert Image.open(deep.samples[0][0]).mode in ("I;16", "I")
    assert len(deep) == len(eight) == 4
    for i in range(len(eight)):
        a, b = eight[i][0].int(), deep[i][0].int()
        assert a.float().mean() > 20 and (a - b).abs().max() <= 1, (i, a.float().mean(), b.float().mean())


@pytest.mark.parametrize("h, w", [(0, 0), (1, 1), (7, 32), (32, 4)])
def test_calibration_images_too_small_are_refused(tmp_path, h, w):
    """Empty or few-pixel calibration images passed with a "will be resized" warning, then failed the quantize
    stage as an internal error."""
    path = tmp_path / "cal.npz"
    np.savez(path, images=np.zeros((4, 3, h, w), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(UserError) as info:
        load_calibration_file(path)
    assert info.value.field == "data.calibration" and str(path) in info.value.message
    assert f"{w}x{h} pixels" in info.value.message and "at least 8x8" in info.value.fix
    np.savez(path, images=np.zeros((4, 3, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    assert load_calibration_file(path)[0].shape == (4, 3, 8, 8)


def test_check_held_out_decodes_every_held_out_image(tmp_path):
    """The train stage's check before its first epoch: each held-out image decoded once (a JPEG at reduced scale,
    which still reads all of it), a truncated one named."""
    from PIL import Image

    make_imagefolder(tmp_path, per_class=2)
    for png in sorted((tmp_path / "val").rglob("*.png")):
        Image.open(png).resize((200, 160)).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, image_size=16)
    DataModule(cfg, seed=0).check_held_out()
    jpeg = tmp_path / "val" / "dog" / "1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    dm = DataModule(cfg, seed=0)
    with pytest.raises(UserError) as info:
        dm.check_held_out()
    assert (
        info.value.field == "data.val_split" and str(jpeg) in info.value.message and "truncated" in info.value.message
    )
    dm.check_held_out(shard=(0, 2))  # rank 0 of two checks images 0 and 2; the broken one (3) is rank 1's


def test_an_empty_class_folder_is_named_when_the_classes_do_not_fit(tmp_path):
    """An empty class folder still counts as a class: the error names it, not only "the data has 3 classes"."""
    from deploycraft.preflight import Preflight
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    make_imagefolder(tmp_path, per_class=1)
    (tmp_path / "train" / "zempty" / "notes").mkdir(parents=True)
    (tmp_path / "train" / "zempty" / "notes" / "readme.txt").write_text("not an image")
    raw = smoke_recipe(
        model={"arch": "resnet20", "num_classes": 2}, data={"dataset": "imagefolder", "root": str(tmp_path)}
    )
    with pytest.raises(UserError) as info:
        Preflight(build_recipe(raw)).check_classes()
    assert info.value.field == "model.num_classes" and "the data has 3 classes" in info.value.message
    assert f"{tmp_path / 'train' / 'zempty'} holds no images" in info.value.message
    assert info.value.fix.startswith("remove the empty class folder(s), or set model.num_classes: 3")


def test_worker_processes_change_no_batch_and_no_cache_key(tmp_path):
    """data.num_workers (and data.download) only change how images are fetched: the same augmented batches
    come out (the augmentation is drawn in the main process), so they stay out of every stage's key."""
    from deploycraft.data.transforms import Augment
    from deploycraft.pipeline import Pipeline
    from deploycraft.recipe import build_recipe
    from tests.conftest import smoke_recipe

    make_imagefolder(tmp_path)
    epochs = []
    for workers in (0, 1):
        dm = DataModule(DataConfig(dataset="imagefolder", root=tmp_path, image_size=16, num_workers=workers), seed=3)
        epochs.append(list(dm.train_epoch(4, epoch=1, augment=Augment())))
    assert len(epochs[0]) == len(epochs[1]) == 3
    for (xa, ya), (xb, yb) in zip(*epochs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    raw = smoke_recipe(data={"dataset": "imagefolder", "root": str(tmp_path), "image_size": 16})
    base = Pipeline(build_recipe(raw), tmp_path / "run")._base()
    raw["data"].update(num_workers=1, download=False)
    assert Pipeline(build_recipe(raw), tmp_path / "run")._base() == base
