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

# torch first. PyPI's Linux x86-64 torch is the CUDA build (several GB with its NVIDIA libraries); a
# machine without an NVIDIA driver takes the CPU build from PyTorch's own index when that index answers.
# TORCH_INDEX_URL names another index (a CUDA one, say); an empty TORCH_INDEX_URL keeps the default.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    index=$TORCH_INDEX_URL
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    index=https://download.pytorch.org/whl/cpu
  else
    index=
  fi
  if [ -n "$index" ] && "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)" "$index" >/dev/null 2>&1; then
    echo "setup: torch from $index"
    "$VENV/bin/python" -m pip install -q -c constraints.txt --extra-index-url "$index" torch ||
      echo "setup: installing torch from $index failed; torch from the configured package index"
  elif [ -n "$index" ]; then
    echo "setup: $index does not answer; torch from the configured package index"
  fi
fi
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)'))"
