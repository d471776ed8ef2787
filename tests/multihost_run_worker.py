"""One process of a whole multi-host training run (``run.train_and_evaluate``): joins an N-process JAX
runtime on localhost (CPU collectives), one CPU device per process, and trains a tiny contour run
in ``--workdir`` with checkpoints at every step, so that the test can kill it mid-way and resume it."""

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_run_config(device_data: bool):
    from lateral_jax.core.config import LateralConfig
    from lateral_jax.training import config
    from lateral_jax.training.optimizer import OptimizerConfig

    return config.RunConfig(
        data=config.DataConfig(dataset="contour", num_train=160, num_validation=72, augment=False),
        model=config.ModelConfig(kind="lccnn", widths=(4,), num_steps=1, lateral=LateralConfig.stable(num_groups=2)),
        optimizer=OptimizerConfig(name="momentum", learning_rate=0.05, warmup_steps=0),
        batch_size=16,
        num_epochs=4.0,
        log_every=5,
        checkpoint_every=1,
        keep_checkpoints=50,
        device_data=device_data,
        progress=False,
        spectral_images=0,
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workdir", required=True)
    p.add_argument("--device-data", action="store_true")
    a = p.parse_args()
    if a.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", num_processes=a.processes, process_id=a.process_id)
    from lateral_jax.training import run

    assert jax.process_count() == a.processes
    result = run.train_and_evaluate(tiny_run_config(a.device_data), a.workdir)
    print(f"process {jax.process_index()}: steps {result['steps']}", flush=True)
    if a.processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
