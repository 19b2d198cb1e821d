#!/usr/bin/env bash
# The GPU machine check, one script for a lent GPU (run from the repository root; results in $OUT):
#   1. training, FP32 against AMP (bf16 + channels_last): the flagship recipe's train stage at 32 px (as
#      shipped) and at 224 px, one run at a time (epoch times comparable);
#   2. the GPU deployables of the 224-px ResNet-50 from step 1's AMP checkpoint (torchvision format):
#      AOTInductor FP16 package compiled, then timed alone (benchmarks/gpu_deployables.py);
#   3. beside each other (no timing taken from them): the pruned ResNet-56 recipe's train, prune and distill
#      stages at shipped length (its quantize, export and verify run on the CPU machine, from the distilled
#      model this step packs as $OUT/resnet56_distilled.pt), the gpu-marked tests, and the flagship at 224 px
#      under torchrun on NCCL as a world of one (smoke test: 4,096 training images).
# Without network: wheels of the missing packages in .whl/, Fashion-MNIST in .data/fashion-mnist/.
# 4. (only when named in STEPS) the gpu-marked tests alone.
# STEPS (default "1 2 3") picks steps; each step has its own time limits. All three steps take about 10 minutes
# on an H200, more than one call of the device (600 s): run STEPS="1 2" and STEPS=3 as two calls.
# A dry run of the plumbing on a CPU machine: DEVICE=cpu EXTRA_SETS="--set data.train_subset=128 ..."
#   DEPLOYABLE_ARGS="--device cpu --precision fp32 --val-subset 64 --batch-sizes 1 2 --repeats 4".
set -uo pipefail
source benchmarks/gpu_env.sh
RUNS=${RUNS:-/tmp/gpu_runs/$(date +%s)}  # a new folder per call: a warm machine keeps /tmp, and a run folder resumes
mkdir -p "$RUNS"
# Inductor's caches per call too: in stop 32 a tiny AOTI package loaded in its compiling process in the first
# call, and the same test crashed at load in the second, after a ResNet-50 package had been compiled there.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$RUNS/inductor_cache}
# The run folders' logs, run.json and report.json (no weights) in one archive, after every step and on exit
# (a call killed at the device's 600 s limit still returns them): $OUT holds at most 8 files.
archive() {
  (cd "$RUNS" && find . -maxdepth 2 \( -name '*.log' -o -name run.json -o -name report.json -o -name log.txt \) -print0 \
    | tar --null -czf "$OUT/logs.tar.gz" -T -)
}
trap archive EXIT
T0=$SECONDS
note() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/steps.txt"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv | tee -a "$OUT/steps.txt"
python3 -c "import torch, onnx, onnxruntime, pydantic, torch_pruning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/steps.txt"
lscpu | grep -m1 "Model name" | tee -a "$OUT/steps.txt"
DEVICE=${DEVICE:-cuda}
NO_LATER=(--set stages.quantize.enabled=false --set stages.export.enabled=false --set stages.verify.enabled=false
  --set device=$DEVICE ${EXTRA_SETS:-})
AMP=(--set stages.train.amp=bf16 --set stages.train.channels_last=true)
[ "$DEVICE" = cpu ] && AMP=()
flagship() {  # name, limit in s, extra --set arguments
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m deploycraft run recipes/resnet50_int8.yaml "${NO_LATER[@]}" "$@" \
    -o "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  note "$name rc=$?"
}
case " ${STEPS:-1 2 3} " in *" 1 "*)
  note "step 1: training FP32 vs AMP"
  flagship fp32_32 120
  flagship amp_32 120 "${AMP[@]}"
  flagship fp32_224 200 --set data.image_size=224
  flagship amp_224 150 --set data.image_size=224 "${AMP[@]}"
  python3 - "$RUNS" > "$OUT/training.json" <<'PY'
import json, sys
from pathlib import Path
rows = {}
for name in ("fp32_32", "amp_32", "fp32_224", "amp_224"):
    p = Path(sys.argv[1]) / name / "report.json"
    if not p.is_file():
        rows[name] = {"missing": True, "log": (Path(sys.argv[1]) / f"{name}.log").read_text()[-1500:]}
        continue
    t = json.loads(p.read_text())["stages"]["train"]
    rows[name] = {k: t.get(k) for k in ("image_size", "batch_size", "epochs", "seconds", "val_top1", "history")}
print(json.dumps(rows, indent=1))
PY
  grep -h "epoch 1/1:" "$RUNS"/*.log | tee -a "$OUT/steps.txt"
  archive
;; esac
case " ${STEPS:-1 2 3} " in *" 2 "*)
  note "step 2: AOTInductor FP16 package of the 224-px ResNet-50"
  W=$RUNS/amp_224/deploy/torch/weights.pt
  [ -f "$W" ] || W=$(ls -t /tmp/gpu_runs/*/amp_224/deploy/torch/weights.pt 2>/dev/null | head -1)  # an earlier call's
  PKG=$RUNS/pkg/model.pt2
  if [ -n "$W" ] && [ -f "$W" ]; then
    note "weights: $W"
    timeout 240 python3 benchmarks/gpu_deployables.py --weights "$W" --build-only --package "$PKG" ${DEPLOYABLE_ARGS:-} \
      > "$RUNS/aoti_build.log" 2>&1
    rc=$?
    note "aoti build rc=$rc: $(grep -m1 compiled "$RUNS/aoti_build.log")"
    if [ $rc = 0 ]; then
      timeout 150 python3 benchmarks/gpu_deployables.py --weights "$W" --package "$PKG" ${DEPLOYABLE_ARGS:-} \
        --json "$OUT/aoti.json" 2>&1 | tail -12 | tee -a "$OUT/steps.txt"
      note "aoti timing rc=${PIPESTATUS[0]}"
    fi
  else
    note "no 224-px checkpoint: step 2 skipped"
  fi
  archive
;; esac
case " ${STEPS:-1 2 3} " in *" 3 "*)
  note "step 3: ResNet-56 chain, gpu tests, torchrun NCCL smoke (side by side)"
  (timeout 420 python3 -m deploycraft run recipes/resnet56_prune_kd_int8.yaml \
    "${NO_LATER[@]}" -o "$RUNS/r56" > "$RUNS/r56.log" 2>&1; note "resnet56 chain rc=$?"
   python3 - "$RUNS/r56" "$OUT/resnet56_distilled.pt" <<'PY'
import json, sys
from pathlib import Path
import torch
run, dest = Path(sys.argv[1]), sys.argv[2]
spec = json.loads((run / "deploy/torch/spec.json").read_text())
state = torch.load(run / "deploy/torch/weights.pt", map_location="cpu", weights_only=True)
torch.save({"format": spec["format"], "spec": spec, "model": state}, dest)
rep = json.loads((run / "report.json").read_text())["stages"]
Path(dest).with_suffix(".json").write_text(json.dumps({k: rep.get(k) for k in ("train", "prune", "distill")}, indent=1))
print("packed", dest)
PY
  ) &
  R56=$!
  (timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
   note "pytest gpu rc=$?") &
  TESTS=$!
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m deploycraft run recipes/resnet50_int8.yaml \
    --set data.image_size=224 --set data.train_subset=4096 --set data.val_subset=2048 \
    "${NO_LATER[@]}" "${AMP[@]}" -o "$RUNS/ddp_224" > "$RUNS/ddp_224.log" 2>&1
  note "torchrun nccl 224 rc=$?"
  wait $TESTS
  tail -5 "$OUT/pytest_gpu.txt" | tee -a "$OUT/steps.txt"
  wait $R56
;; esac
case " ${STEPS:-1 2 3} " in *" 4 "*)  # the gpu-marked tests alone (PYTEST_K: a -k selection)
  timeout "${PYTEST_LIMIT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} \
    > "$OUT/pytest_gpu.txt" 2>&1
  note "pytest gpu rc=$?"
  tail -5 "$OUT/pytest_gpu.txt" | tee -a "$OUT/steps.txt"
;; esac
note "done"
