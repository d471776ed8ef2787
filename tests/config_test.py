"""The typed run config: one conversion from dicts (ml_collections configs and config.json), the
loop options passed whole from the config to every layer, the metric writer, and a core install
that trains."""

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import base, cifar10, contour
from lateral_jax.core import models, recurrence
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.training import config, run
from lateral_jax.training.metrics import MetricWriter

ROOT = Path(__file__).resolve().parents[1]


def test_from_dict_inverts_to_dict_through_json():
    cfg = config.RunConfig(
        data=config.DataConfig(dataset="pathfinder", task=(("num_curves", 3),), train_subset=64, seed=5),
        model=config.ModelConfig(
            widths=(8, 16), lateral=LateralConfig.paper(inhibitory_size=5), loop=LoopOptions("truncated", 2)
        ),
        device_data=True,
    )
    assert config.from_dict(json.loads(json.dumps(config.to_dict(cfg)))) == cfg


def test_unknown_fields_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"config.model has unknown field\(s\) \['grad_mode'\]; ModelConfig has"):
        config.from_dict({"model": {"grad_mode": "remat"}})
    with pytest.raises(ValueError, match=r"config.model.loop has unknown field\(s\) \['tol'\]"):
        config.from_dict({"model": {"loop": {"tol": 1e-3}}})


def test_ml_collections_config_and_variant_become_the_run_config():
    """The main job's config: the variant's fields override the config's model fields, and a
    command-line style override of a nested loop option reaches ModelConfig.loop."""
    c = contour.get_config()
    c.model.loop.grad_mode = "truncated"
    c.model.loop.truncate_steps = 2
    run_config = base.to_run_config(c, "lceicnn_T2")
    assert run_config.model == config.ModelConfig(
        kind="lceicnn",
        widths=(8, 16, 16),
        num_steps=2,
        lateral=LateralConfig.stable(num_groups=8),
        loop=LoopOptions(grad_mode="truncated", truncate_steps=2),
        ei_mode="mixed_sign",
        ei_weight=1e-3,
    )
    assert run_config.data.task == () and run_config.data.archive is None
    assert run_config.optimizer.warmup_steps == 100 and run_config.batch_size == 32
    assert run_config.device_data and run_config.data.seed == 0 and tuple(c.seeds) == (0, 1, 2)


def test_variants_apply_before_the_command_line_and_the_config_file_is_loaded_once(tmp_path):
    """One config path: file < variant < command line, by ml_collections' own override parsing."""
    from experiments import main as main_module

    loads = tmp_path / "loads"
    config_file = tmp_path / "counting.py"
    config_file.write_text(
        "from pathlib import Path\n"
        "from experiments.configs import contour\n"
        "def get_config(variant=''):\n"
        f"    with open({str(loads)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    return contour.get_config(variant)\n"
    )
    plan = main_module.parse(
        [
            "main",
            f"--config={config_file}:smoke",
            "--only=lccnn_T4,lceicnn,lccnn_k7",
            "--config.model.num_steps=6",
            "--config.model.ei_weight=0.5",
        ]
    )
    assert loads.read_text() == "x"
    lccnn, lceicnn, k7 = (plan.run_configs[v].model for v in ("lccnn_T4", "lceicnn", "lccnn_k7"))
    assert lccnn.num_steps == 6 and lccnn.kind == "lccnn"  # the command line beats the variant's T = 4
    assert lceicnn.ei_weight == 0.5 and lceicnn.ei_mode == "mixed_sign"  # the variant's, where the line is silent
    assert k7.lateral.lateral_size == 7 and k7.lateral.num_groups == 4  # a nested variant field merges
    file_config = contour.get_config("smoke")
    file_config.model.ei_weight = 0.5
    expected = base.to_run_config(file_config, "lccnn_T4")
    assert plan.run_configs["lccnn_T4"] == dataclasses.replace(
        expected, model=dataclasses.replace(expected.model, num_steps=6)
    )


def test_run_config_from_config_dict_types_and_validates_at_the_boundary():
    c = contour.get_config("smoke")
    del c["models"], c["seeds"]  # the comparison's fields, not the run's
    run_config = config.RunConfig.from_config_dict(c)
    assert run_config == config.from_dict(c.to_dict()) and run_config.model.widths == (8, 8)
    with pytest.raises(ValueError, match=r"num_steps=-1 must be a whole number >= 0"):
        config.RunConfig.from_config_dict({"model": {"num_steps": -1}})
    with pytest.raises(ValueError, match=r"num_epochs=nan must be a finite number > 0"):
        config.RunConfig.from_config_dict({"num_epochs": float("nan")})
    with pytest.raises(ValueError, match=r"contractor_weight=1.0 \(C-RBP\) acts at a fixed point"):
        config.RunConfig.from_config_dict({"model": {"contractor_weight": 1.0}})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grad_mode": "truncated"}, "truncate_steps=K, a positive int"),
        ({"truncate_steps": 2}, "truncate_steps=2 is only used with grad_mode='truncated'"),
        ({"implicit_max_steps": 0}, "implicit_max_steps=0 must be >= 1"),
        ({"scan_unroll": "always"}, "scan_unroll='always' must be 'auto', True, False or a positive int"),
        ({"remat_batch_chunks": 0}, "remat_batch_chunks=0 must be 'auto' or a positive int"),
    ],
)
def test_loop_options_validate_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoopOptions(**kwargs)


def test_every_model_takes_the_whole_loop_options_value():
    """One LoopOptions value configures every lateral layer; the implicit solver's settings reach the ResNet's."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    loop = LoopOptions(grad_mode="implicit", implicit_tol=1e-6, implicit_max_steps=3)
    resnet = models.LateralResNet(
        stage_sizes=(1,),
        widths=(8,),
        num_steps=2,
        lateral=LateralConfig.stable(num_groups=2),
        lateral_stages=(0,),
        loop=loop,
    )
    params = resnet.init(jax.random.key(1), x)
    residual = resnet.apply(params, x).residuals["stage0_block0_lateral"]
    loose = resnet.clone(loop=dataclasses.replace(loop, implicit_max_steps=60))
    assert float(loose.apply(params, x).residuals["stage0_block0_lateral"]) < float(residual)
    for cls in (models.LateralCNN, models.LateralResNet):
        assert "loop" in {f.name for f in dataclasses.fields(cls)}
        assert not {"grad_mode", "truncate_steps", "implicit_tol", "scan_unroll"} & {
            f.name for f in dataclasses.fields(cls)
        }
    with pytest.raises(TypeError, match=r"unknown loop option\(s\) \['tolerance'\]"):
        recurrence.unroll(
            recurrence.init_params(jax.random.key(0), in_channels=3, out_channels=4), x, num_steps=1, tolerance=1e-3
        )


def _tfrecords(path: Path):
    data = path.read_bytes()
    i = 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        yield data[i + 12 : i + 12 + length]
        i += 12 + length + 4


def test_metric_writer_writes_json_lines_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard extra is not installed")
    from tensorboardX.proto import event_pb2

    writer = MetricWriter(tmp_path)
    writer.write(3, "train", {"loss": 0.5, "accuracy": 0.25})
    writer.write(4, "eval", {"accuracy": 0.75})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 3, "kind": "train", "loss": 0.5, "accuracy": 0.25},
        {"step": 4, "kind": "eval", "accuracy": 0.75},
    ]
    scalars = {}
    for events in (tmp_path / "tensorboard").glob("events.out.tfevents.*"):
        for record in _tfrecords(events):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(event.step, value.tag)] = value.simple_value
    assert scalars == {(3, "train/loss"): 0.5, (3, "train/accuracy"): 0.25, (4, "eval/accuracy"): 0.75}


CORE_ONLY = """
import sys
for name in ("tensorflow_datasets", "PIL", "matplotlib", "scipy", "tensorboardX", "torch"):
    sys.modules[name] = None  # importing any of them now raises ImportError
from lateral_jax.core.config import LateralConfig
from lateral_jax.training import config, run
cfg = config.RunConfig(
    data=config.DataConfig(dataset="contour", num_train=64, num_validation=32),
    model=config.ModelConfig(widths=(4,), num_steps=1, lateral=LateralConfig.stable(num_groups=2)),
    batch_size=16, num_epochs=1.0, progress=False,
)
print(run.train_and_evaluate(cfg, sys.argv[1])["steps"])
from experiments import main
sys.argv = ["main", "--config", "experiments/configs/contour.py:smoke", "--workdir", sys.argv[1] + "/main"]
try:
    main.cli()
except SystemExit as e:
    print("EXIT", e)
"""


def test_a_core_install_trains(tmp_path):
    """The base install and the [train] extra (no data, analysis or tensorboard extras) are enough to train."""
    out = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps, exit_line = out.stdout.strip().splitlines()[-2:]
    assert steps == "4"
    # the main job's analysis needs the 'analysis' extra: it says so before training anything
    assert exit_line == "EXIT 2"
    assert "error: the analysis and the report need matplotlib, scipy (the 'analysis' extra)" in out.stderr
    assert not (tmp_path / "main").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert jnp.isfinite(json.loads((tmp_path / "final.json").read_text())["validation_loss"])
    assert run.load_run_config(tmp_path).model.widths == (4,)


@pytest.mark.parametrize(
    "module,variant,match",
    [
        (contour, "nope", "config variant 'nope' is unknown; use one of 'smoke', or none for the full config"),
        (cifar10, "smok", "config variant 'smok' is unknown; use one of 'full', 'smoke'"),
    ],
)
def test_an_unknown_config_variant_fails_naming_the_valid_ones(module, variant, match):
    with pytest.raises(ValueError, match=match):
        module.get_config(variant)


def test_an_archive_with_one_class_is_refused(tmp_path):
    from PIL import Image

    for i in range(4):
        (tmp_path / "imgs" / "train" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / "train" / "cat" / f"{i}.png")
    data = config.DataConfig(dataset="image_folder", archive=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=r"holds 1 class\(es\) \['cat'\]; a classifier needs at least two"):
        run.build_data(data, 0)


def test_group_count_that_does_not_divide_a_width_is_named_even_without_loops():
    model = models.FCNN(widths=(12,), lateral=LateralConfig.stable(num_groups=8))
    with pytest.raises(ValueError, match="num_groups=8 does not divide the 12 channels of the layer"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("device_data", [False, True])
def test_a_batch_larger_than_the_training_split_is_refused_by_both_feeds(tmp_path, device_data):
    """Host-fed and device-resident runs refuse it alike (a device epoch of zero steps never ends)."""
    cfg = config.RunConfig(
        data=config.DataConfig(dataset="contour", num_train=16, num_validation=16),
        model=config.ModelConfig(widths=(4,), num_steps=1, lateral=LateralConfig.stable(num_groups=2)),
        batch_size=32,
        device_data=device_data,
        progress=False,
    )
    with pytest.raises(ValueError, match="batch_size=32 exceeds the 16 training examples"):
        run.train_and_evaluate(cfg, tmp_path)


def test_stability_advice_reads_the_run_config():
    import dataclasses

    from lateral_jax.core.hgru import HGRUConfig

    run = config.RunConfig()
    stable = config.stability_advice(run)
    assert "lower optimizer.learning_rate (now 0.001)" in stable or "lower optimizer.learning_rate" in stable
    assert "loop norm" not in stable and "lateral_init_scale (now 0.1)" in stable
    paper = dataclasses.replace(run, model=dataclasses.replace(run.model, lateral=LateralConfig.paper()))
    assert "a loop norm (model.lateral.loop_norm='group'" in config.stability_advice(paper)
    relu_hgru = dataclasses.replace(run, model=dataclasses.replace(run.model, kind="hgru", hgru=HGRUConfig()))
    assert "model.hgru.activation='tanh', now 'relu'" in config.stability_advice(relu_hgru)
    implicit = dataclasses.replace(run, model=dataclasses.replace(run.model, loop=LoopOptions(grad_mode="implicit")))
    assert "contractor_weight" in config.stability_advice(implicit)


def test_the_implicit_warning_does_not_advise_a_loop_norm_to_a_layer_that_has_one():
    import warnings

    from lateral_jax.core import implicit

    implicit._nonconverged_calls = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        implicit._warn_if_not_converged(0.5, 1e-5, 10, LateralConfig.stable())
        implicit._nonconverged_calls = 0
        implicit._warn_if_not_converged(0.5, 1e-5, 10, LateralConfig.paper())
    stable_message, paper_message = (str(w.message) for w in caught)
    assert "loop norm" not in stable_message and "lateral_init_scale (now 0.1)" in stable_message
    assert "use a loop norm (LateralConfig.stable())" in paper_message
