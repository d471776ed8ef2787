"""Benchmark of the reference workload (../shared/bench/WORKLOAD.md) with lateral_jax's own model
and train step. Prints one JSON line per configuration.

  python -m experiments.bench                                   # CPU defaults: batch 128, T=4, fp32
  python -m experiments.bench --grad-modes full,remat,truncated,implicit --steps 4
  python -m experiments.bench --memory-only --steps 4,16,64 --grad-modes full,remat,implicit
  python -m experiments.bench --batch 256,1024 --dtype float32,bfloat16 --vs-torch   # GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench --batch 64,128,256 --devices 1,8

Each line: images/s, step ms, compile s, peak memory (XLA's buffer assignment for the compiled
step; on GPU also the allocator's peak), the model FLOPs per trained image (analytic, 3× forward)
and the model FLOP utilisation against ``--peak-tflops`` (default: a per-device table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import peer_stepper
from lateral_jax.core import models
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import train
from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer
from lateral_jax.training.sharding import replicate, shard_batch

WIDTHS = (64, 128, 256)
# Dense peaks; XLA runs float32 convolutions on the tensor cores as TF32 by default.
PEAK_TFLOPS = {"H100": {"float32": 494.0, "bfloat16": 989.0}, "H200": {"float32": 494.0, "bfloat16": 989.0}}
TORCH_PEER = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "torch_peer.py"


def workload_model(
    num_steps: int,
    grad_mode: str,
    dtype,
    scan_unroll="auto",
    truncate_steps=None,
    conv_algorithm="auto",
    loop_kernel="xla",
) -> models.LateralCNN:
    """The reference LC-CNN: 3 stages 64/128/256, raw lateral layer (no norm), mixed-sign E/I 1e-3."""
    return models.LateralCNN(
        widths=WIDTHS,
        num_classes=10,
        num_steps=num_steps,
        lateral=LateralConfig.paper(lateral_init_scale=0.0, conv_algorithm=conv_algorithm, loop_kernel=loop_kernel),
        loop=LoopOptions(
            grad_mode=grad_mode,
            truncate_steps=truncate_steps,
            implicit_tol=1e-4,
            implicit_max_steps=max(1, num_steps),
            scan_unroll=scan_unroll,
        ),
        ei_mode="mixed_sign",
        ei_weight=1e-3,
        dtype=dtype,
    )


def flops_per_image(num_steps: int, widths=WIDTHS) -> float:
    """Training FLOPs per image: 3 × the convolutions' forward FLOPs (``models.forward_flops``)."""
    return 3.0 * models.forward_flops(widths, num_steps=num_steps)


def device_peak_tflops(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, table in PEAK_TFLOPS.items():
        if name in kind:
            return table[dtype]
    return None


def build_config(
    batch: int,
    num_steps: int,
    grad_mode: str,
    dtype: str,
    args,
    conv_algorithm="auto",
    num_devices: int = 1,
    loop_kernel: str = "xla",
):
    """One configuration's compiled train step and its inputs: ``(row, compiled, state, data)``.

    ``row`` holds the configuration, the compile time and XLA's memory plan.
    """
    if num_devices > len(jax.devices()) or batch % num_devices:
        raise ValueError(
            f"--devices {num_devices} needs that many devices (found {len(jax.devices())}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N) and a batch divisible by it (got {batch})."
        )
    mesh = make_mesh(jax.devices()[:num_devices])
    model = workload_model(
        num_steps,
        grad_mode,
        jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
        scan_unroll=args.scan_unroll if args.scan_unroll == "auto" else int(args.scan_unroll),
        truncate_steps=max(1, num_steps // 2) if grad_mode == "truncated" else None,
        conv_algorithm=conv_algorithm,
        loop_kernel=loop_kernel,
    )
    tx = make_optimizer(
        OptimizerConfig(name="momentum", learning_rate=0.01, weight_decay=0.0, schedule="constant", grad_clip_norm=None)
    )
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.standard_normal((batch, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, (batch,)).astype(np.int32),
    }
    state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 32, 32, 3))), mesh)
    data = shard_batch(host_batch, mesh)
    step = train.jit_train_step(model, tx, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_peak = None
    if mem is not None:
        xla_peak = int(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        )
    row = {
        "impl": "lateral_jax",
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "devices": num_devices,
        "steps": num_steps,
        "grad_mode": grad_mode,
        "dtype": dtype,
        "conv_algorithm": conv_algorithm,
        "loop_kernel": loop_kernel,
        "compile_s": round(compile_s, 2),
        "xla_peak_mib": None if xla_peak is None else round(xla_peak / 2**20, 1),
        "xla_temp_mib": None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1),
        "train_gflop_per_image": round(flops_per_image(num_steps) / 1e9, 3),
    }
    return row, compiled, state, data


def time_steps(row: dict, compiled, state, data, iters: int, warmup: int) -> dict:
    """Adds the speed of ``iters`` steps (after ``warmup``) of :func:`build_config`'s step to its ``row``."""
    batch, num_steps, dtype = row["batch"], row["steps"], row["dtype"]
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(iters):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / iters
    row.update(
        images_per_s=round(batch / dt, 1),
        step_ms=round(1e3 * dt, 2),
        loss=float(metrics["loss"]),
    )
    peak = device_peak_tflops(dtype)
    if peak:
        row["mfu"] = round(flops_per_image(num_steps) * batch / dt / (peak * 1e12), 4)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return row


def host_cpu() -> str:
    """The host CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    return _cpuinfo("model name") or platform.processor() or "unknown"


def host_cpu_vector_isa() -> str:
    """The host CPU's vector instruction sets that matter here (AVX2, AVX-512 subsets, AMX), from
    the ``flags`` of ``/proc/cpuinfo`` (empty where it is not available)."""
    flags = (_cpuinfo("flags") or "").split()
    return " ".join(sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx"))))


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_torch(python: str, peer: str, batch: int, num_steps: int, iters: int, extra: list[str], device: str) -> dict:
    cmd = [
        python,
        peer,
        "--batch",
        str(batch),
        "--steps",
        str(num_steps),
        "--iters",
        str(iters),
        "--device",
        device,
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"impl": "torch", "args": extra, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_variants(device: str) -> list[list[str]]:
    if device == "cpu":
        return [[]]
    return [[], ["--bf16", "--channels-last"], ["--compile", "--bf16", "--channels-last"]]


def our_configs(args):
    """Every (dtype, grad mode, conv algorithm, loop kernel, device count) the command line asks for."""
    return itertools.product(
        args.dtype.split(","),
        args.grad_modes.split(","),
        args.conv_algorithm.split(","),
        args.loop_kernel.split(","),
        map(int, args.devices.split(",")),
    )


def measure_round(args, rnd: int, rows: list[dict]) -> None:
    """One round: every configuration of ours, then (``--vs-torch``) the peer and the ratios."""
    torch_batches = None if args.torch_batches is None else set(map(int, args.torch_batches.split(",")))
    for batch in map(int, args.batch.split(",")):
        for num_steps in map(int, args.steps.split(",")):
            ours = []
            for dtype, mode, algorithm, loop_kernel, devices in our_configs(args):
                row, compiled, state, data = build_config(
                    batch, num_steps, mode, dtype, args, algorithm, devices, loop_kernel
                )
                if not args.memory_only:
                    time_steps(row, compiled, state, data, args.iters, args.warmup)
                row["round"] = rnd
                ours.append(row)
                print(json.dumps(row), flush=True)
            rows.extend(ours)
            if not args.vs_torch or args.memory_only or (torch_batches is not None and batch not in torch_batches):
                continue
            device = "cuda" if jax.default_backend() == "gpu" else "cpu"
            for extra in torch_variants(device):
                t = run_torch(args.torch_python, args.torch_peer, batch, num_steps, args.iters * 4, extra, device)
                t["round"] = rnd
                print(json.dumps(t), flush=True)
                rows.append(t)
                if "images_per_s" not in t:
                    continue
                for r in ours:
                    ratio = {
                        "ratio_vs": t["impl"] + ("-bf16" if t.get("bf16") else ""),
                        "ours": f"{r['dtype']}/{r['grad_mode']}/{r['conv_algorithm']}"
                        + (f"/{r['loop_kernel']}" if r["loop_kernel"] != "xla" else "")
                        + (f"/{r['devices']}dev" if r["devices"] > 1 else ""),
                        "batch": batch,
                        "steps": num_steps,
                        "ratio": round(r["images_per_s"] / t["images_per_s"], 3),
                        "round": rnd,
                    }
                    print(json.dumps(ratio), flush=True)
                    rows.append(ratio)


def _ask(peer: subprocess.Popen, line: str) -> dict:
    peer.stdin.write(line + "\n")
    peer.stdin.flush()
    reply = peer.stdout.readline()
    if not reply:
        raise RuntimeError(f"the peer stepper exited (rc {peer.wait()}): {peer.stderr.read().strip()[-2000:]}")
    return json.loads(reply)


def _alternate(compiled, state, data, peer: subprocess.Popen, pairs: int, block: int, rows: list[dict]):
    """``pairs`` blocks of ``block`` steps of ours and of the peer, alternating who goes first.

    Returns the per-step seconds of every block, ``(ours, peer)``, each ``[pairs][block]``, and the
    last metrics.  One warm-up step of ours comes first.
    """
    state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    ours_s, peer_s = [], []
    for pair in range(pairs):
        if pair % 2:
            peer_s.append(_ask(peer, str(block))["seconds"])
        times = []
        for _ in range(block):
            t0 = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        ours_s.append(times)
        if not pair % 2:
            peer_s.append(_ask(peer, str(block))["seconds"])
        line = {"pair": pair, "ours_s": [round(t, 4) for t in times], "peer_s": [round(t, 4) for t in peer_s[-1]]}
        line["speedup"] = round(float(np.mean(peer_s[-1]) / np.mean(times)), 3)
        print(json.dumps(line), flush=True)
        rows.append(line)
    return ours_s, peer_s, metrics


def measure_paired(args, rows: list[dict]) -> None:
    """``--paired N``: each configuration of ours against PyTorch eager in N pairs of step blocks.

    The peer's model lives in a child process (``experiments/peer_stepper.py`` run by
    ``--torch-python``), so the two train steps alternate seconds apart and a slow minute of a
    shared machine slows both; who goes first alternates too.  Prints one row per pair and a
    summary (:func:`experiments.peer_stepper.paired_summary`: median per-pair ratio, quartiles,
    sign test).  CPU only: the stepper runs the peer's fp32 eager step.
    """
    if jax.default_backend() != "cpu":
        raise ValueError("--paired compares with PyTorch eager on the CPU; on a GPU use --vs-torch --rounds N.")
    stepper = Path(__file__).with_name("peer_stepper.py")
    for batch, num_steps in itertools.product(map(int, args.batch.split(",")), map(int, args.steps.split(","))):
        cmd = [args.torch_python, str(stepper), args.torch_peer, "--batch", str(batch), "--steps", str(num_steps)]
        cmd += ["--compile"] if args.paired_peer == "compile" else []
        peer = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = json.loads(peer.stdout.readline() or "null")
            if not ready:
                raise RuntimeError(f"the peer stepper did not start: {peer.stderr.read().strip()[-2000:]}")
            for dtype, mode, algorithm, loop_kernel, devices in our_configs(args):
                row, compiled, state, data = build_config(
                    batch, num_steps, mode, dtype, args, algorithm, devices, loop_kernel
                )
                ours_s, peer_s, metrics = _alternate(compiled, state, data, peer, args.paired, args.paired_block, rows)
                summary = {
                    "paired_ratio_vs": f"torch-{args.paired_peer}",
                    "torch_setup_s": ready.get("setup_s"),
                    "torch": ready.get("torch"),
                    "torch_threads": ready.get("threads"),
                    **{k: row[k] for k in ("batch", "steps", "grad_mode", "dtype", "conv_algorithm", "loop_kernel")},
                    "devices": row["devices"],
                    "compile_s": row["compile_s"],
                    "xla_temp_mib": row["xla_temp_mib"],
                    "loss": float(metrics["loss"]),
                    "block": args.paired_block,
                    **peer_stepper.paired_summary(
                        [float(np.mean(t)) for t in ours_s], [float(np.mean(t)) for t in peer_s], batch
                    ),
                }
                if args.paired_block > 1:  # the same without each block's first step (caches cold after a switch)
                    summary["warm"] = peer_stepper.paired_summary(
                        [float(np.mean(t[1:])) for t in ours_s], [float(np.mean(t[1:])) for t in peer_s], batch
                    )
                print(json.dumps(summary), flush=True)
                rows.append(summary)
        finally:
            if peer.poll() is None:
                peer.stdin.write("quit\n")
                peer.stdin.close()
                peer.wait(timeout=60)


def median_ratios(rows: list[dict]) -> list[dict]:
    """The median over rounds of every (ours, peer, batch, T) ratio, with its range."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if "ratio" in r:
            groups.setdefault((r["ours"], r["ratio_vs"], r["batch"], r["steps"]), []).append(r["ratio"])
    return [
        {
            "median_ratio_vs": vs,
            "ours": ours,
            "batch": batch,
            "steps": steps,
            "median_ratio": round(float(np.median(ratios)), 3),
            "min": min(ratios),
            "max": max(ratios),
            "rounds": len(ratios),
        }
        for (ours, vs, batch, steps), ratios in groups.items()
    ]


def parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="128")
    p.add_argument("--steps", default="4", help="comma-separated lateral loop counts T")
    p.add_argument("--grad-modes", default="full")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--scan-unroll", default="auto", help="'auto' or an int unroll factor for lax.scan")
    p.add_argument(
        "--conv-algorithm",
        default="auto",
        help="comma-separated LateralConfig.conv_algorithm values: auto,xla,winograd",
    )
    p.add_argument(
        "--loop-kernel",
        default="xla",
        help="comma-separated LateralConfig.loop_kernel values: xla,pallas (the fused Pallas loop kernel; "
        "grad mode 'full' only; off GPU it runs in Pallas's interpreter, slower than XLA)",
    )
    p.add_argument(
        "--devices",
        default="1",
        help="comma-separated device counts for data parallelism (the batch is split over them; on CPU "
        "fake devices need XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    p.add_argument("--memory-only", action="store_true", help="compile and report XLA's memory plan; do not run")
    p.add_argument("--vs-torch", action="store_true", help="also run ../shared/bench/torch_peer.py and print ratios")
    p.add_argument("--torch-peer", default=str(TORCH_PEER), help="path of torch_peer.py")
    p.add_argument("--torch-batches", default=None, help="batch sizes to run the peer at (default: all)")
    p.add_argument("--torch-python", default=sys.executable, help="python that has torch (default: this one)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every measurement (ours, then the peer) this many times and print the median ratios; "
        "on a shared machine single runs drift by ±15%%",
    )
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="CPU: N pairs of step blocks of ours and of PyTorch eager, alternating (the peer kept alive in "
        "a child process); prints per-pair speed-ups, their median and a sign test. Replaces --vs-torch/--rounds",
    )
    p.add_argument(
        "--paired-block",
        type=int,
        default=3,
        metavar="K",
        help="with --paired: steps per side in each pair (the summary also reports the pairs without each "
        "block's first step)",
    )
    p.add_argument(
        "--paired-peer",
        choices=("eager", "compile"),
        default="eager",
        help="with --paired: the peer's step in eager mode or under torch.compile (inductor; compiled before timing)",
    )
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    return p


def env_header() -> dict:
    """Where a measurement ran: Python, jax, backend, devices, CPU model and vector instruction sets,
    and the allocator settings (XLA:CPU maps a fresh temporary buffer per step)."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpus": os.cpu_count(),
        "cpu_model": host_cpu(),
        "cpu_isa": host_cpu_vector_isa(),
        **{k.lower(): os.environ[k] for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if os.environ.get(k)},
    }


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.paired < 0 or args.paired_block < 1:
        p.error(
            f"--paired needs N >= 1 pairs and --paired-block K >= 1 steps; got {args.paired} and {args.paired_block}"
        )
    header = env_header()
    print(json.dumps({"env": header}), flush=True)
    rows: list[dict] = []
    if args.paired:
        measure_paired(args, rows)
    for rnd in range(0 if args.paired else args.rounds):
        measure_round(args, rnd, rows)
    if args.rounds > 1:
        for row in median_ratios(rows):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            for r in [{"env": header}, *rows]:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
