"""Fashion-MNIST (Xiao et al. 2017): the built-in default dataset.

Looked up, in order, in the recipe's ``data.root``, ``$DEPLOYCRAFT_DATA/fashion-mnist``, the Debian
package's folder (``apt-get install dataset-fashion-mnist``) and the user cache; downloaded from the
official mirror into the cache when none has it and downloads are allowed. Every file is checked
against the sha256 of its decompressed content (recompressed copies, as Debian ships, still match).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from deploycraft.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deploycraft" / "fashion-mnist"


def candidate_dirs(root: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root))
    if os.environ.get("DEPLOYCRAFT_DATA"):
        dirs.append(Path(os.environ["DEPLOYCRAFT_DATA"]) / "fashion-mnist")
    dirs += [DEBIAN_DIR, cache_dir()]
    return dirs


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def locate(root: Path | None = None, download: bool = True) -> Path:
    """The folder holding the four .gz files, downloading them if allowed; else one clear error."""
    if root is not None and not Path(root).is_dir():
        raise UserError(
            f"folder {root} does not exist",
            field="data.root",
            fix="point data.root at a folder with the four Fashion-MNIST .gz files, or remove it to use the defaults",
        )
    for d in candidate_dirs(root):
        if _complete(d):
            return d
    if root is not None:
        missing = [f for f in FILES if not (Path(root) / f).is_file()]
        raise UserError(
            f"{root} lacks {', '.join(missing)}",
            field="data.root",
            fix="put the four Fashion-MNIST .gz files there, or remove data.root to use the defaults",
        )
    if download:
        try:
            return _download(cache_dir())
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = f"download failed ({exc.__class__.__name__}: {exc})"
    else:
        reason = "downloads are disabled (data.download: false)"
    searched = ", ".join(str(d) for d in candidate_dirs(None))
    raise UserError(
        f"Fashion-MNIST not found in {searched}; {reason}",
        field="data",
        fix="run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set data.root to a folder "
        "with the four .gz files, or allow the download when online",
    )


def _download(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in FILES.items():
        target = dest / name
        if target.is_file():
            continue
        with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
            with urllib.request.urlopen(MIRROR + name, timeout=30) as resp:
                shutil.copyfileobj(resp, tmp)
        check_file(Path(tmp.name), digest, name)
        os.replace(tmp.name, target)
    return dest


def check_file(path: Path, digest: str, name: str) -> bytes:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(
            f"{path} is not the official {name} (checksum mismatch)",
            field="data.root",
            fix="replace it with an intact copy (apt-get install --reinstall dataset-fashion-mnist)",
        )
    return raw


def _parse_idx(raw: bytes) -> np.ndarray:
    (magic,) = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels (N,) of "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    imgs = _parse_idx(
        check_file(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            FILES[f"{prefix}-images-idx3-ubyte.gz"],
            f"{prefix}-images-idx3-ubyte.gz",
        )
    )
    labels = _parse_idx(
        check_file(
            folder / f"{prefix}-labels-idx1-ubyte.gz",
            FILES[f"{prefix}-labels-idx1-ubyte.gz"],
            f"{prefix}-labels-idx1-ubyte.gz",
        )
    )
    return torch.from_numpy(imgs.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
