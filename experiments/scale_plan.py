"""The numbers behind docs/scaling.md: per-device memory and FLOPs of the ImageNet configs' train step.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m experiments.scale_plan --out results/scale_plan.jsonl [--per-device 32,128] [--models ...]
  python -m experiments.scale_plan --out results/scale_plan.jsonl --table

For each model (ResNet-18 / ResNet-50 of ``experiments/configs/imagenet.py``, T = 0 and T = 2) and
per-device batch, the data-parallel train step is compiled for 224² bfloat16 inputs over the 8
(fake CPU) devices of this machine, and one row is appended: XLA's memory plan per device
(arguments = replicated parameters and optimiser state + the batch shard, temporaries), and the
forward and train-step FLOPs per image from XLA's cost analysis.  Nothing runs: these are
compile-time plans of XLA:CPU, which a GPU or TPU compiler lays out differently (docs/scaling.md
says how the projection uses them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.configs import base, imagenet  # noqa: E402
from lateral_jax.core import models  # noqa: E402
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import run, train  # noqa: E402
from lateral_jax.training.optimizer import make_optimizer
from lateral_jax.training.sharding import batch_sharding, replicated

MODELS = {
    "resnet18_T0": ("", "lateral_resnet_T0"),
    "resnet18_T2": ("", "lateral_resnet_T2"),
    "resnet50_T0": ("resnet50", "lateral_resnet_T0"),
    "resnet50_T2": ("resnet50", "lateral_resnet_T2"),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = sorted({f for f in flags if f.startswith(("avx", "amx"))})
    return f"{fields.get('Model name', '?').strip()} ({' '.join(isa)})"


def plan_row(name: str, per_device: int) -> dict:
    variant, model_variant = MODELS[name]
    config = base.to_run_config(imagenet.get_config(variant), model_variant)
    model = run.build_model(config.model, 1000, (224, 224, 3))
    mesh = make_mesh()
    tx = make_optimizer(config.optimizer)
    example = jnp.zeros((1, 224, 224, 3), jnp.float32)
    state = jax.eval_shape(lambda: train.init_state(model, tx, jax.random.key(0), example))
    global_batch = per_device * mesh.size
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, 224, 224, 3), jnp.float32, sharding=batch_sharding(mesh)),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sharding(mesh)),
    }
    state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), state)
    step = train.jit_train_step(model, tx, mesh, label_smoothing=config.label_smoothing)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    step_flops = float(compiled.cost_analysis()["flops"])  # per device: its shard of the batch
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits).lower(state.params, example)
    forward_flops = float(forward.cost_analysis()["flops"])
    return {
        "model": name,
        "per_device_batch": per_device,
        "devices": mesh.size,
        "params": models.param_count(state.params),
        "forward_gflop_per_image": round(forward_flops / 1e9, 3),
        "train_gflop_per_image": round(step_flops / per_device / 1e9, 3),
        "argument_mib": round(mem.argument_size_in_bytes / 2**20, 1),
        "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
        "output_mib": round(mem.output_size_in_bytes / 2**20, 1),
        "alias_mib": round(mem.alias_size_in_bytes / 2**20, 1),
        "compile_s": round(compile_s, 1),
        "dtype": config.model.dtype,
        "backend": jax.default_backend(),
        "cpu": cpu_model(),
        "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


IMAGENET_TRAIN = 1_281_167


def table(rows: list[dict], *, epochs: int = 90, hours: tuple[float, ...] = (24.0, 8.0)) -> str:
    """The markdown table of docs/scaling.md: measured columns, then what a run of ``epochs`` epochs
    in each of ``hours`` would need (images/s over the whole job, and the sustained PFLOP/s)."""
    head = ["model", "params (M)", "forward GFLOP/img", "train GFLOP/img", "per-device batch", "per-device MiB"]
    head += [f"{epochs} ep in {h:g} h: img/s, PFLOP/s" for h in hours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        resident = r["argument_mib"] + r["temp_mib"] + r["output_mib"] - r["alias_mib"]
        cells = [
            r["model"],
            f"{r['params'] / 1e6:.1f}",
            f"{r['forward_gflop_per_image']:.2f}",
            f"{r['train_gflop_per_image']:.2f}",
            str(r["per_device_batch"]),
            f"{resident:,.0f}",
        ]
        for h in hours:
            rate = IMAGENET_TRAIN * epochs / (h * 3600)
            cells.append(f"{rate:,.0f}, {rate * r['train_gflop_per_image'] / 1e6:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/scale_plan.jsonl")
    parser.add_argument("--per-device", default="32,128", help="per-device batch sizes, comma-separated")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table([json.loads(line) for line in out.read_text().splitlines()]))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        for per_device in (int(b) for b in args.per_device.split(",")):
            row = plan_row(name, per_device)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
