"""Runs the PyTorch peer's train step on request, for ``bench --paired`` (alternating step by step).

A shared machine's speed drifts by ±10 % from one minute to the next, more than the difference
being measured when two implementations run one after the other (``bench --rounds``).  This
script keeps the peer's model and optimiser alive in a child process and runs its train step
whenever the benchmark asks, so ours and the peer's steps alternate a few seconds apart::

    python experiments/peer_stepper.py <torch_peer.py> --batch 128 --steps 4
    stdin:  "3\\n"   → runs 3 steps, answers {"seconds": [1.57, 1.52, 1.52], "loss": 2.30}
    stdin:  "quit\\n" (or end of input) → exits

The model, optimiser, data and loss are built by the peer's own code (``LCCNN``, its E/I
penalty) with ``torch_peer.main``'s settings: seed 0, SGD lr 0.01 momentum 0.9, ``--ei`` 1e-3,
fp32 eager, or with ``--compile`` the step under ``torch.compile`` (no ``--bf16`` here: the CPU
comparison is float32).  Only :func:`serve` and
:func:`paired_summary` are imported by the benchmark; neither needs torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from typing import IO

import numpy as np


def serve(step: Callable[[], float], commands: IO[str], replies: IO[str]) -> int:
    """Answers each line ``k`` of ``commands`` by running ``step`` k times; returns the steps run.

    Each reply is one JSON line ``{"seconds": [wall time of each of the k steps], "loss": the last loss}``.
    A line ``quit`` or the end of ``commands`` stops the loop; anything else is an error reply.
    """
    total = 0
    for line in commands:
        line = line.strip()
        if line == "quit":
            break
        if not line.isdigit() or int(line) < 1:
            replies.write(json.dumps({"error": f"expected a positive step count or 'quit', got {line!r}"}) + "\n")
            replies.flush()
            continue
        seconds = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            loss = step()
            seconds.append(time.perf_counter() - t0)
        replies.write(json.dumps({"seconds": seconds, "loss": loss}) + "\n")
        replies.flush()
        total += len(seconds)
    return total


def sign_test_p(wins: int, n: int) -> float:
    """Two-sided exact binomial sign test: P(a count at least as far from n/2 as ``wins``) at p = ½."""
    if n == 0:
        return 1.0
    far = max(wins, n - wins)
    tail = sum(math.comb(n, k) for k in range(far, n + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_summary(ours_s: list[float], peer_s: list[float], batch: int) -> dict:
    """Ratios of paired step times (peer / ours = our speed-up), with a sign test over the pairs.

    ``ours_s[i]`` and ``peer_s[i]`` are the seconds per step of pair i, measured seconds apart, so
    a slow minute of the machine slows both; the median of the per-pair ratios is the estimate,
    its quartiles the spread, and the sign test asks whether ours was faster in more pairs than
    chance allows.
    """
    if len(ours_s) != len(peer_s) or not ours_s:
        raise ValueError(f"need equally many paired timings, got {len(ours_s)} and {len(peer_s)}")
    ratios = np.asarray(peer_s) / np.asarray(ours_s)
    wins = int(np.sum(ratios > 1.0))
    return {
        "pairs": len(ratios),
        "median_ratio": round(float(np.median(ratios)), 3),
        "q25": round(float(np.quantile(ratios, 0.25)), 3),
        "q75": round(float(np.quantile(ratios, 0.75)), 3),
        "ours_faster_in": wins,
        "sign_test_p": float(f"{sign_test_p(wins, len(ratios)):.3g}"),
        "ours_images_per_s": round(batch / float(np.median(ours_s)), 1),
        "peer_images_per_s": round(batch / float(np.median(peer_s)), 1),
    }


def _load_peer(path: str):
    spec = importlib.util.spec_from_file_location("torch_peer", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the peer from {path!r}; pass the path of torch_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_peer"] = module  # torch.compile (dynamo) looks modules up by name
    spec.loader.exec_module(module)
    return module


def torch_step(
    peer_path: str, batch: int, num_steps: int, ei: float = 1e-3, warmup: int = 3, compile: bool = False
) -> Callable[[], float]:
    """The peer's fp32 CPU train step, set up as ``torch_peer.main`` does, warmed up; ``compile``:
    wrapped in ``torch.compile`` as the peer's ``--compile`` does (compiled during the warm-up)."""
    import torch
    import torch.nn.functional as F

    peer = _load_peer(peer_path)
    torch.manual_seed(0)
    model = peer.LCCNN(num_steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + ei * model.ei_penalty()
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compile else step

    def timed() -> float:
        return float(run())

    for _ in range(warmup):
        timed()
    return timed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peer", help="path of ../shared/bench/torch_peer.py")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="torch.compile the step (inductor), as the peer's --compile")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    step = torch_step(args.peer, args.batch, args.steps, compile=args.compile)
    import torch

    ready = {"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": args.compile}
    ready["setup_s"] = round(time.perf_counter() - t0, 1)
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    serve(step, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
