"""The training system: data, jitted data-parallel steps, the resumable loop, checkpoints and
runs.  Builds on :mod:`lateral_jax.core`."""
