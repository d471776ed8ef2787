"""The fused Pallas loop kernel against the XLA loop on whatever device JAX runs on.

For each preset (the workload's raw layer, the stable GroupNorm layer) and compute dtype, builds the
same LateralCNN with ``loop_kernel="xla"`` and ``"pallas"``, and prints one JSON line: the worst
relative error over the logits and every parameter gradient of the cross-entropy, whether it is
within the bound, and the time of a jitted gradient step of each.  Exits with status 1 if any check
fails, so a device script can stop before benchmarking a wrong kernel.

  python -m experiments.fused_check                                   # workload widths, batch 16, T = 4
  python -m experiments.fused_check --widths 16,16,16 --batch 2 --steps 1 --dtype float32   # tiny, CPU

Errors are max |Δ| / max |reference| against the float32 XLA model.  Bounds: float32 1e-4 on CPU
and 2e-2 on GPU (XLA's float32 convolutions run as TF32 there); bfloat16 max(5e-2, 1.5 × the error
of XLA's own bfloat16 path), because bfloat16 rounding alone moves small gradients by 10 % or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lateral_jax.core import models
from lateral_jax.core.recurrence import LateralConfig


def tolerance(dtype: str) -> float:
    if dtype == "bfloat16":
        return 5e-2
    return 2e-2 if jax.default_backend() == "gpu" else 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def timed(fn, *args, iters: int) -> tuple[object, float]:
    out = jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def _errors(result, reference) -> dict[str, float]:
    """Relative error of the logits and of every parameter gradient; ``result = ((loss, logits), grads)``."""
    ((_, logits), grads), ((_, logits_ref), grads_ref) = result, reference
    errors = {"logits": rel_err(logits, logits_ref)}
    flat_ref = jax.tree_util.tree_flatten_with_path(grads_ref)[0]
    for (path, ref), got in zip(flat_ref, jax.tree_util.tree_leaves(grads), strict=True):
        errors["grad" + jax.tree_util.keystr(path)] = rel_err(got, ref)
    return errors


def check(preset: str, dtype: str, widths, batch: int, num_steps: int, iters: int) -> dict:
    """Pallas vs XLA in ``dtype``, both measured against the float32 XLA model.

    float32: the fused kernel's worst relative error must be within :func:`tolerance`.  bfloat16:
    the rounding of bfloat16 itself moves small gradients by 10 % or more, so the fused kernel must
    be no less accurate than XLA's bfloat16 path: worst error ≤ max(tolerance, 1.5 × XLA's).
    """
    lateral = LateralConfig.paper() if preset == "paper" else LateralConfig.stable(num_groups=4)
    lateral = dataclasses.replace(lateral, lateral_init_scale=0.5)  # non-trivial lateral input
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)

    def model(loop_kernel, compute):
        config = dataclasses.replace(lateral, loop_kernel=loop_kernel)
        return models.LateralCNN(widths=widths, num_classes=10, num_steps=num_steps, lateral=config, dtype=compute)

    def loss_and_grad(m):
        def loss(p):
            logits = m.apply({"params": p}, x).logits.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    params = model("xla", jnp.float32).init(jax.random.key(0), x[:1])["params"]
    reference = loss_and_grad(model("xla", jnp.float32))(params)
    xla_result, t_xla = timed(loss_and_grad(model("xla", compute)), params, iters=iters)
    fused_result, t_fused = timed(loss_and_grad(model("pallas", compute)), params, iters=iters)
    fused_err, xla_err = _errors(fused_result, reference), _errors(xla_result, reference)
    worst = max(fused_err, key=fused_err.get)
    bound = tolerance(dtype) if dtype != "bfloat16" else max(tolerance(dtype), 1.5 * max(xla_err.values()))
    return {
        "device": jax.devices()[0].device_kind,
        "preset": preset,
        "dtype": dtype,
        "widths": list(widths),
        "batch": batch,
        "steps": num_steps,
        "max_rel_err": fused_err[worst],
        "worst": worst,
        "xla_max_rel_err": max(xla_err.values()),
        "bound": bound,
        "ok": fused_err[worst] <= bound,
        "grad_step_ms_xla": round(1e3 * t_xla, 2),
        "grad_step_ms_pallas": round(1e3 * t_fused, 2),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--presets", default="paper,stable")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    failed = False
    for preset in args.presets.split(","):
        for dtype in args.dtype.split(","):
            row = check(preset, dtype, widths, args.batch, args.steps, args.iters)
            print(json.dumps(row), flush=True)
            failed |= not row["ok"]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
