"""Scaling out: lateral ResNets that train, the ImageNet config's smoke variant on a generated folder of
the ILSVRC layout, gradient accumulation, weight EMA, label smoothing, ImageNet crops, LARS, and
device-resident data sharded over the devices."""

import dataclasses
import functools
import io
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lateral_jax.core import models
from lateral_jax.core.config import LateralConfig
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import device_epochs, run, train
from lateral_jax.training.data import pipeline
from lateral_jax.training.optimizer import OptimizerConfig, ema_params, make_optimizer
from lateral_jax.training.sharding import replicate


def write_ilsvrc_folder(root, classes=("n01440764", "n01443537", "n01484850"), train=12, val=4):
    """JPEGs of varied sizes in ``train/<wnid>/`` and ``val/<wnid>/`` (the standard layout)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(40, 64, 2)
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                (folder / f"{wnid}_{i}.JPEG").write_bytes(buf.getvalue())


def test_imagenet_smoke_trains_a_lateral_resnet_on_the_ilsvrc_layout(tmp_path):
    """The config's own validation split (val/) is used, images are stored at 40², trained on random
    32² crops and evaluated on the central 32²; the ImageNet stem (7×7/2 + max-pool) runs."""
    from experiments.configs import base, imagenet

    write_ilsvrc_folder(tmp_path / "ilsvrc")
    cfg = imagenet.get_config("smoke")
    cfg.data.archive = str(tmp_path / "ilsvrc")
    cfg.data.data_dir = str(tmp_path / "tfds")
    run_config = dataclasses.replace(base.to_run_config(cfg, "lateral_resnet_T2"), progress=False)
    assert run_config.model.small_inputs is False and run_config.label_smoothing == 0.1
    result = run.train_and_evaluate(run_config, tmp_path / "run")
    assert result["steps"] == 36 // 16 and result["train_examples"] == 36 and result["validation_examples"] == 12
    assert result["test_examples"] == 0 and 0 <= result["validation_accuracy"] <= 1
    trained = run.load_trained(tmp_path / "run")
    assert trained.data.input_shape == (32, 32, 3)
    assert "stage1_block0_lateral" in trained.params and "stage0_block0_lateral" in trained.params
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loop/spectral_radius/stage0_block0_lateral" in e for e in evals)


def random_like(tree, seed: int, scale: float = 1.0):
    """float64 normal(0, scale²) arrays of the shapes of ``tree``'s leaves (NumPy's generator: drawing
    each shape with jax.random would compile once per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape)), tree)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_lateral_resnet_gradient_equals_central_differences(block):
    """float64: the gradient's inner product with a random direction of all parameters equals the
    central difference of the loss along it, through the lateral loops of both stages (the ImageNet
    stem is trained by the smoke test; forward mode of the lateral layers: forward_mode_test)."""
    with jax.enable_x64(True):
        model = models.LateralResNet(
            stage_sizes=(1, 1),
            widths=(4, 8),
            block=block,
            num_classes=3,
            num_steps=2,
            lateral=LateralConfig.stable(num_groups=2, conv_algorithm="xla"),
            lateral_stages=(0, 1),
            num_groups=2,
            small_inputs=True,
            dtype=jnp.float64,
        )
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)))
        # any smooth point will do for a gradient check: random parameters of init's shapes (tracing
        # init with eval_shape skips compiling each initialiser eagerly)
        params = random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], 3, 0.3)
        labels = jnp.array([0, 2])

        @jax.jit
        def loss(p):
            logits = model.apply({"params": p}, x).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        direction = random_like(params, 2)
        grad = jax.jit(jax.grad(loss))(params)
        inner = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction), strict=True)
        )
        eps = 1e-6
        shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, direction)  # noqa: E731
        fd = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
        np.testing.assert_allclose(float(inner), float(fd), rtol=1e-6)
        assert float(jnp.abs(grad["stage1_block0_lateral"]["w_lat"]).sum()) > 0


def tiny_setup(optimizer: OptimizerConfig):
    """``(jitted train_step, state, batch)`` of a one-layer LC-CNN with ``optimizer``."""
    model = models.LCCNN(widths=(4,), num_steps=2, lateral=LateralConfig.stable(num_groups=2, conv_algorithm="xla"))
    tx = make_optimizer(optimizer)
    state = train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32), "label": jnp.arange(16) % 10}
    return jax.jit(functools.partial(train.train_step, model=model, tx=tx)), tx, state, batch


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    """Two half-batches accumulated (optax.MultiSteps) give one update equal to the update of the
    whole batch: the mean of the halves' mean gradients is the batch's mean gradient (per-example
    norms only)."""
    sgd = dict(name="sgd", learning_rate=0.1, schedule="constant", grad_clip_norm=None)
    step2, _, state2, batch = tiny_setup(OptimizerConfig(**sgd, accumulate_steps=2))
    step1, _, state1, _ = tiny_setup(OptimizerConfig(**sgd))
    halves = [jax.tree_util.tree_map(lambda a, s=s: a[s : s + 8], batch) for s in (0, 8)]
    mid, _ = step2(state2, halves[0])
    chex.assert_trees_all_equal(mid.params, state2.params)  # no update after the first half
    accumulated, _ = step2(mid, halves[1])
    whole, _ = step1(state1, batch)
    chex.assert_trees_all_close(accumulated.params, whole.params, atol=1e-6, rtol=1e-5)
    assert not jnp.allclose(whole.params["lateral_0"]["w_lat"], state1.params["lateral_0"]["w_lat"])


def test_weight_ema_follows_its_recurrence_and_skips_non_finite_updates():
    step, tx, state, batch = tiny_setup(
        OptimizerConfig(name="adam", learning_rate=1e-2, schedule="constant", ema_decay=0.5, accumulate_steps=1)
    )
    expected = state.params
    for _ in range(3):
        state, _ = step(state, batch)
        expected = jax.tree_util.tree_map(lambda e, p: 0.5 * e + 0.5 * p, expected, state.params)
    chex.assert_trees_all_close(ema_params(state.opt_state), expected, atol=1e-6)
    bad = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    after, _ = step(state, bad)
    chex.assert_trees_all_equal(ema_params(after.opt_state), ema_params(state.opt_state))
    assert int(after.nonfinite_step) == 3
    with_accumulation = make_optimizer(OptimizerConfig(ema_decay=0.9, accumulate_steps=2))
    assert ema_params(with_accumulation.init(state.params)) is not None
    assert ema_params(tx.init(state.params)) is not None and ema_params(()) is None
    with pytest.raises(ValueError, match="ema_decay=1.0 must lie in"):
        OptimizerConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="accumulate_steps=0 must be >= 1"):
        OptimizerConfig(accumulate_steps=0)


def test_label_smoothing_and_lars():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    smoothed = train.cross_entropy(logits, jnp.array([0]), 0.3)
    log_p = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(float(smoothed[0]), -float(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2]), rtol=1e-6)
    step, _, state, batch = tiny_setup(OptimizerConfig(name="lars", learning_rate=0.5, schedule="constant"))
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    kernel_change = float(jnp.abs(new.params["lateral_0"]["w_ff"] - state.params["lateral_0"]["w_ff"]).max())
    assert kernel_change > 0


def test_random_resized_crop_and_centre_crop():
    crop = pipeline.RandomResizedCrop(size=24)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        top, left, h, w = crop.window(60, 80, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        areas.append(h * w / (60 * 80))
    assert 0.06 < min(areas) < 0.2 and max(areas) > 0.8
    image = np.random.default_rng(1).standard_normal((60, 80, 3)).astype(np.float32)
    out = crop({"image": image, "label": 1}, rng)
    assert out["image"].shape == (24, 24, 3)
    up = pipeline.resize(image[:6, :5], 12)  # upsampling: no antialiasing, so jax.image.resize agrees
    np.testing.assert_allclose(up, np.asarray(jax.image.resize(image[:6, :5], (12, 12, 3), "bilinear")), atol=1e-5)
    np.testing.assert_array_equal(pipeline.center_crop(image, 20), image[20:40, 30:50])
    with pytest.raises(ValueError, match="crop_size=61 exceeds the 60×80 images"):
        pipeline.center_crop(image, 61)


def test_device_resident_data_is_sharded_and_gathered_locally():
    """Each of the 8 devices holds 1/8 of the split, loaded once per block; the compiled epoch moves no
    images between devices (no all-gather or all-to-all)."""
    mesh = make_mesh()
    model = models.LCCNN(widths=(4,), num_steps=1, lateral=LateralConfig.stable(num_groups=2, conv_algorithm="xla"))
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant"))
    rng = np.random.default_rng(0)
    all_images = rng.standard_normal((83, 8, 8, 1)).astype(np.float32)
    all_labels = rng.integers(0, 10, 83).astype(np.int32)
    blocks = device_epochs.device_blocks(83, 8, seed=5)
    assert blocks.shape == (8, 10) and len(set(blocks.ravel())) == 80
    loaded = []

    def load(indices):
        loaded.append(len(indices))
        return all_images[indices], all_labels[indices]

    images, labels = device_epochs.put_blocks(blocks, load, mesh)
    assert sorted(loaded)[1:] == [10] * 8  # one load per device block (+ a 1-row shape probe)
    for shard in images.addressable_shards:
        d = shard.index[0].start // 10
        assert shard.data.shape == (10, 8, 8, 1)
        np.testing.assert_array_equal(np.asarray(shard.data), all_images[blocks[d]])
    state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 8, 8, 1))), mesh)
    epoch = device_epochs.make_device_epoch(model, tx, mesh, batch_size=16, augment=False, scan=True)
    hlo = epoch.lower(state, images, labels, jax.random.key(3)).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    state, metrics = epoch(state, images, labels, jax.random.key(3))
    assert metrics["loss"].shape == (5,)  # 10 per device // 2 per device and step
    # equality with train_step on the devices' draws: tests/train_test.py


def test_launchers_start_the_documented_command_on_every_host(tmp_path):
    """The TPU launcher runs the install and the run on --worker=all; the SLURM script starts one task
    per GPU, requeues on exit 75, is valid bash, and the main command line it embeds resolves."""
    import shlex
    import subprocess

    from experiments import launch, main

    (tmp_path / "d").mkdir()
    args = [
        "--config",
        "experiments/configs/imagenet.py:smoke",
        "--workdir",
        "/shared/runs/x",
        f"--config.data.archive={tmp_path / 'd'}",
    ]
    install, start = launch.tpu_commands("v5e-64", "us-west4-a", args, project="p", extra="tpu,data", checkout="~/lj")
    assert "--worker=all" in shlex.split(install) and "pip install -q -e '.[tpu,data]'" in shlex.split(install)[-1]
    assert start.endswith(shlex.quote("--command=cd ~/lj && " + launch.main_command(args)))
    script_path = tmp_path / "job.sbatch"
    assert (
        launch.main(["slurm", "--nodes", "4", "--gpus-per-node", "8", "--script", str(script_path), "--", *args]) == 0
    )
    script = script_path.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=TERM@300", "#SBATCH --requeue"):
        assert line in script.splitlines()
    assert 'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in script
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    main_argv = shlex.split(srun)[2:]  # drop "srun --kill-on-bad-exit=1"
    assert main_argv[:4] == [".venv/bin/python", "-m", "experiments.main", "--distributed"]
    plan = main.parse(["main", *[a for a in main_argv[3:] if a != "--distributed"]])
    assert plan.workdir.as_posix() == "/shared/runs/x"
    assert plan.run_configs["lateral_resnet_T2"].data.archive == str(tmp_path / "d")
    assert plan.run_configs["lateral_resnet_T2"].model.kind == "lateral_resnet"
    assert main.analysed_runs(plan) == []  # the probe measures the small CNNs, not the ResNets
    assert main.analysed_runs(main.parse(["main"])) == ["fcnn_seed0", "lccnn_seed0", "lceicnn_seed0"]


def test_a_tfds_prepared_imagenet_is_read_at_the_configured_size():
    """``dataset="tfds"`` (here tfds's mock imagenet2012, whose images differ in size): its own
    train/validation splits, its 1000 class names, images resized to ``image_size`` as read."""
    import tensorflow_datasets as tfds

    from lateral_jax.training.config import DataConfig
    from lateral_jax.training.datasets import build_data

    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        config = DataConfig(dataset="tfds", tfds_name="imagenet2012", download=False, image_size=20, crop_size=16)
        data = build_data(config, seed=0)
        assert (len(data.train), len(data.validation), data.num_classes) == (12, 12, 1000)
        assert data.input_shape == (16, 16, 3) and data.test is None
        assert data.train[3]["image"].shape == (20, 20, 3) and data.train[3]["image"].dtype == np.uint8
        batch = next(pipeline.eval_batches(data.validation, global_batch_size=8, crop_size=16))
    assert batch["image"].shape == (8, 16, 16, 3) and (batch["label"] >= 0).all()
