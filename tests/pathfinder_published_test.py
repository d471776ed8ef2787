"""Pathfinder by the published procedure: the geometry of every path, connectivity by a flood fill
on the rendered image, determinism per index across processes, and the image-folder export."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from lateral_jax.training.data import pathfinder as pf


def _segments(path):
    return path[:, 0], path[:, 1]


@pytest.mark.parametrize("length, size", [(6, 32), (9, 32), (14, 32), (14, 64), (9, 150)])
def test_paths_have_the_published_geometry(length, size):
    config = pf.PathfinderConfig.published(length, size)
    max_turn = math.pi / 2 / config.continuity + 1e-9
    for index in range(4):
        e = pf.example(config, 0, index)
        paths = e["paths"]
        assert [len(p) for p in paths[:2]] == [length, length]
        assert all(len(p) == config.distractor_length for p in paths[2:])
        assert e["num_distractors"] == len(paths) - 2 <= config.num_distractors
        for path in paths:
            starts, ends = _segments(path)
            np.testing.assert_allclose(np.linalg.norm(ends - starts, axis=1), config.paddle_length, rtol=1e-9)
            np.testing.assert_allclose(np.linalg.norm(starts[1:] - ends[:-1], axis=1), config.paddle_margin, rtol=1e-9)
            headings = np.arctan2(*(ends - starts)[:, ::-1].T)
            turns = np.abs(np.angle(np.exp(1j * np.diff(headings))))
            assert np.all(turns <= max_turn)
            assert np.all((starts >= config.border) & (ends <= size - config.border))
        for i in range(len(paths)):  # different paths keep their clearance
            for j in range(i + 1, len(paths)):
                d = pf.segment_distance(*_segments(paths[i]), *_segments(paths[j]))
                assert d.min() >= config.clearance - 1e-9
        assert np.linalg.norm(paths[0][0, 0] - paths[1][0, 0]) == pytest.approx(config.seed_distance)


def _components(example, config, scale):
    """Flood fill of the rendered image: pixels above half intensity, bridged over gaps up to half-way
    between the gap inside a path (``paddle_margin``) and the least gap between paths."""
    binary = example["image"][..., 0] > 0.5
    bridge = scale * (config.paddle_margin + config.clearance - config.paddle_thickness) / 2
    radius = int(math.floor(bridge / 2))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = xx**2 + yy**2 <= radius**2
    labels, _ = ndimage.label(ndimage.binary_dilation(binary, disk))
    centres = np.floor(example["markers"] * scale).astype(int)
    return [labels[y, x] for x, y in centres]


@pytest.mark.parametrize("length, size, scale", [(6, 32, 8), (14, 32, 8), (9, 150, 4)])
def test_markers_are_connected_exactly_in_positive_images(length, size, scale):
    """At 32 px a 1-px gap and a 3-px clearance are too close in pixels for a flood fill to tell apart,
    so the same geometry is rendered at ``scale`` × the size."""
    config = pf.PathfinderConfig.published(length, size)
    labels = []
    for index in range(12):
        e = pf.example(config, 1, index, render_scale=scale)
        first, second = _components(e, config, scale)
        assert first != 0 and second != 0
        assert (first == second) == (e["label"] == 1), index
        labels.append(e["label"])
    assert 0 < sum(labels) < len(labels)


def test_the_label_only_moves_the_markers():
    """Every draw precedes the label: with the label forced both ways the paths are the same."""
    config = pf.PathfinderConfig.published(9, 32)
    e = pf.example(config, 3, 5)
    pos_tips = {tuple(p[0, 0]) for p in e["paths"][:2]} | {tuple(p[-1, 1]) for p in e["paths"][:2]}
    assert {tuple(m) for m in e["markers"]} <= pos_tips
    same = [any(np.allclose(m, p[0, 0]) or np.allclose(m, p[-1, 1]) for m in e["markers"]) for p in e["paths"][:2]]
    assert (sum(same) == 1) == (e["label"] == 1)  # positive: both markers on one path


def test_source_generate_and_parallel_generate_agree():
    config = pf.PathfinderConfig.published(6, 32)
    source = pf.PathfinderSource(config, 6, seed=4)
    arrays = pf.generate(config, 6, seed=4, workers=1, chunk=4)
    for i in range(6):
        np.testing.assert_array_equal(source[i]["image"], arrays["image"][i])
        assert int(source[i]["label"]) == int(arrays["label"][i])
    assert arrays["image"].min() >= -1.0 and arrays["image"].max() <= 1.0
    with pytest.raises(IndexError, match="outside"):
        source[6]


def test_two_processes_draw_the_same_example_for_the_same_index():
    code = (
        "import hashlib, sys; from lateral_jax.training.data import pathfinder as pf; "
        "e = pf.example(pf.PathfinderConfig.published(14, 32), 7, int(sys.argv[1])); "
        "print(hashlib.sha256(e['image'].tobytes()).hexdigest(), e['label'])"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code, "11"], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    here = pf.example(pf.PathfinderConfig.published(14, 32), 7, 11)
    import hashlib

    assert outputs[0] == outputs[1] == f"{hashlib.sha256(here['image'].tobytes()).hexdigest()} {here['label']}\n"


def test_export_writes_the_image_folder_layout(tmp_path):
    from lateral_jax.training.data import sources

    arrays = pf.generate(pf.PathfinderConfig.published(6, 32), 8, seed=0, workers=1)
    assert pf.export_image_folder(arrays, tmp_path) == 8
    names = sources.list_image_names(tmp_path)
    assert len(names) == 8 and all(n.startswith("train/") for n in names)
    assert {sources.split_and_class(n)[1] for n in names} == {str(v) for v in np.unique(arrays["label"])}
    json.dumps(names)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"contour_length": 0}, "contour_length=0 must be an int >= 1"),
        ({"clearance": 1.0}, "clearance=1.0 must be >= paddle_margin \\+ paddle_thickness"),
        ({"seed_distance": 3.0}, "seed_distance=3.0 must be >= 2 \\* marker_radius \\+ clearance"),
        ({"paddle_length": 0.0}, "paddle_length=0.0 must be > 0"),
    ],
)
def test_bad_geometry_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pf.PathfinderConfig(**kwargs)
