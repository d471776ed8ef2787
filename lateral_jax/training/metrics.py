"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard event files when available.

Each record is one JSON line ``{"step": s, "kind": "train" | "eval", <name>: <float>, ...}``, and
records are keyed by ``(step, kind)``: a run resumed from step ``s`` first drops the records of
later steps (they are recomputed), and a record written again for the same key replaces the old
one, so the file never holds two records of one step.  With the ``tensorboard`` extra installed
(``tensorboardX``), the same scalars are also written as TensorBoard events under
``<workdir>/tensorboard`` with tags ``<kind>/<name>``; a resumed run purges the events after ``s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lateral_jax.training.rundir import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (an incomplete last line, from a kill mid-write, is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class MetricWriter:
    """Writes metric records keyed by ``(step, kind)`` to ``<workdir>/metrics.jsonl`` (and TensorBoard).

    ``resume_step``: the step the run restarts from; records of later steps are dropped.
    """

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb: Any = None
        self._keys: set[tuple[int, str]] = set()
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self._rewrite(kept)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        self._keys = {(r.get("step"), r.get("kind")) for r in records}

    @property
    def tensorboard_dir(self) -> Path | None:
        """The TensorBoard event folder, or ``None`` when TensorBoard output is off or unavailable."""
        return None if self._tb is None else Path(self._tb.logdir)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **values}
        if (step, kind) in self._keys:
            others = [r for r in read_metrics(self.path) if (r.get("step"), r.get("kind")) != (step, kind)]
            self._rewrite([*others, record])
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self._keys.add((step, kind))
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{kind}/{name}", float(value), global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
