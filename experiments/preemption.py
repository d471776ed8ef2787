"""SIGTERM outside training is a preemption too: the entry points exit 75 from their first moment.

Imported first by ``experiments.main`` and ``experiments.study`` (standard library only, so the
handler is in place before JAX is imported).  Training replaces the handler while it runs (it saves
a checkpoint, then exits 75); outside training nothing is unsaved, so the process exits at once.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_PREEMPTED = 75


def _exit_preempted(signum, frame) -> None:
    del signum, frame
    print("preempted (SIGTERM) outside training: nothing unsaved; rerun the same command.", file=sys.stderr, flush=True)
    # os._exit: an exception raised from a signal handler can land in a callback that swallows it
    # (an XLA garbage-collection callback did, and the process then exited 0).
    os._exit(EXIT_PREEMPTED)


def exit_75_on_sigterm() -> None:
    """Installs the handler (call it from the main thread of an entry point, before heavy imports)."""
    signal.signal(signal.SIGTERM, _exit_preempted)
