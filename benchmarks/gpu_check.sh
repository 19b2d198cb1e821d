#!/usr/bin/env bash
# The GPU machine check, run from the repository root on a machine with a CUDA GPU and torch:
#   1. the gpu-marked tests, 2. the flagship recipe trained on CUDA (torch-CUDA latency in its report),
#   3. ResNet-50 torch-CUDA latency anchors. Results go to $OUT (default /tmp/gpu_check).
# Without network: put wheels of the missing packages in .whl/ and Fashion-MNIST in .data/fashion-mnist/.
set -uo pipefail
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnx, onnxruntime, pydantic, torch_pruning; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
time python3 -m deploycraft run recipes/resnet50_int8.yaml --set device=cuda --set stages.verify.min_speedup=null \
  -o /tmp/gpu_run > "$OUT/flagship_cuda.log" 2>&1
tail -40 "$OUT/flagship_cuda.log"
cp /tmp/gpu_run/report.json "$OUT/flagship_cuda_report.json" 2>/dev/null
python3 benchmarks/gpu_latency.py --json "$OUT/gpu_latency.json" 2>&1 | tee "$OUT/gpu_latency.txt"
