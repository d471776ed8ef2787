"""The model core: the lateral layer's pure maths and API, E/I separation, Flax layers and models,
and the fast convolution and loop kernels.  Imports nothing from :mod:`lateral_jax.training` or
:mod:`lateral_jax.neuro`."""
