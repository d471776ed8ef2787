"""Property-based tests of the config boundary: generated command lines with one invalid field each
are refused before training (``experiments.main.parse`` raises the ``UsageError`` that ``main``
turns into exit 2 and one line on stderr) with a message naming that field; generated valid
command lines pass.  A seeded generator (numpy), so a failure reproduces from its case number."""

import math

import numpy as np
import pytest

from experiments import main as main_module

CONFIG = "--config=experiments/configs/contour.py:smoke"
NAN, INF = "nan", "inf"

# field -> (invalid values, a sampler of valid values); the field's leaf name must be in the message
FIELDS = {
    "batch_size": (["0", "-1", "-32"], lambda r: str(int(r.integers(1, 65)))),
    "num_epochs": (["0", "-1", NAN, INF, "-" + INF, "1.5"], lambda r: str(float(r.integers(1, 3)))),
    "log_every": (["-1", "-10"], lambda r: str(int(r.integers(0, 50)))),
    "eval_every": (["-1", "-7"], lambda r: str(int(r.integers(0, 50)))),
    "checkpoint_every": (["-1", "-3"], lambda r: str(int(r.integers(0, 50)))),
    "keep_checkpoints": (["0", "-1"], lambda r: str(int(r.integers(1, 5)))),
    "spectral_images": (["-1", "-8"], lambda r: str(int(r.integers(0, 16)))),
    "label_smoothing": (["-0.1", "1.0", "1.5", NAN], lambda r: str(round(float(r.uniform(0, 0.5)), 3))),
    "model.ei_weight": (["-1.0", "-1e-3", NAN, INF], lambda r: str(float(10 ** r.uniform(-5, -1)))),
    "model.excitatory_fraction": (["-0.1", "1.5", NAN], lambda r: str(round(float(r.uniform(0, 1)), 3))),
    "model.num_steps": (["-1", "-4"], lambda r: str(int(r.integers(0, 5)))),
    "model.widths": (["()", "(0, 8)", "(-8, 8)", "(8, 0)"], lambda r: f"({8 * int(r.integers(1, 3))}, 8)"),
    "model.lateral.num_groups": (["3", "5", "0", "-2"], lambda r: str(int(r.choice([1, 2, 4, 8])))),
    "model.lateral.kernel_size": (["2", "4", "0", "-3"], lambda r: str(int(r.choice([1, 3, 5])))),
    "model.lateral.lateral_size": (["2", "6", "0"], lambda r: str(int(r.choice([1, 3, 5])))),
    "model.lateral.leak": (["0.0", "1.5", "-0.5", NAN], lambda r: str(round(float(r.uniform(0.1, 1.0)), 3))),
    "model.lateral.lateral_init_scale": (["-1.0", "-0.1", NAN], lambda r: str(round(float(r.uniform(0, 1)), 3))),
    "model.lateral.activation": (["sigmoidal", "RELU"], lambda r: str(r.choice(["relu", "gelu", "tanh"]))),
    "model.lateral.loop_norm": (["batch", "Group"], lambda r: str(r.choice(["none", "group", "layer"]))),
    "model.loop.grad_mode": (["bptt", "implicit_"], lambda r: str(r.choice(["full", "remat"]))),
    "model.loop.implicit_tol": (["0.0", "-1e-5", NAN], lambda r: str(float(10 ** r.uniform(-7, -3)))),
    "model.loop.implicit_max_steps": (["0", "-5"], lambda r: str(int(r.integers(1, 200)))),
    "model.dtype": (["float16", "fp32"], lambda r: str(r.choice(["float32", "bfloat16"]))),
    "model.ei_mode": (["dale", "mixed"], lambda r: str(r.choice(["none", "mixed_sign", "project"]))),
    "model.contractor_weight": (["-1.0", NAN, INF, "1.0"], lambda r: "0.0"),  # 1.0 needs implicit mode
    "model.hgru.kernel_size": (["4", "0"], lambda r: str(int(r.choice([3, 5, 7])))),
    "model.hgru.chronos_steps": (["1", "0"], lambda r: str(int(r.integers(2, 12)))),
    "optimizer.learning_rate": (["0.0", "-1e-3", NAN, INF], lambda r: str(float(10 ** r.uniform(-4, -1)))),
    "optimizer.weight_decay": (["-1e-4", NAN, INF], lambda r: str(float(10 ** r.uniform(-6, -2)))),
    "data.validation_fraction": (["0.0", "1.0", "-0.5", NAN], lambda r: str(round(float(r.uniform(0.05, 0.5)), 3))),
    "data.num_train": (["0", "-64"], lambda r: str(int(r.integers(64, 512)))),
    "data.crop": (["centre", "random"], lambda r: str(r.choice(["pad", "random_resized"]))),
}
# valid values that are only valid together with another field: cross-field rules
CROSS_FIELD = [
    ("model.loop.truncate_steps", ["2"], "truncate_steps"),  # only with grad_mode='truncated'
    ("model.loop.grad_mode", ["truncated"], "truncate_steps"),  # needs truncate_steps
    ("num_epochs", ["1.5", "2.25"], "num_epochs"),  # whole epochs with device_data (this config's)
]


def _argv(*overrides: str) -> list[str]:
    return ["main", CONFIG, "--workdir=/tmp/lateral_jax_property_test", *overrides]


def invalid_cases(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` cases ``(field, value, name the message must contain)``: every table entry once, then
    random draws of one invalid field on top of random valid values of others."""
    cases = [(f, v, f.rsplit(".", 1)[-1]) for f, (bad, _) in FIELDS.items() for v in bad]
    cases += [(f, v, name) for f, values, name in CROSS_FIELD for v in values]
    rng = np.random.default_rng(seed)
    fields = list(FIELDS)
    while len(cases) < n:
        field = fields[int(rng.integers(len(fields)))]
        bad = FIELDS[field][0]
        cases.append((field, bad[int(rng.integers(len(bad)))], field.rsplit(".", 1)[-1]))
    return cases


def _valid_overrides(rng: np.random.Generator, k: int, exclude: str = "") -> list[str]:
    safe = [f for f in FIELDS if f not in (exclude, "data.crop", "model.lateral.num_groups")]
    picked = rng.choice(len(safe), size=k, replace=False)
    return [f"--config.{safe[i]}={FIELDS[safe[i]][1](rng)}" for i in picked]


CASES = invalid_cases(220)


def test_two_hundred_invalid_fields_are_refused_naming_the_field():
    rng = np.random.default_rng(1)
    accepted, unnamed = [], []
    for number, (field, value, name) in enumerate(CASES):
        others = _valid_overrides(rng, 2, exclude=field) if number >= len(CASES) // 2 else []
        others = [o for o in others if not o.startswith(("--config.model.lateral.", "--config.model.widths"))]
        try:
            main_module.parse(_argv(*others, f"--config.{field}={value}"))
        except main_module.UsageError as e:
            message = str(e)
            if name not in message or "\n" in message:
                unnamed.append((number, field, value, message))
            continue
        accepted.append((number, field, value))
    assert len(CASES) >= 200
    assert accepted == []
    assert unnamed == []


def test_fifty_valid_command_lines_pass():
    rng = np.random.default_rng(2)
    for number in range(50):
        overrides = _valid_overrides(rng, int(rng.integers(1, 5)))
        plan = main_module.parse(_argv(*overrides))
        assert plan.run_configs, (number, overrides)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_named_with_what_they_must_be(value):
    with pytest.raises(main_module.UsageError) as info:
        main_module.parse(_argv(f"--config.optimizer.learning_rate={value}"))
    assert "learning_rate" in str(info.value) and math.isnan(float("nan"))


# --------------------------------------------------------------------------------------------
# The library API: bad shapes, layouts, dtypes and configs raise ValueError/TypeError naming the argument
# --------------------------------------------------------------------------------------------

LATERAL_FIELDS = {
    "kernel_size": [0, 2, -1, 1.5, "3"],
    "lateral_size": [0, 4, -3],
    "inhibitory_size": [0, 2],
    "mixing": ["diagonal", "FULL"],
    "leak": [0.0, 1.5, float("nan")],
    "drive_norm": ["batch", ""],
    "loop_norm": ["instance"],
    "num_groups": [0, -1, 2.0],
    "activation": ["sigmoid", "ReLU"],
    "lateral_init_scale": [-0.1, float("nan"), float("inf")],
    "conv_algorithm": ["fft"],
    "loop_kernel": ["triton"],
}
LOOP_FIELDS = {
    "grad_mode": ["bptt", "none"],
    "truncate_steps": [3],
    "implicit_tol": [0.0, -1.0, float("nan")],
    "implicit_max_steps": [0, -1, 2.5],
    "scan_unroll": ["always", 0, -2],
    "remat_batch_chunks": [0, -1, "some"],
}


def library_cases(n: int, seed: int = 0) -> list[tuple[str, object, str]]:
    cases = [("lateral", (f, v), f) for f, values in LATERAL_FIELDS.items() for v in values]
    cases += [("loop", (f, v), f) for f, values in LOOP_FIELDS.items() for v in values]
    cases += [("num_steps", v, "num_steps") for v in (-1, 1.5, "4", True)]
    cases += [("input", shape, "input") for shape in ((8, 8, 3), (2, 3, 8, 8), (2, 8, 8, 5), (2, 8, 3))]
    rng = np.random.default_rng(seed)
    while len(cases) < n:
        cases.append(cases[int(rng.integers(len(cases)))])
    return cases


def test_library_api_refuses_bad_arguments_naming_them():
    import jax
    import jax.numpy as jnp

    from lateral_jax.core import recurrence
    from lateral_jax.core.config import LateralConfig, LoopOptions

    config = LateralConfig.paper()
    params = recurrence.init_params(jax.random.key(0), in_channels=3, out_channels=4, config=config)
    x = jnp.zeros((2, 8, 8, 3))
    unnamed = []
    cases = library_cases(80)
    for kind, value, name in cases:
        try:
            if kind == "lateral":
                LateralConfig(**{value[0]: value[1]})
            elif kind == "loop":
                LoopOptions(**{value[0]: value[1]})
            elif kind == "num_steps":
                recurrence.unroll(params, x, num_steps=value, config=config)
            else:
                recurrence.unroll(params, jnp.zeros(value), num_steps=2, config=config)
        except (ValueError, TypeError) as e:
            if name not in str(e):
                unnamed.append((kind, value, str(e)[:120]))
            continue
        unnamed.append((kind, value, "accepted"))
    assert len(cases) >= 80
    assert unnamed == []
