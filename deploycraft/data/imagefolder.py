"""ImageFolder datasets (the ImageNet layout): ``root/<split>/<class>/<image>``.

Images are decoded lazily with Pillow, resized so the shorter side is ``image_size / crop_pct`` and
center-cropped to ``image_size`` (the standard ImageNet evaluation transform), and handed on as
uint8 RGB tensors; channel conversion and normalization happen per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deploycraft.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


def find_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """The images of one class folder (itself a link or not), sorted: what a split reads, and what its
    fingerprint in the cache key covers."""
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def empty_classes(folder: Path) -> list[str]:
    """The class folders of a split that hold no image: each still counts as a class (a label index)."""
    return [name for name in find_classes(folder) if not image_files(folder / name)]


def check_split_classes(train_dir: Path, val_dir: Path) -> None:
    """Every class folder of the held-out split is a class of the training split: labels follow the
    training split, so a class it lacks (or a misspelt folder) would be dropped from the evaluation."""
    extra = sorted(set(find_classes(val_dir)) - set(find_classes(train_dir)))
    if extra:
        shown = ", ".join(extra[:10]) + (f", ... ({len(extra)} in all)" if len(extra) > 10 else "")
        raise UserError(
            f"{val_dir} has class folders that {train_dir} lacks ({shown}): their images would not be evaluated",
            field="data.val_split",
            fix="rename them to the training split's class names, remove them, or add them to the training split",
        )


def to_8bit(im):
    """A greyscale image of 16- or 32-bit integers as 8-bit "L", scaled by the value range of its mode (16-bit: the
    top 8 bits); others unchanged. Pillow's ``convert`` clips such values at 255, which turns a 16-bit image white.

    Pillow holds 16-bit PGM/PPM values (scaled to 0..65535) in mode "I", as older versions did 16-bit PNGs: those
    count as 16-bit; any other "I" image (a 32-bit TIFF) as 32-bit signed, negative values black."""
    from PIL import Image

    if im.mode.startswith("I;16"):
        bits = 16
    elif im.mode == "I":
        bits = 16 if im.format in ("PNG", "PPM") else 31
    else:
        return im
    values = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, None) >> (bits - 8)).astype(np.uint8))


class ImageFolderSource(Dataset):
    def __init__(
        self,
        folder: Path,
        image_size: int,
        crop_pct: float = 0.875,
        classes: list[str] | None = None,
        field: str = "data.root",
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(
                f"folder {folder} does not exist",
                field=field,
                fix="point it at an ImageFolder split: <split>/<class>/<image files>",
            )
        self.classes = classes if classes is not None else find_classes(folder)
        if not self.classes:
            raise UserError(
                f"{folder} has no class sub-folders",
                field=field,
                fix="lay the images out as <split>/<class name>/<image files>",
            )
        samples: list[tuple[Path, int]] = []
        for idx, name in enumerate(self.classes):
            cdir = folder / name
            if not cdir.is_dir():
                continue  # a split may lack a class; the label index still follows the training split
            samples += [(p, idx) for p in image_files(cdir)]
        if not samples:
            raise UserError(
                f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})",
                field=field,
                fix="add images under <split>/<class name>/",
            )
        self.folder = folder
        self.field = field
        self.samples = samples
        self.labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        self.image_size = image_size
        self.resize_to = int(round(image_size / crop_pct))
        self.channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with decode(path, self.field) as im:
            w, h = im.size
            scale = self.resize_to / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            arr = np.asarray(im, dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1), label


def decode(path: Path, field: str, draft: int | None = None):
    """The image at ``path`` as 8-bit RGB (a Pillow image), every way it can fail to decode one UserError that names
    the file: not an image, truncated, damaged, or over Pillow's decompression-bomb limit (left in place).

    ``draft``: a JPEG may be decoded at a reduced scale (1/2 to 1/8, no side under ``draft``), which reads all of
    the file at a fraction of the cost: for checking that it decodes, not for its pixels."""
    import struct

    from PIL import Image

    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft("RGB", (draft, draft))  # a no-op but for JPEG
            return to_8bit(im).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UserError(
            f"image {path} is too large to decode ({exc})",
            field=field,
            fix="shrink it (it is resized to data.image_size anyway; a few thousand pixels a side is plenty) or "
            "remove it",
        ) from None
    except (OSError, SyntaxError, EOFError, ValueError, struct.error) as exc:  # Pillow's ways to fail on a bad file
        raise UserError(
            f"cannot decode image {path}: {exc or exc.__class__.__name__}",
            field=field,
            fix="remove or replace the broken file",
        ) from None


class DecodeCheck(Dataset):
    """Each image of ``source`` decoded once, as cheaply as Pillow can (a JPEG at 1/8 scale, which still reads all of
    its data: about a third of a full decode): item i is 0, or the UserError that names a file that does not decode."""

    def __init__(self, source: ImageFolderSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> int:
        with decode(self.source.samples[i][0], self.source.field, draft=1):
            return 0
