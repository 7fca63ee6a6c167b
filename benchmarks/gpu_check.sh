#!/usr/bin/env bash
# One prepared run of every GPU figure the project reports (docs/benchmarks.md, "GPU figures"):
# the CUDA tests, inference throughput of the default model and the paper preset on 2048^2 planes
# (fp32, fp16, bf16; batch swept), the engine's back-off on a real out-of-memory, and training
# steps per second with and without torch.compile. Prints everything; with OUT set, also keeps
# the JSON figures there.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine, from the repository root
#   DEVICE=cpu SIZE=256 QUICK=1 bash benchmarks/gpu_check.sh   # a dry run of the same commands on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-2048}
OUT=${OUT:-$(mktemp -d)}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
failures=0
run() {  # a step that fails is reported and the rest still runs
  echo "+ $*"
  "$@" || { echo "FAILED ($?): $*"; failures=$((failures + 1)); }
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  run python -m pytest -q tests/test_cuda.py
fi

repeats=$([ "$QUICK" = 1 ] && echo 2 || echo 10)
batches=$([ "$QUICK" = 1 ] && echo "1" || echo "1 2 4 8")
for model in lite:aligned paper:official; do  # the default model's pairing, and the paper's
  preset=${model%%:*} pairing=${model##*:}
  for dtype in fp32 fp16 bf16; do
    for batch in $batches; do
      run python benchmarks/bench_model.py --preset "$preset" --pairing "$pairing" --device "$DEVICE" --dtype "$dtype" \
        --sizes "$SIZE" --batch "$batch" --repeats "$repeats" --json "$OUT/forward-$preset-$dtype-b$batch.json"
    done
  done
done

# A real out-of-memory: more tiles per pass than the card holds; the engine halves the batch until it fits.
run python - "$DEVICE" "$SIZE" <<'EOF'
import sys, time
import numpy as np
from napari_mpt_deblur.config import DeblurSettings
from napari_mpt_deblur.inference import iter_deblur
from napari_mpt_deblur.models.presets import build_model

device, size = sys.argv[1], int(sys.argv[2])
plane = np.random.default_rng(0).random((1, 2 * size, 2 * size)).astype(np.float32)
settings = DeblurSettings(device=device, tile=size, batch=64 if device == "cuda" else 1)
start, messages = time.perf_counter(), []
for event in iter_deblur(build_model("paper"), plane, "ZYX", settings):
    if event.message:
        messages.append(event.message)
        print(f"{time.perf_counter() - start:7.1f} s  {event.message}", flush=True)
print(f"done in {time.perf_counter() - start:.1f} s after {len(messages)} back-off(s)")
EOF

steps=$([ "$QUICK" = 1 ] && echo 4 || echo 40)
compiles=$([ "$DEVICE" = cuda ] && echo "none --compile" || echo "none")  # compiling on a CPU takes many minutes
train_batches=$([ "$QUICK" = 1 ] && echo "8" || echo "8 32")
for compile in $compiles; do
  [ "$compile" = none ] && compile=""
  for batch in $train_batches; do
    run python benchmarks/bench_training.py --preset lite --device "$DEVICE" --batch "$batch" --patch 128 --beta 0 \
      --steps "$steps" --warmup 3 $compile --json "$OUT/train-lite-b$batch${compile:+-compile}.json"
  done
done

echo "figures in $OUT; $failures step(s) failed"
exit $((failures > 0))
