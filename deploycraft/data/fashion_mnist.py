"""Fashion-MNIST (Xiao et al. 2017): the built-in default dataset.

A recipe's ``data.root`` is the one place looked in: it must hold the four files. Without it they are
looked up, in order, in ``$DEPLOYCRAFT_DATA/fashion-mnist``, the Debian package's folder
(``apt-get install dataset-fashion-mnist``) and the user cache, and downloaded from the official mirror
into the cache when none has them and downloads are allowed. The folder found is checked cheaply
(gzip header, decompressed size, IDX header) before anything runs; every file is checked against the
sha256 of its decompressed content when it is read (recompressed copies, as Debian ships, still match).
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
import zlib
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
# Each file's decompressed size and the start of its IDX header (magic number, dimensions): what
# `check_headers` compares without decompressing a whole file.
IDX_HEADERS = {
    "train-images-idx3-ubyte.gz": (47_040_016, struct.pack(">IIII", 0x803, 60_000, 28, 28)),
    "train-labels-idx1-ubyte.gz": (60_008, struct.pack(">II", 0x801, 60_000)),
    "t10k-images-idx3-ubyte.gz": (7_840_016, struct.pack(">IIII", 0x803, 10_000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (10_008, struct.pack(">II", 0x801, 10_000)),
}
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deploycraft" / "fashion-mnist"


def candidate_dirs(root: Path | None) -> list[Path]:
    """Where the files are looked for: the recipe's data.root alone when it is set, else the defaults."""
    if root is not None:
        return [Path(root)]
    dirs: list[Path] = []
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
    field = "data.root" if root is not None else "data"
    for d in candidate_dirs(root):
        if _complete(d):
            check_headers(d, field)
            return d
    if root is not None:
        missing = [f for f in FILES if not (Path(root) / f).is_file()]
        raise UserError(
            f"{root} lacks {', '.join(missing)}",
            field="data.root",
            fix="put the four Fashion-MNIST .gz files there, or remove data.root to use the installed copy "
            "or the download",
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


def _header_problem(path: Path, name: str) -> str | None:
    """What is wrong with the file at a glance (gzip magic, decompressed size, IDX header), or None."""
    size, header = IDX_HEADERS[name]
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            if magic != b"\x1f\x8b":
                return "is not a gzip file"
            fh.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        with gzip.open(path, "rb") as fh:
            start = fh.read(len(header))
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        return f"cannot be read as gzip ({exc.__class__.__name__}: {exc})"
    if start != header:
        return f"does not hold the IDX data of {name}"
    if isize != size:
        return f"is truncated or altered (it decompresses to {isize:,} bytes, {name} has {size:,})"
    return None


def check_headers(folder: Path, field: str = "data.root") -> None:
    """The four files in ``folder`` look like Fashion-MNIST (cheap: no full decompression); else one error."""
    for name in FILES:
        problem = _header_problem(folder / name, name)
        if problem is not None:
            raise UserError(
                f"{folder / name} {problem}",
                field=field,
                fix="replace it with an intact copy of the official file, or remove data.root to use the defaults"
                if field == "data.root"
                else "replace it with an intact copy of the official file (Debian's folder: apt-get install "
                "--reinstall dataset-fashion-mnist; the cache: delete it to download again)",
            )


def check_file(path: Path, digest: str, name: str) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(
            f"{path} cannot be decompressed ({exc.__class__.__name__}: {exc})",
            field="data.root",
            fix="replace it with an intact copy of the official file "
            "(apt-get install --reinstall dataset-fashion-mnist)",
        ) from None
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
