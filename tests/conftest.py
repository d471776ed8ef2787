"""Strict JAX for every test: rank promotion raises, and 8 fake CPU devices exist for data-parallel tests.

One persistent compilation cache serves the whole run: the pytest-xdist workers and the training
subprocesses that tests start inherit its folder from this process's environment, so a program
compiled once (e.g. a killed run and its resumption) is not compiled again.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lateral_jax_tests_jit_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
