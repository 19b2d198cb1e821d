#!/usr/bin/env bash
# Set up a development environment: Fashion-MNIST (Debian package, when missing), a virtualenv in
# .venv with deploycraft and its test tools. Idempotent; re-run after changing pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing the Fashion-MNIST Debian package"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST package not installed; deploycraft will use data.root, its cache or download it"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

# torch first, once: the block runs only while the venv has no torch (remove the venv to change the build).
# PyPI's Linux x86-64 torch is the CUDA build (several GB with its NVIDIA libraries), so a machine without
# nvidia-smi takes the CPU build from PyTorch's own index when that index answers. TORCH_INDEX_URL names
# another index (a CUDA or private one; used as given, pip's own settings apply); an empty TORCH_INDEX_URL
# skips both: torch from pip's configured index. A failed install from either falls back to that index.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  index=
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    index=$TORCH_INDEX_URL
    if [ -n "$index" ]; then echo "setup: torch from the index in TORCH_INDEX_URL"; fi
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    cpu_index=https://download.pytorch.org/whl/cpu
    if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
      "$cpu_index" >/dev/null 2>&1; then
      index=$cpu_index
      echo "setup: no nvidia-smi: torch from $cpu_index"
    else
      echo "setup: no nvidia-smi, but $cpu_index does not answer: torch from the configured package index"
    fi
  fi
  if [ -n "$index" ]; then
    "$VENV/bin/python" -m pip install -q -c constraints.txt --extra-index-url "$index" torch ||
      echo "setup: installing torch from that index failed: torch from the configured package index"
  fi
fi
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
versions=$("$VENV/bin/python" -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)')
echo "setup: ready ($versions)"
