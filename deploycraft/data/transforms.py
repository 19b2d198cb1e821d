"""Batch-level input transforms: any dataset to any model input.

Images travel as uint8 NCHW batches at their native channel count. `prepare_batch` resizes them to
the model's resolution, applies the training augmentation (random crop with padding, horizontal
flip), converts channels (grey replicated to RGB, RGB to luminance) and normalizes. Working on
whole batches with an explicit generator keeps augmentation fast on CPU and exactly reproducible,
which resuming a killed training run relies on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, as PIL's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class InputSpec:
    """What the deployed model expects; recorded in the manifest so users can feed it correctly."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = "NCHW"
        d["dtype"] = "float32"
        d["pixel_scale"] = "pixels / 255, then (x - mean) / std per channel"
        return d


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 4
    hflip: bool = True


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if c == 3 and channels == 1:
        return (x * _LUMA.to(x.device, x.dtype)).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    downsampling = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices of one batch: crop offsets (n, 2) and horizontal flips (n,), each None when off.

    Drawn for a whole (global) batch and sliced per rank, so an image is augmented the same way whatever
    the number of processes its batch is split over."""

    offsets: torch.Tensor | None
    flips: torch.Tensor | None

    def __getitem__(self, part: slice) -> AugmentDraw:
        return AugmentDraw(
            None if self.offsets is None else self.offsets[part], None if self.flips is None else self.flips[part]
        )


def draw_augment(aug: Augment, n: int, gen: torch.Generator) -> AugmentDraw:
    """Crop offsets first, then flips: the order the generator has always been consumed in (resumed and
    earlier runs stay bit-identical)."""
    p = aug.crop_padding
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen) if p > 0 else None
    flips = torch.rand(n, generator=gen) < 0.5 if aug.hflip else None
    return AugmentDraw(offsets, flips)


def apply_crop_flip(x: torch.Tensor, aug: Augment, draw: AugmentDraw) -> torch.Tensor:
    n, _, h, w = x.shape
    p = aug.crop_padding
    if draw.offsets is not None and n > 0:  # n = 0: a rank's empty part of a last batch
        padded = F.pad(x, (p, p, p, p))  # zero padding: the background of the image after scaling
        x = torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(draw.offsets.tolist())])
    if draw.flips is not None:
        x = torch.where(draw.flips.to(x.device).view(n, 1, 1, 1), x.flip(-1), x)
    return x


def random_crop_flip(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    return apply_crop_flip(x, aug, draw_augment(aug, len(x), gen))


def prepare_batch(
    images: torch.Tensor,
    spec: InputSpec,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    draw: AugmentDraw | None = None,
) -> torch.Tensor:
    """uint8 NCHW (any size, 1 or 3 channels) -> normalized float32 NCHW at ``spec``, on the images' device
    (a GPU prepares its batches itself: only the uint8 images cross the bus).

    Augmentation takes its random choices from ``draw`` if given, else from ``generator``."""
    x = images.float().div_(255.0)
    x = resize(x, spec.image_size)
    if augment is not None:
        if draw is None:
            if generator is None:
                raise ValueError("augmentation needs an explicit generator for reproducibility")
            draw = draw_augment(augment, len(x), generator)
        x = apply_crop_flip(x, augment, draw)
    x = convert_channels(x, spec.channels)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


# Normalization statistics of each dataset (pixels in [0, 1]); ImageFolder data uses ImageNet's.
NATIVE_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),  # of the 60,000 training images
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * channels
    return (sum(values) / len(values),) * channels


def input_spec(cfg) -> InputSpec:
    """The model input a data config produces: size, channels and normalization."""
    mean, std = NATIVE_STATS[cfg.dataset]
    return InputSpec(
        image_size=cfg.image_size,
        channels=cfg.channels,
        mean=tuple(cfg.mean) if cfg.mean else _fit_channels(mean, cfg.channels),
        std=tuple(cfg.std) if cfg.std else _fit_channels(std, cfg.channels),
    )
