"""The in-silico neurophysiology suite: stimuli, probing a model, response and connection
statistics, plots.  Builds on :mod:`lateral_jax.core` (a model is used only through its apply
function and per-loop states)."""
