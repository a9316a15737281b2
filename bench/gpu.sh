#!/usr/bin/env bash
# ViT-B/16 bf16 training-step throughput and MFU on one GPU, in one run, printed as a table:
# our trainer (DeepSpeed ZeRO-1) with activation checkpointing and torch.compile on and off, and a plain
# timm + autocast loop (eager and compiled). Beside each of our rows: what `vit-scale plan` predicts for that
# setting on this GPU (allocated peak memory and images/s at the planner's MFU), with the error; the planner's
# goal is within 10% (docs/planning.md). Then the data row: images/s of the loader with data.decode=gpu
# (nvJPEG on this GPU) against data.decode=cpu on the same shards of 1024x768 photos (bench/data.py).
# Needs only this project and its wheels (no network; the photos come inside scikit-learn's wheel).
#
#   bash bench/gpu.sh                 # defaults: batch 128, 30 timed steps after 15 warm-up steps
#   BATCH=256 STEPS=50 bash bench/gpu.sh
#   DATA_ONLY=1 bash bench/gpu.sh     # the data row alone (about 1 minute)
#
# Budget: under 8 minutes on one H100 (six settings; the four compiled ones spend most of it compiling),
# plus about 1 minute for the data row.
# Record the table, the GPU and the date in docs/performance.md ("Training step on GPU"), and the measured MFU
# of "ours ZeRO-1" in vit_scale/plan/hardware.py (MEASURED_MFU), which the planner then uses for that GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/gpu-$(date -u +%Y%m%dT%H%M%SZ).json}

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device visible")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "date: $(date -u +%FT%TZ)  torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"

if [ -z "${DATA_ONLY:-}" ]; then
  timeout "${TIMEOUT:-470}" "$PYTHON" bench/train_step.py gpu \
    --batch "${BATCH:-128}" --steps "${STEPS:-30}" --warmup "${WARMUP:-15}" --out "$OUT" \
    ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"} "$@"
  echo "result: $OUT"
fi
# The workers only parse tars on the GPU path, so it needs fewer of them; both rows get the same count.
timeout "${DATA_TIMEOUT:-150}" "$PYTHON" bench/data.py --compare-decode --size 1024x768 \
  --images "${DATA_IMAGES:-1024}" --workers "${DATA_WORKERS:-8}" --batch "${DATA_BATCH:-128}"
