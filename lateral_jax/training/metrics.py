"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard event files when available.

Each record is one JSON line ``{"step": s, "kind": "train" | "eval", <name>: <float>, ...}``.  With
the ``tensorboard`` extra installed (``tensorboardX``), the same scalars are also written as
TensorBoard events under ``<workdir>/tensorboard`` with tags ``<kind>/<name>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricWriter:
    """Appends metric records to ``<workdir>/metrics.jsonl`` (and TensorBoard, see the module)."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb: Any = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    @property
    def tensorboard_dir(self) -> Path | None:
        """The TensorBoard event folder, or ``None`` when TensorBoard output is off or unavailable."""
        return None if self._tb is None else Path(self._tb.logdir)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{kind}/{name}", float(value), global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
