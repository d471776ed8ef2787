"""Telling a diverged run from a slow one, from the cross-entropy it logs.

A classifier that guesses uniformly over ``K`` classes has cross-entropy ``log K`` (the chance
level).  A run *diverges* when

* ``patience`` consecutive loss records (training logs and evaluations) lie above
  ``chance_factor · log K`` — it predicts confidently and wrongly, worse than guessing; or
* one record lies above the chance level *and* ``growth`` times the lowest loss seen so far — the
  loss grew by orders of magnitude.

A model stuck *at* chance (loss ≈ log K, as LC-CNNs sometimes are for a few epochs on the contour
task) is slow, not diverged, and is never flagged.  Non-finite losses are caught separately
(:class:`lateral_jax.training.train.NonFiniteLossError`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

DivergenceAction = Literal["stop", "warn", "off"]
DIVERGENCE_ACTIONS = ("stop", "warn", "off")


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    """When a run counts as diverged and what happens then.

    Attributes:
      action: ``"stop"`` raises :class:`DivergenceError` (checkpoints up to the last save are
        kept), ``"warn"`` warns once and trains on, ``"off"`` does not check.
      patience: consecutive loss records above ``chance_factor · log K`` that count as diverged.
      chance_factor: how far above the chance level ``log K`` a loss must be to count.
      growth: a single record above chance and ``growth ×`` the lowest loss so far counts too.
    """

    action: DivergenceAction = "stop"
    patience: int = 3
    chance_factor: float = 2.0
    growth: float = 100.0

    def __post_init__(self):
        if self.action not in DIVERGENCE_ACTIONS:
            raise ValueError(f"divergence.action={self.action!r} must be one of {DIVERGENCE_ACTIONS}.")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"divergence.patience={self.patience!r} must be a positive int (loss records).")
        if not self.chance_factor > 1.0:
            raise ValueError(f"divergence.chance_factor={self.chance_factor!r} must be > 1 (× the chance loss).")
        if not self.growth > 1.0:
            raise ValueError(f"divergence.growth={self.growth!r} must be > 1 (× the lowest loss so far).")


class DivergenceError(ArithmeticError):
    """Raised when a run's loss diverged; ``step`` is the step of the record that decided it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class DivergenceMonitor:
    """Feeds on ``(step, cross-entropy)`` records; acts per :class:`DivergenceConfig`."""

    def __init__(self, config: DivergenceConfig, num_classes: int, *, advice: str = ""):
        self.config = config
        self.advice = advice or (
            "Lower the learning rate, enable grad_clip_norm, or use a loop norm (LateralConfig.stable())."
        )
        self.chance = math.log(num_classes)
        self.lowest = math.inf
        self.bad_since: int | None = None
        self.bad_count = 0
        self.warned = False

    def _verdict(self, step: int, loss: float) -> str | None:
        c = self.config
        if loss > self.chance and loss >= c.growth * self.lowest:
            return f"the loss grew from {self.lowest:.4g} to {loss:.4g} (≥ {c.growth:g}×) at step {step}"
        self.lowest = min(self.lowest, loss)
        if loss > c.chance_factor * self.chance:
            self.bad_count += 1
            self.bad_since = step if self.bad_count == 1 else self.bad_since
        else:
            self.bad_count, self.bad_since = 0, None
        if self.bad_count >= c.patience:
            return (
                f"the loss stayed above {c.chance_factor:g} × the chance level log({round(math.exp(self.chance))}) = "
                f"{self.chance:.3f} for {self.bad_count} records, from step {self.bad_since} to step {step} "
                f"(now {loss:.4g})"
            )
        return None

    def observe(self, step: int, loss: float) -> None:
        """Records one loss; raises :class:`DivergenceError` (or warns) when the run diverged."""
        if self.config.action == "off" or not math.isfinite(loss):
            return
        verdict = self._verdict(step, loss)
        if verdict is None:
            return
        message = (
            f"training diverged: {verdict}. {self.advice} Set divergence.action='warn' or 'off' to train on regardless."
        )
        if self.config.action == "stop":
            raise DivergenceError(message, step=step)
        if not self.warned:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self.warned = True
