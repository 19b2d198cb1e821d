#!/usr/bin/env bash
# ResNet-50 at 224 px from a torchvision-format checkpoint on a generated ImageFolder, through the
# flagship recipe by --set overrides only (no training): the INT8 deployable's batch-1 latency against
# the machine's INT8 conv ceiling measured in the same run (4.09 GMAC per image). The weights are
# random (seeded), so top-1 means nothing here; the latency and the ceiling fraction are the point.
#
#     benchmarks/resnet50_224.sh [OUT_DIR]      (default /tmp/deploycraft-resnet50-224)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/deploycraft-resnet50-224}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deploycraft.models import create_model

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
for split, n in (("train", 64), ("val", 64)):
    for c in range(2):
        d = out / "data" / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
torch.manual_seed(0)
torch.save(create_model("resnet50", num_classes=1000).state_dict(), out / "resnet50_torchvision_format.pth")
PYEOF
"$PY" -m deploycraft run recipes/resnet50_int8.yaml -o "$OUT/run" \
  --set data.dataset=imagefolder --set "data.root=$OUT/data" --set data.image_size=224 \
  --set model.num_classes=1000 --set "model.weights=$OUT/resnet50_torchvision_format.pth" \
  --set stages.train.enabled=false --set stages.quantize.num_calibration=64 \
  --set "stages.verify.batch_sizes=[1]" --set stages.verify.repeats=30 \
  --set stages.verify.max_accuracy_drop=null --set stages.verify.min_speedup=null
"$PY" - "$OUT/run/report.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for name, m in r["models"].items():
    if m.get("gmacs") is not None:
        print(f"{name:<36} p50 {m['latency_ms']['p50']:8.2f} ms  {m['gmacs']:6.0f} GMAC/s  "
              f"{m['ceiling_fraction'] * 100:5.1f} % of the {m['backend']} {m['precision']} ceiling")
print("ceiling:", {k: v["gmacs"] for k, v in r["ceiling"].items()})
PYEOF
