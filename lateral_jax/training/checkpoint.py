"""Orbax checkpoints of a training run: the ``TrainState`` plus the data iterator's state.

Each save writes ``<workdir>/checkpoints/<step>/{state,data}`` through an orbax
``CheckpointManager`` (atomic: written to a temporary folder, renamed when complete; asynchronous,
so call :meth:`Checkpointer.wait` or :meth:`Checkpointer.close` before exiting).  Restoring tries
the newest step first and falls back to older ones, with a warning, when a checkpoint is
unreadable (corrupted or partially deleted).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Periodic, keep-last-N, asynchronous checkpoints of ``(state, data_state)`` under ``directory``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        self.manager.save(step, args=args, force=force)

    def restore(self, target: Any) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` from the newest readable checkpoint, or ``None`` if there is none.

        ``target`` is a state with the right structure, dtypes and shardings (e.g. a freshly
        initialised one); the restored arrays take its shardings.
        """
        self.manager.wait_until_finished()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); falling back to an older one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            state = jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(target), jax.tree_util.tree_leaves(restored.state)
            )
            return step, state, dict(restored.data or {})
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
