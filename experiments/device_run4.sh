#!/usr/bin/env bash
# CIFAR-10 at a real schedule on one GPU, writing the study's results files (RESULTS.md, §1):
#   1. protocol reduced_long: the cifar10.py model (widths 32/64/128, 10,000-image subset, float32)
#      for 30 epochs — F-CNN, parameter-matched F-CNN, LC-CNN, LCEI-CNN, unshared control, 3 seeds;
#   2. protocol gpu_full: widths 64/128/256, all 45,000 training images, bf16, 25 epochs, every
#      variant, seeds breadth-first until the time budget.
# Each run's metrics.jsonl (the learning curve: has training accuracy flattened?) is kept.
# Needs .devcarry/ (ignored) with cifar10-jpeg-train.tar.gz; run with
#   carry [".devcarry"], command "bash experiments/device_run4.sh", timeout_s 590.
# The results files already in results/ are copied in first, so a second call resumes (finished
# rows are skipped): commit what came back, then call again.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=/tmp/study4; mkdir -p "$WORK"
ARCHIVE=.devcarry/cifar10-jpeg-train.tar.gz
for f in study_reduced_long_cifar10 study_gpu_full_cifar10; do
  [ -f "results/$f.jsonl" ] && cp "results/$f.jsonl" "$WORK/$f.jsonl"
done
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "== reduced_long: 5 models x 3 seeds, 30 epochs"
  timeout 200 python3 -m experiments.study --protocol reduced_long --datasets cifar10 --archive "$ARCHIVE" \
      --variants fcnn,fcnn_matched,lccnn_T4,lceicnn_T4_l1e-3,unshared_T4 --time-budget-s 170 \
      --out "$WORK/study_reduced_long_cifar10.jsonl"
  echo "== gpu_full: every variant x 3 seeds, 25 epochs"
  timeout 330 python3 -m experiments.study --protocol gpu_full --datasets cifar10 --archive "$ARCHIVE" \
      --time-budget-s 280 --out "$WORK/study_gpu_full_cifar10.jsonl"
  python3 -m experiments.study --tables "$WORK/study_reduced_long_cifar10.jsonl,$WORK/study_gpu_full_cifar10.jsonl"
} 2>&1 | tee "$OUT/device4.log" | grep -vE "^\s*$|Warning|warn\(" | tail -c 11000
cp "$WORK"/*.jsonl "$OUT/" 2>/dev/null
# the learning curves: every run's metrics.jsonl in one tarball
(cd "$WORK" && tar czf "$OUT/curves.tar.gz" $(ls -d *_runs/*/metrics.jsonl 2>/dev/null)) || true
