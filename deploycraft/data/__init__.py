"""Datasets behind one small interface: seeded training epochs, held-out batches, calibration images.

Sources hand out uint8 NCHW images at their native size and channel count; `prepare_batch` turns
them into the model's input. In-memory sources (Fashion-MNIST, synthetic) are sliced directly;
ImageFolder sources decode lazily through a DataLoader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from deploycraft.data import fashion_mnist
from deploycraft.data.transforms import Augment, draw_augment, input_spec, prepare_batch
from deploycraft.errors import UserError
from deploycraft.progress import bar

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CALIBRATION = REPO_ROOT / "calibration" / "fashion-mnist-train-512.npz"
# The smallest calibration image side: data.image_size's lower bound. Below it (an empty image, one pixel) the
# resize to the model's input has nothing to sample.
MIN_CALIBRATION_SIZE = 8


@dataclass
class TensorSource:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


class _Carried(Dataset):
    """A dataset whose UserError (a broken image) is handed on as an item instead of raised: from a DataLoader
    worker, torch re-raises an exception as its type built from the worker's formatted traceback, which turns the
    one line (message, field, fix) into a flattened traceback. A UserError pickles with its fields intact."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except UserError as exc:
            return exc


def _collate(items: list):
    failed = next((x for x in items if isinstance(x, UserError)), None)
    return failed if failed is not None else default_collate(items)


def _load(dataset: Dataset, **kwargs) -> Iterator:
    """A DataLoader's batches over ``dataset``; a UserError of any item, in this process or a worker, raised as is."""
    for batch in DataLoader(_Carried(dataset), collate_fn=_collate, **kwargs):
        if isinstance(batch, UserError):
            raise batch
        yield batch


def _batches(
    source, order: torch.Tensor, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(source, TensorSource):
        for i in range(0, len(order), batch_size):
            yield source.get(order[i : i + batch_size])
        return
    yield from _load(Subset(source, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _to(images: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    return images if device is None else images.to(device, non_blocking=True)


def _batch_list(
    source, batches: list[torch.Tensor], num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The given index batches in order (a rank's share of an epoch); an empty one stays empty."""
    if isinstance(source, TensorSource):
        for idx in batches:
            yield source.get(idx)
        return
    nonempty = [b.tolist() for b in batches if len(b)]
    loaded = _load(source, batch_sampler=nonempty, num_workers=num_workers) if nonempty else iter(())
    for idx in batches:
        if len(idx):
            yield next(loaded)
        else:
            yield torch.empty((0, source.channels, source.image_size, source.image_size), dtype=torch.uint8), idx


def synthetic_source(n: int, seed: int, size: int = 32, num_classes: int = 10) -> TensorSource:
    """Learnable stand-in data: each class is a fixed random colour pattern plus per-image noise.

    The class patterns are the same for every split; ``seed`` only draws the images of this split.
    """
    protos = torch.randint(0, 256, (num_classes, 3, 4, 4), generator=torch.Generator().manual_seed(20_17)).float()
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="nearest")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn(n, 3, size, size, generator=gen) * 40
    images = (protos[labels] + noise).clamp(0, 255).to(torch.uint8)
    return TensorSource(images, labels)


def class_balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices spread as evenly as possible over the classes, chosen with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    base, extra = divmod(n, len(classes))
    picked = []
    for k, c in enumerate(classes):
        members = torch.nonzero(labels == c).flatten()
        take = min(len(members), base + (1 if k < extra else 0))
        picked.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.sort(torch.cat(picked)).values


class DataModule:
    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.name = cfg.dataset
        if cfg.dataset == "fashion-mnist":
            folder = fashion_mnist.locate(cfg.root, cfg.download)
            self.location = str(folder)
            self.train = TensorSource(*fashion_mnist.load_split(folder, "train"))
            self.val = TensorSource(*fashion_mnist.load_split(folder, "test"))
            self.class_names = list(fashion_mnist.CLASSES)
            self.val_name = "test (10,000 images)"
        elif cfg.dataset == "synthetic":
            self.location = "generated"
            self.train = synthetic_source(cfg.train_subset or 512, seed)
            self.val = synthetic_source(cfg.val_subset or 256, seed + 1)
            self.class_names = [f"class{i}" for i in range(10)]
            self.val_name = "generated"
        else:
            from deploycraft.data.imagefolder import ImageFolderSource, check_split_classes

            root = Path(cfg.root)
            self.location = str(root)
            train_dir = root / cfg.train_split
            if train_dir.is_dir():
                check_split_classes(train_dir, root / cfg.val_split)
            self.train = (
                ImageFolderSource(train_dir, cfg.image_size, cfg.crop_pct, field="data.train_split")
                if train_dir.is_dir()
                else None
            )
            classes = self.train.classes if self.train is not None else None
            self.val = ImageFolderSource(
                root / cfg.val_split, cfg.image_size, cfg.crop_pct, classes=classes, field="data.val_split"
            )
            self.class_names = self.val.classes
            self.val_name = f"{cfg.val_split} ({len(self.val)} images)"

        self.spec = input_spec(cfg)
        self.num_classes = len(self.class_names)
        gen = torch.Generator().manual_seed(seed)
        self.train_index = None
        if self.train is not None:
            self.train_index = torch.arange(len(self.train))
            if cfg.train_subset and cfg.dataset != "synthetic" and cfg.train_subset < len(self.train):
                self.train_index = torch.sort(torch.randperm(len(self.train), generator=gen)[: cfg.train_subset]).values
        self.val_index = torch.arange(len(self.val))
        if cfg.val_subset and cfg.dataset != "synthetic" and cfg.val_subset < len(self.val):
            self.val_index = torch.sort(torch.randperm(len(self.val), generator=gen)[: cfg.val_subset]).values
            self.val_name = f"seeded subset of {cfg.val_subset} held-out images"

    # --- training ------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return 0 if self.train_index is None else len(self.train_index)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.num_train / batch_size)

    def train_epoch(
        self,
        batch_size: int,
        epoch: int,
        augment: Augment | None,
        shard: tuple[int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled, augmented batches of one epoch; the same (seed, epoch) gives the same batches.
        ``device``: where the batches are prepared (resized, augmented, normalized) and returned; the uint8
        images go there first (on a GPU only they cross the bus, and the preparation runs there).

        With ``shard=(rank, world_size)`` each batch of ``batch_size`` (the global batch) is cut into
        world_size contiguous parts (sizes differ by at most one; a part may be empty in a last, small
        batch) and this rank gets its part, augmented exactly as the whole batch would be in one process:
        the epoch's order and every image's augmentation depend on the seed alone."""
        if self.train is None:
            raise UserError(
                f"{self.location} has no training split",
                field="data.train_split",
                fix="point data.train_split at the training images, or disable the train stage",
            )
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = self.train_index[torch.randperm(len(self.train_index), generator=gen)]
        if shard is None:
            for images, labels in _batches(self.train, order, batch_size, self.cfg.num_workers):
                yield prepare_batch(_to(images, device), self.spec, augment, gen), labels
            return
        rank, world_size = shard
        parts, draws = [], []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sizes = [len(part) for part in torch.tensor_split(batch, world_size)]
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            parts.append(batch[lo:hi])
            draws.append(draw_augment(augment, len(batch), gen)[lo:hi] if augment is not None else None)
        for (images, labels), draw in zip(_batch_list(self.train, parts, self.cfg.num_workers), draws, strict=True):
            yield prepare_batch(_to(images, device), self.spec, augment, draw=draw), labels

    # --- evaluation -----------------------------------------------------------------------------
    @property
    def num_val(self) -> int:
        return len(self.val_index)

    def val_batches(
        self, batch_size: int, shard: tuple[int, int] | None = None, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out batches in order; with ``shard=(rank, world_size)`` only batches rank, rank + world_size,
        ...: every image is evaluated in the same batch as in one process, by exactly one rank. ``device``: as
        in ``train_epoch``."""
        if shard is None:
            for images, labels in _batches(self.val, self.val_index, batch_size, self.cfg.num_workers):
                yield prepare_batch(_to(images, device), self.spec), labels
            return
        rank, world_size = shard
        batches = [self.val_index[i : i + batch_size] for i in range(0, len(self.val_index), batch_size)]
        for images, labels in _batch_list(self.val, batches[rank::world_size], self.cfg.num_workers):
            yield prepare_batch(_to(images, device), self.spec), labels

    def check_held_out(self, shard: tuple[int, int] | None = None, label: str = "train") -> None:
        """Decode every held-out image once, cheaply (``imagefolder.DecodeCheck``), so that a broken one is named
        before training spends time, not at the first evaluation; with ``shard=(rank, world_size)`` this rank's
        share. In-memory sources have nothing to check."""
        from deploycraft.data.imagefolder import DecodeCheck, ImageFolderSource

        if not isinstance(self.val, ImageFolderSource):
            return
        index = self.val_index if shard is None else self.val_index[shard[0] :: shard[1]]
        batch_size = 64
        with bar(f"{label}: checking the held-out images", math.ceil(len(index) / batch_size)) as b:
            for _ in _load(
                Subset(DecodeCheck(self.val), index.tolist()), batch_size=batch_size, num_workers=self.cfg.num_workers
            ):
                b.advance()

    def num_val_batches(self, batch_size: int, shard: tuple[int, int] | None = None) -> int:
        steps = math.ceil(self.num_val / batch_size)
        return steps if shard is None else len(range(shard[0], steps, shard[1]))

    def sample_input(self, batch_size: int = 2) -> torch.Tensor:
        images, _ = next(_batches(self.val, self.val_index[:batch_size], batch_size))
        return prepare_batch(images, self.spec)

    # --- calibration ----------------------------------------------------------------------------
    def calibration_images(self, n: int) -> tuple[torch.Tensor, str]:
        """Up to n uint8 calibration images from outside the held-out split, and where they came from."""
        if self.cfg.calibration is not None:
            images, _ = load_calibration_file(Path(self.cfg.calibration))
            return images[:n], f"{self.cfg.calibration} (first {min(n, len(images))})"
        if self.name == "fashion-mnist" and SHIPPED_CALIBRATION.is_file() and n <= 512:
            images, _ = load_calibration_file(SHIPPED_CALIBRATION)
            return images[:n], f"calibration/{SHIPPED_CALIBRATION.name} (first {min(n, len(images))})"
        source, idx, what = self.train, self.train_index, "training split"
        if source is None:
            source, idx, what = self.val, self.val_index, "held-out split (no training split: overlaps evaluation)"
        labels = source.labels[idx]
        pick = idx[class_balanced_indices(labels, min(n, len(idx)), self.seed)]
        images = torch.cat([b for b, _ in _batches(source, pick, 256, self.cfg.num_workers)])
        return images, f"class-balanced seeded sample of {len(pick)} images from the {what}"


def load_calibration_file(path: Path, field: str = "data.calibration") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels (N,) from a user's .npz; every defect one UserError."""
    path = Path(path)
    fmt = "an .npz with uint8 `images` (N, C, H, W) and integer `labels` (N,), e.g. np.savez(path, images=x, labels=y)"
    if path.is_dir():
        raise UserError(f"calibration file {path} is a directory", field=field, fix=f"give {fmt}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive of named arrays")
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"no {' or '.join(missing)} array (it has {', '.join(z.files) or 'none'})")
            images, labels = z["images"], z["labels"]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a pickle, text: all a bad user file
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"cannot read calibration file {path} ({exc.__class__.__name__}{': ' + first if first else ''})",
            field=field,
            fix=f"give {fmt}",
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(
            f"{path}: `images` must be uint8 with shape (N, C, H, W), got {images.dtype} {images.shape}",
            field=field,
            fix="save the images as uint8 NCHW",
        )
    if len(images) == 0:
        raise UserError(f"{path} holds 0 images", field=field, fix="save at least one calibration image")
    if images.shape[1] not in (1, 3):
        nhwc = images.shape[3] in (1, 3)
        raise UserError(
            f"{path}: `images` has {images.shape[1]} channels in axis 1 (shape {images.shape})"
            + ("; it looks like NHWC" if nhwc else ""),
            field=field,
            fix="save NCHW images with 1 (grey) or 3 (RGB) channels"
            + (": images.transpose(0, 3, 1, 2)" if nhwc else ""),
        )
    if min(images.shape[2:]) < MIN_CALIBRATION_SIZE:
        raise UserError(
            f"{path}: the images are {images.shape[3]}x{images.shape[2]} pixels, too small to calibrate on (under "
            f"{MIN_CALIBRATION_SIZE} pixels a side)",
            field=field,
            fix=f"save calibration images of at least {MIN_CALIBRATION_SIZE}x{MIN_CALIBRATION_SIZE} pixels, "
            "best at data.image_size",
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(
            f"{path}: `labels` has shape {labels.shape} for {len(images)} images",
            field=field,
            fix="save one integer label per image",
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: `labels` are {labels.dtype}, not integers",
            field=field,
            fix="save the class indices as integers (labels.astype(np.int64))",
        )
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def build_data(cfg, seed: int = 0) -> DataModule:
    return DataModule(cfg, seed)
