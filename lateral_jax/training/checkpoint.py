"""Orbax checkpoints of a training run: the ``TrainState`` plus the data iterator's state.

Each save writes ``<workdir>/checkpoints/<step>/{state,data}`` through an orbax
``CheckpointManager`` (atomic: written to a temporary folder, renamed when complete; asynchronous,
so call :meth:`Checkpointer.wait` or :meth:`Checkpointer.close` before exiting).  Restoring tries
the newest step first and falls back to older ones, with a warning, when a checkpoint is
unreadable (corrupted or partially deleted); a training run moves such a step to
``<workdir>/checkpoints.unreadable/<step>`` so that the steps it retrains are saved again.  A
checkpoint whose arrays have other shapes or another structure than the state to restore into
(the model changed) is not "unreadable": it raises :class:`CheckpointMismatchError` naming the
differing arrays.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint holds arrays of other shapes (or another structure) than the state to restore."""


def _path_name(path: tuple) -> str:
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def shape_differences(saved: Any, target: Any) -> list[str]:
    """``"<array>: saved <shape> vs expected <shape>"`` for every array that differs (or is absent)."""
    a, b = _shapes(saved), _shapes(target)
    out = []
    for name in sorted(set(a) | set(b), key=lambda n: (not n.startswith("params"), n)):  # parameters first
        if a.get(name) != b.get(name):
            old = "absent" if name not in a else str(a[name])
            new = "absent" if name not in b else str(b[name])
            out.append(f"{name}: saved {old} vs expected {new}")
    return out


class DiskFullError(OSError):
    """A checkpoint does not fit the free space of its file system (checked before writing)."""


def _megabytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


class Checkpointer:
    """Periodic, keep-last-N, asynchronous checkpoints of ``(state, data_state)`` under ``directory``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def check_free_space(self, step: int, state: Any) -> None:
        """Raises :class:`DiskFullError` (one line: the folder, the space needed and free) unless the
        file system holds another copy of ``state`` (its arrays' bytes, plus 10 % and 16 MB for
        metadata and the temporary folder orbax writes before renaming), so a full disk never
        leaves a half-written newest checkpoint: the previous ones stay as they are."""
        needed = 1.1 * sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(state)) + 16 * 2**20
        free = shutil.disk_usage(self.directory if self.directory.exists() else self.directory.parent).free
        if free < needed:
            kept = self.all_steps()
            raise DiskFullError(
                f"no space for the checkpoint of step {step} in {self.directory}: it needs about "
                f"{_megabytes(needed)}, the file system has {_megabytes(free)} free; free at least "
                f"{_megabytes(needed - free)} and rerun to resume "
                f"(the newest checkpoint, step {kept[-1] if kept else 'none'}, is intact)."
            )

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> None:
        self.manager.wait_until_finished()  # the previous save's space is taken before measuring
        self.check_free_space(step, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        self.manager.save(step, args=args, force=force)

    def _check_shapes(self, step: int, target: Any) -> None:
        """Raises :class:`CheckpointMismatchError` when step ``step``'s arrays do not fit ``target``."""
        try:
            saved = self.manager.item_metadata(step).state
            saved = getattr(saved, "tree", saved)
        except Exception:  # noqa: BLE001 - unreadable metadata: the checkpoint itself is damaged
            return
        if saved is None:
            return
        differences = shape_differences(saved, target)
        if differences:
            shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
            raise CheckpointMismatchError(
                f"checkpoint at step {step} in {self.directory} was saved from a different model: {shown}. "
                "Restore it with the config it was trained with (its run folder's config.json), or train the "
                "new model in another folder."
            )

    def move_aside(self, step: int) -> Path:
        """Moves step ``step`` out of the checkpoint folder to ``<directory>.unreadable/<step>[-<time>]``."""
        target = self.directory.with_name(f"{self.directory.name}.unreadable") / str(step)
        if target.exists():
            target = target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def restore(
        self, target: Any, *, move_unreadable: bool = False, step: int | None = None
    ) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` from the newest readable checkpoint, or ``None`` if there is none.

        ``target`` is a state with the right structure, dtypes and shardings (e.g. a freshly
        initialised one); the restored arrays take its shardings.  Unreadable steps are skipped
        with a warning, and moved aside with ``move_unreadable`` (a training run does, so the
        steps it retrains are saved).  Raises :class:`CheckpointMismatchError` when the newest
        checkpoint's arrays have other shapes than ``target``'s.  ``step``: that checkpoint only
        (a ``ValueError`` listing the saved steps when there is none of it; its read errors raise).
        """
        self.manager.wait_until_finished()
        if step is not None:
            if step not in self.all_steps():
                raise ValueError(
                    f"step={step} has no checkpoint in {self.directory}; saved steps: {self.all_steps() or 'none'}."
                )
            self._check_shapes(step, target)
            return self._restore_step(step, target)
        for step in reversed(self.all_steps()):
            self._check_shapes(step, target)
            try:
                return self._restore_step(step, target)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
                where = f"; moved to {self.move_aside(step)}" if move_unreadable else ""
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}){where}; falling back to an older one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None

    def _restore_step(self, step: int, target: Any) -> tuple[int, Any, dict]:
        """``(step, state, data_state)`` of checkpoint ``step``, the state in ``target``'s structure."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        leaves = jax.tree_util.tree_leaves(restored.state)
        return (
            step,
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves),
            dict(restored.data or {}),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
