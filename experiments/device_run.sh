#!/usr/bin/env bash
# The GPU numbers of docs/performance.md and RESULTS.md: the workload against the PyTorch peer, memory
# vs T, and the CIFAR-10 study, each under its own time limit, writing results to $OUT as it goes
# (the study resumes when rerun with the same --out). Needs .devcarry/ (ignored) with
# cifar10-jpeg-train.tar.gz and torch_peer.py, carried to the device.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/device.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, jax, flax, optax, torch; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
  echo "== bench: throughput, batch 256/1024, T=4, fp32/bf16, vs torch at 256"
  timeout 200 python3 -m experiments.bench --batch 256,1024 --steps 4 --dtype float32,bfloat16 --iters 20 \
      --vs-torch --torch-peer .devcarry/torch_peer.py --torch-batches 256 --out "$OUT/bench.jsonl"
  echo "== bench: rolled scan (unroll=1) vs auto, batch 256 bf16"
  timeout 40 python3 -m experiments.bench --batch 256 --steps 4 --dtype bfloat16 --iters 20 --scan-unroll 1 --out "$OUT/bench.jsonl"
  echo "== bench: memory and speed vs T and grad mode, batch 256 bf16"
  timeout 80 python3 -m experiments.bench --batch 256 --steps 1,16,64 --grad-modes full,remat,implicit --dtype bfloat16 --iters 3 --out "$OUT/bench_memory.jsonl"
  echo "== study: core models x 3 seeds"
  timeout 170 python3 -m experiments.study --protocol gpu --datasets cifar10 --variants fcnn,lccnn_T4,lceicnn_T4_l1e-3 \
      --archive .devcarry/cifar10-jpeg-train.tar.gz --out "$OUT/study_gpu.jsonl" --time-budget-s 150
  echo "== study: the other variants"
  timeout 150 python3 -m experiments.study --protocol gpu --datasets cifar10 \
      --variants lccnn_T1,lccnn_T2,lceicnn_T4_l1e-2,lceicnn_T4_param,lceicnn_T4_proj,fcnn_matched,unshared_T4 \
      --archive .devcarry/cifar10-jpeg-train.tar.gz --out "$OUT/study_gpu.jsonl" --time-budget-s 125
} 2>&1 | tee "$LOG" | grep -vE "^\s*$|Warning|warn\(" | tail -c 11000
