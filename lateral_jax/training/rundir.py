"""The run folder: usable, one writer at a time, one config, files replaced atomically.

A run folder belongs to the config that wrote its checkpoints.  :class:`RunFolder` is entered
once per run (by process 0 on multi-host runs) and

* refuses a path that is a file, or a folder it cannot write, naming the path and the fix;
* takes an exclusive lock (``<workdir>/.lock``, ``fcntl.flock``): a second run on the same folder
  fails at once naming the holder (pid, host, start time).  The kernel drops the lock when its
  process dies, so a crashed or ``kill -9``-ed run leaves no stale lock behind;
* compares the config with ``config.json``: when the folder holds checkpoints of a config that
  differs in any field that shapes the trained weights, it raises :class:`ConfigMismatchError`
  naming every differing field (old → new), or, with ``on_config_change="move_aside"``, moves the
  old run to ``<workdir>.superseded-<time>`` beside it and starts afresh.  Fields that only change
  what is logged or kept (:data:`RESUMABLE_FIELDS`) may change between resumptions.

``config.json`` and ``final.json`` are written with :func:`atomic_write_text` (a temporary file,
``fsync``, ``os.replace``), so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

OnConfigChange = Literal["error", "move_aside"]
ON_CONFIG_CHANGE = ("error", "move_aside")

# RunConfig fields (dotted) that may differ between a run folder's config and a resumption's:
# they change what is shown, logged or kept, not the weights a run trains.
RESUMABLE_FIELDS = frozenset(
    {
        "progress",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "spectral_images",
        "data.data_dir",
        "data.download",
    }
)
RESUMABLE_PREFIXES = ("divergence.",)

LOCK_NAME = ".lock"

# Exit statuses of the command-line entry points (experiments/main.py, experiments/study.py).
EXIT_OK = 0
EXIT_REFUSED = 2  # bad flag, config or input, or an unusable run folder: nothing was trained
EXIT_DIVERGED = 3  # non-finite or diverged loss: training stopped, earlier checkpoints kept
EXIT_PREEMPTED = 75  # SIGTERM / preemption: checkpoint saved, rerun the same command (sysexits EX_TEMPFAIL)


class RunFolderError(RuntimeError):
    """The run folder cannot be used: not a folder, not writable, or in use by another run."""


def one_line(message: str) -> str:
    """A multi-line error message as the one line a command prints: indented item lines are joined
    with ``"; "``, the rest with spaces."""
    out = ""
    previous_item = False
    for line in message.splitlines():
        if not line.strip():
            continue
        item = line[:1].isspace()
        glue = "; " if item and previous_item else " "
        out = f"{out}{glue}{line.strip()}" if out else line.strip()
        previous_item = item
    return out


class ConfigMismatchError(RunFolderError):
    """The run folder holds checkpoints of a different config; ``differences`` maps field → (old, new)."""

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]):
        super().__init__(message)
        self.differences = differences


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``; lists become tuples (JSON round trips compare equal)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: _freeze(tree)}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The dotted fields, outside :data:`RESUMABLE_FIELDS`, whose values differ: ``{field: (old, new)}``."""
    a, b = flatten(old), flatten(new)
    out = {}
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_FIELDS or key.startswith(RESUMABLE_PREFIXES):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out[key] = (a.get(key, "<absent>"), b.get(key, "<absent>"))
    return out


def _describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


class RunFolder:
    """The run folder ``workdir`` while a run writes to it (a context manager holding the lock).

    ``enabled=False`` (processes other than 0 of a multi-host run): no lock and no writes; the
    config is still compared, so every process refuses a mismatch alike.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.path = Path(workdir)
        self.enabled = enabled
        self._lock_file: Any = None

    # -- usability and the lock ------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(
                f"workdir {str(self.path)!r} is a file, not a folder; pass a folder path (or move the file away)."
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(
                f"cannot create workdir {str(self.path)!r} ({e.strerror}); pass a folder you can write to."
            ) from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"workdir {str(self.path)!r} is not writable; pass a folder you can write to.")

    def __enter__(self) -> RunFolder:
        if not self.enabled:
            return self
        self._check_usable()
        lock_path = self.path / LOCK_NAME
        lock_file = lock_path.open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RunFolderError(
                f"run folder {str(self.path)!r} is in use by {_describe_holder(lock_path)}: one run writes to a "
                "folder at a time. Wait for that run to finish, stop it, or pass another workdir."
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        lock_file.flush()
        self._lock_file = lock_file
        return self

    def __exit__(self, *exc) -> bool:
        if self._lock_file is not None:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        return False

    # -- the config ------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def has_checkpoints(self) -> bool:
        folder = self.path / "checkpoints"
        return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())

    def claim(
        self,
        config: dict[str, Any],
        *,
        on_config_change: OnConfigChange = "error",
        normalise: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        data_identity: dict[str, str] | None = None,
    ) -> Path | None:
        """Makes the folder the run of ``config`` (a :func:`~lateral_jax.training.config.to_dict`);
        returns where an old run was moved, if one was.

        ``normalise`` maps the folder's stored config to the current form (e.g. fills fields that
        a config written by an older version lacks with their defaults) before the comparison.
        Raises :class:`ConfigMismatchError` when the folder holds checkpoints of another config
        (``on_config_change="error"``).  ``data_identity`` (e.g. ``{"data.archive content":
        <fingerprint>}``) is kept in ``data.json``; checkpoints trained on data of another identity
        count as another config (a folder without ``data.json``, written by an older version, is
        not checked).
        """
        if on_config_change not in ON_CONFIG_CHANGE:
            raise ValueError(f"on_config_change={on_config_change!r} must be one of {ON_CONFIG_CHANGE}.")
        moved = None
        if self.has_checkpoints():
            differences = {**self._differences(config, normalise), **self._data_differences(data_identity)}
            if differences:
                if on_config_change == "error":
                    raise ConfigMismatchError(self._mismatch_message(differences), differences)
                moved = self.move_aside() if self.enabled else None
        if self.enabled:
            atomic_write_text(self.config_path, json.dumps(config, indent=2, default=str))
            if data_identity:
                atomic_write_text(self.data_path, json.dumps(data_identity, indent=2))
        return moved

    @property
    def data_path(self) -> Path:
        return self.path / "data.json"

    def _data_differences(self, identity: dict[str, str] | None) -> dict[str, tuple[Any, Any]]:
        if not identity or not self.data_path.exists():
            return {}
        try:
            old = json.loads(self.data_path.read_text())
        except ValueError:
            return {"data.json": ("<unreadable>", identity)}
        return {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}

    def _differences(self, config: dict[str, Any], normalise) -> dict[str, tuple[Any, Any]]:
        if not self.config_path.exists():
            return {"config.json": ("<absent>", "<this run's config>")}
        try:
            old = json.loads(self.config_path.read_text())
        except ValueError:
            return {"config.json": ("<unreadable>", "<this run's config>")}
        if normalise is not None:
            try:
                old = normalise(old)
            except (TypeError, ValueError):  # fields this version does not know: compare as stored
                pass
        return config_differences(old, json.loads(json.dumps(config, default=str)))

    def _mismatch_message(self, differences: dict[str, tuple[Any, Any]]) -> str:
        lines = [f"  {k}: {old!r} (in the folder) → {new!r} (this run)" for k, (old, new) in differences.items()]
        return (
            f"run folder {str(self.path)!r} holds checkpoints of a different config; resuming would train "
            f"them with settings they were not trained with. Differing field(s):\n"
            + "\n".join(lines)
            + "\nRerun with the folder's config to resume it, pass another workdir, or start afresh with "
            "on_config_change='move_aside' (experiments.main: --on_config_change=move_aside), which moves "
            "the old run beside it."
        )

    def move_aside(self) -> Path:
        """Moves everything but the lock to ``<workdir>.superseded-<time>`` beside the folder; returns it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.superseded-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.superseded-{stamp}-{n}")
        target.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry.name != LOCK_NAME:
                shutil.move(str(entry), str(target / entry.name))
        return target

    # -- results ---------------------------------------------------------------------------

    @property
    def final_path(self) -> Path:
        return self.path / "final.json"

    def clear_final(self) -> None:
        """Removes ``final.json`` (a run that trains again has no final result until it ends)."""
        self.final_path.unlink(missing_ok=True)

    def write_final(self, final: dict[str, Any]) -> None:
        atomic_write_text(self.final_path, json.dumps(final, indent=2))
