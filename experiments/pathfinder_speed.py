"""Generation speed of Pathfinder by the published procedure: ms per image for each contour
length and image size, in one process (``lateral_jax.training.data.pathfinder.example``).

    python -m experiments.pathfinder_speed --out results/pathfinder_published/generation_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from lateral_jax.training.data import pathfinder


def measure(lengths: tuple[int, ...], sizes: tuple[int, ...], num_images: int) -> list[dict]:
    rows = []
    for size in sizes:
        for length in lengths:
            config = pathfinder.PathfinderConfig.published(length, size)
            start = time.perf_counter()
            examples = [pathfinder.example(config, 0, i) for i in range(num_images)]
            ms = 1e3 * (time.perf_counter() - start) / num_images
            rows.append(
                {
                    "image_size": size,
                    "contour_length": length,
                    "ms_per_image": round(ms, 2),
                    "mean_distractors": float(np.mean([e["num_distractors"] for e in examples])),
                    "max_distractors": config.num_distractors,
                    "positive_fraction": float(np.mean([e["label"] for e in examples])),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="6,9,14")
    parser.add_argument("--sizes", default="32,64,150")
    parser.add_argument("--num_images", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lengths = tuple(int(v) for v in args.lengths.split(","))
    sizes = tuple(int(v) for v in args.sizes.split(","))
    rows = measure(lengths, sizes, args.num_images)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
