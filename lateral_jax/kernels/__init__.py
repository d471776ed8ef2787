"""How the lateral loop's arithmetic is computed, beneath the maths of :mod:`lateral_jax.core`.

* :mod:`~lateral_jax.kernels.convolution`: the convolution every cell calls, dispatching by
  ``conv_algorithm`` to XLA's convolution or :mod:`~lateral_jax.kernels.winograd` (F(4×4, 3×3));
* :mod:`~lateral_jax.kernels.batching`: equal batch chunks (Winograd's cache-sized chunks and
  ``"remat"`` mode's batch chunks);
* :mod:`~lateral_jax.kernels.fused` and :mod:`~lateral_jax.kernels.fused_kernels`: the whole loop
  as one Pallas kernel with a hand-written backward pass (``loop_kernel="pallas"``).

The convolution kernels import only the core's types (:mod:`lateral_jax.core.config`); the fused
loop kernel implements the core's cell (:mod:`lateral_jax.core.cell`) and is called by
:mod:`lateral_jax.core.recurrence` alone (``tests/architecture_test.py``).
"""
