"""Regenerate calibration/fashion-mnist-train-512.npz and its provenance (calibration/README.md).

The subset is a class-balanced, seeded sample of the Fashion-MNIST *training* split, so calibration
never sees the held-out test images that verification reports on.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np

from deploycraft.data import class_balanced_indices, fashion_mnist

N, SEED = 512, 0


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("calibration")
    folder = fashion_mnist.locate(None, download=True)
    images, labels = fashion_mnist.load_split(folder, "train")
    idx = class_balanced_indices(labels, N, SEED)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images[idx].numpy(), labels=labels[idx].numpy(), indices=idx.numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "fashion-mnist-train-512.npz"
    target.write_bytes(buf.getvalue())
    counts = np.bincount(labels[idx].numpy(), minlength=10).tolist()
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    sources = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in fashion_mnist.FILES.items())
    (out_dir / "README.md").write_text(f"""# Calibration data

## fashion-mnist-train-512.npz
- **What**: {N} Fashion-MNIST images (uint8, shape (N, 1, 28, 28)) with their labels and their
  indices into the training split (`images`, `labels`, `indices`).
- **From**: the Fashion-MNIST *training* split (Xiao, Rasul & Vollgraf 2017, MIT licence), never
  the test split that `verify` reports on.
- **How chosen**: class-balanced ({counts} per class), seeded (seed {SEED}) with
  `deploycraft.data.class_balanced_indices`; regenerate with `python scripts/make_calibration.py`.
- **sha256 of this file**: `{sha}`
- **Source files** (sha256 of the decompressed idx content, as checked on load):

| file | sha256 |
|---|---|
{sources}

The quantize stage uses the first `num_calibration` images (at most 512) when the dataset is
fashion-mnist and `data.calibration` is not set; other datasets draw a class-balanced seeded sample
from their training split.
""")
    print(f"wrote {target} ({len(buf.getvalue())} bytes, sha256 {sha})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
