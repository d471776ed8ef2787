"""The optimiser of a run: :class:`OptimizerConfig` and :func:`make_optimizer`, the optax chain

    clip by global norm → SGD / momentum / Adam / AdamW / LARS with a warm-up + cosine or
    constant schedule → the Dale projection (``ei_mode="project"``) → weight EMA,

all under ``optax.apply_if_finite`` (a non-finite update is skipped) and, with
``accumulate_steps > 1``, ``optax.MultiSteps``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lateral_jax.core import ei


class WeightEMAState(NamedTuple):
    """The exponential moving average of the parameters after each applied update."""

    ema: Any


def weight_ema(decay: float) -> optax.GradientTransformation:
    """Keeps ``ema ← decay · ema + (1 - decay) · (params + updates)`` in its state; the updates
    pass unchanged.  Last in an optax chain, it averages the weights the optimiser produces; inside
    ``optax.apply_if_finite`` a skipped update leaves it unchanged, inside ``optax.MultiSteps`` it
    moves once per applied (accumulated) update.  :func:`ema_params` reads it back."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay={decay!r} must lie in [0, 1).")

    def init(params):
        return WeightEMAState(jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight_ema needs the parameters: call tx.update(grads, state, params).")
        new = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
        return updates, WeightEMAState(ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
    """The weight EMA held in an optimiser state from :func:`make_optimizer` (``None`` without one)."""
    found = [
        leaf.ema
        for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, WeightEMAState))
        if isinstance(leaf, WeightEMAState)
    ]
    return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser and schedule.

    Attributes:
      name: sgd | momentum | adam | adamw | lars (layer-wise adaptive rate scaling with momentum,
        for large batches; weight decay and trust ratio skip biases and norm scales).
      schedule: constant | cosine (with ``warmup_steps`` of linear warm-up from 0), in optimiser updates.
      accumulate_steps: gradients of this many consecutive batches are averaged into one update
        (``optax.MultiSteps``); schedule steps count updates, not batches.
      ema_decay: keep an exponential moving average of the weights (:func:`weight_ema`); ``None``: off.
    """

    name: str = "momentum"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    grad_clip_norm: float | None = 1.0
    accumulate_steps: int = 1
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "momentum", "adam", "adamw", "lars"):
            raise ValueError(
                f"optimizer name={self.name!r} is not supported; choose sgd, momentum, adam, adamw or lars."
            )
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps={self.accumulate_steps!r} must be >= 1 (1: no accumulation).")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must lie in [0, 1) (or None: no weight EMA).")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} is not supported; choose 'constant' or 'cosine'.")
        if not 0 < self.learning_rate < float("inf"):  # NaN fails too
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0.")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0.")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps!r} must be >= 1.")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm={self.grad_clip_norm!r} must be > 0 or None (no clipping).")


# Consecutive non-finite updates optax.apply_if_finite skips before it lets one through; the host
# loop stops a run at its first check after a non-finite step, long before this.
MAX_NONFINITE_UPDATES = 1_000_000


def make_optimizer(
    config: OptimizerConfig, *, ei_mode: str = "none", excitatory_fraction: float | None = None
) -> optax.GradientTransformation:
    """Clip → optimiser with schedule (→ the Dale projection when ``ei_mode == "project"``) (→ the
    weight EMA), the whole chain under ``optax.apply_if_finite`` (a non-finite update is skipped),
    inside ``optax.MultiSteps`` when gradients are accumulated over ``accumulate_steps`` batches."""
    if config.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0 if config.warmup_steps else config.learning_rate,
            config.learning_rate,
            max(config.warmup_steps, 0),
            max(config.total_steps, config.warmup_steps + 1),
        )
    else:
        lr = config.learning_rate
    base = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(lr, config.momentum)),
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=config.weight_decay),
        "lars": lambda: optax.lars(
            lr,
            weight_decay=config.weight_decay,
            weight_decay_mask=_matrix_mask,
            trust_ratio_mask=_matrix_mask,
            momentum=config.momentum,
        ),
    }[config.name]()
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    parts.append(base)
    if ei_mode == "project":
        parts.append(ei.project_dale(excitatory_fraction=excitatory_fraction))
    if config.ema_decay is not None:
        parts.append(weight_ema(config.ema_decay))
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=MAX_NONFINITE_UPDATES)
    return tx if config.accumulate_steps == 1 else optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)


def _matrix_mask(params: Any) -> Any:
    """True for kernels (ndim ≥ 2), False for biases and norm scales (LARS leaves those alone)."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
