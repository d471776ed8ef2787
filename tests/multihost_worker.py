"""One process of the multi-host test: joins a 2-process JAX runtime on localhost (CPU collectives),
feeds its own shard of the data through the real pipeline, runs N data-parallel train steps and
writes the parameters.  With --processes 1 it is the single-process reference on the global batch."""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", num_processes=a.processes, process_id=a.process_id)
    import jax.numpy as jnp

    from lateral_jax.core import models
    from lateral_jax.core.recurrence import LateralConfig
    from lateral_jax.core.sharding import make_mesh
    from lateral_jax.training import train
    from lateral_jax.training.data import pipeline, sources, synthetic
    from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer
    from lateral_jax.training.sharding import replicate, shard_batch

    assert jax.process_count() == a.processes and jax.device_count() == a.processes
    model = models.LCEICNN(widths=(4, 8), num_steps=2, lateral=LateralConfig.stable(num_groups=2), ei_weight=1e-2)
    tx = make_optimizer(OptimizerConfig(name="momentum", learning_rate=0.05, total_steps=a.steps))
    mesh = make_mesh()
    state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 32, 32, 1))), mesh)
    src = sources.ArraySource(synthetic.make_task("contour", 64, seed=0))
    it = iter(
        pipeline.train_dataset(
            src, global_batch_size=16, seed=0, process_index=jax.process_index(), process_count=jax.process_count()
        )
    )
    step = train.jit_train_step(model, tx, mesh)
    for _ in range(a.steps):
        state, metrics = step(state, shard_batch(next(it), mesh))
    flat = {
        jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
        for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    if jax.process_index() == 0:
        np.savez(a.out, loss=float(np.asarray(metrics["loss"].addressable_data(0))), **flat)
    if a.processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
