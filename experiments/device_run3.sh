#!/usr/bin/env bash
# The prepared GPU checks of the fused kernel, ≈ 8 minutes of device time:
#   1. the fused Pallas loop kernel against the XLA loop on the GPU (experiments/fused_check.py);
#   2. if it passes: the workload with loop_kernel=xla,pallas side by side with torch.compile (batch
#      256, bf16) and at batch 1024 (MFU);
#   3. memory vs T on the GPU with remat's batch slices (remat_batch_chunks="auto").
# Needs .devcarry/ (ignored) with torch_peer.py; run it with
#   carry [".devcarry"], command "bash experiments/device_run3.sh", timeout_s 600.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "== fused kernel vs XLA loop (logits and gradients, fp32 and bf16)"
  KERNELS=xla
  timeout 150 python3 -m experiments.fused_check > "$OUT/fused_check.jsonl"
  rc=$?; cat "$OUT/fused_check.jsonl"; echo "fused_check exit status $rc"
  if [ "$rc" -eq 0 ]; then KERNELS=xla,pallas; fi
  echo "== bench: batch 256, T=4, bf16, loop kernels $KERNELS, vs torch"
  timeout 150 python3 -m experiments.bench --batch 256 --steps 4 --dtype bfloat16 --loop-kernel "$KERNELS" \
      --iters 20 --vs-torch --torch-peer .devcarry/torch_peer.py --out "$OUT/bench.jsonl"
  echo "== bench: batch 1024 (MFU)"
  timeout 60 python3 -m experiments.bench --batch 1024 --steps 4 --dtype bfloat16 --loop-kernel "$KERNELS" \
      --iters 10 --out "$OUT/bench.jsonl"
  echo "== bench: memory plan vs T"
  timeout 60 python3 -m experiments.bench --batch 256 --steps 1,4,16,64 --grad-modes full,remat,implicit \
      --dtype bfloat16 --memory-only --out "$OUT/bench_memory.jsonl"
} 2>&1 | tee "$OUT/device3.log" | grep -vE "^\s*$|Warning|warn\(|cuda_timer" | tail -c 11000
