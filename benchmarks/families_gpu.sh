#!/usr/bin/env bash
# Every zoo family's recipe on full Fashion-MNIST, trained on a CUDA GPU (three lanes in parallel),
# verified on the host CPU; one JSON line per recipe in $OUT/families.jsonl. Latency from these
# parallel runs is not comparable and not reported; accuracy is.
set -uo pipefail
source benchmarks/gpu_env.sh
RUNS=${RUNS:-${TMPDIR:-/tmp}/families}   # run folders and logs of the recipes
mkdir -p "$RUNS"
RECIPES=(${RECIPES:-densenet_bc_fmnist shakeshake_fmnist resnext29_fmnist highway_fmnist wrn_16_2_fmnist \
  resnet56_sd_fmnist preact_resnet20_fmnist se_resnet20_fmnist pyramidnet_fmnist})
run() {
  local r=$1 start=$SECONDS
  python3 -m deploycraft run "recipes/$r.yaml" --set device=cuda --set threads=4 --set stages.verify.threads=4 \
    --set stages.verify.repeats=10 ${EXTRA_SETS:-} -o "$RUNS/$r" > "$RUNS/$r.log" 2>&1
  local rc=$?
  python3 - "$r" "$rc" "$((SECONDS - start))" "$RUNS" >> "$OUT/families.jsonl" <<'PY'
import json, sys
from pathlib import Path
r, rc, secs, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
path = Path(f"{runs}/{r}/report.json")
row = {"recipe": r, "rc": rc, "wall_s": secs}
if path.is_file():
    rep = json.loads(path.read_text())
    m, t = rep["models"], rep["stages"].get("train", {})
    row.update(arch=t.get("arch"), epochs=t.get("epochs"), train_s=t.get("seconds"), params=m["fp32_torch"]["params"],
               macs=m["fp32_torch"]["macs"], fp32_top1=m["fp32_torch"]["top1"], int8_top1=m["int8_onnx"]["top1"],
               int8_conv_fraction=rep["stages"]["quantize"].get("int8_conv_fraction"), status=rep["status"],
               gpu=rep["hardware"].get("gpus"))
else:
    row["log_tail"] = Path(f"{runs}/{r}.log").read_text()[-1500:]
print(json.dumps(row))
PY
  echo "$r rc=$rc $((SECONDS - start)) s"
}
lane() { for r in "$@"; do run "$r"; done; }
n=${#RECIPES[@]}
lane "${RECIPES[@]:0:3}" &
lane "${RECIPES[@]:3:3}" &
lane "${RECIPES[@]:6:$((n - 6))}" &
wait
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
cat "$OUT/families.jsonl"
