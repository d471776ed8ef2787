#!/usr/bin/env bash
# Second device run on the warm machine: the PyTorch peer side by side with ours, batch 1024, and the
# remaining study seeds (resuming .devcarry/study_gpu_part1.jsonl).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp .devcarry/study_gpu_part1.jsonl "$OUT/study_gpu.jsonl"
{
  timeout 150 python3 -m experiments.bench --batch 256 --steps 4 --dtype float32,bfloat16 --iters 20 \
      --vs-torch --torch-peer .devcarry/torch_peer.py --out "$OUT/bench_vs_torch.jsonl"
  timeout 40 python3 -m experiments.bench --batch 1024 --steps 4 --dtype bfloat16 --iters 10 --out "$OUT/bench_vs_torch.jsonl"
  timeout 190 python3 -m experiments.study --protocol gpu --datasets cifar10 \
      --variants unshared_T4,lccnn_T1,lccnn_T2,lceicnn_T4_l1e-2,lceicnn_T4_param,lceicnn_T4_proj,fcnn_matched \
      --archive .devcarry/cifar10-jpeg-train.tar.gz --cache-dir /tmp/cache --out "$OUT/study_gpu.jsonl" --time-budget-s 165
} 2>&1 | tee "$OUT/device2.log" | grep -vE "^\s*$|Warning|warn\(|cuda_timer" | tail -c 9000
