"""The driver's commit path: finished blocks' manifest rows are committed in batches, only while
this driver owns the store and the store is the generation it started with; storage errors no
retry can fix stop the sweep; a Ctrl-C during the final commit never interrupts Ray's shutdown."""

from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Any, Callable

from rich.console import Console

from ldam_sweep.errors import StorageStopError, StoreReplacedError
from ldam_sweep.store import commit
from ldam_sweep.store.layout import read_generation

# Storage errors that a retry cannot fix: the sweep stops instead of trying every block again.
PERSISTENT_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_stop(err: BaseException | None, doing: str) -> StorageStopError | None:
    """A StorageStopError when ``err`` is a storage error no retry can fix (disk full, quota,
    read-only, permission), else None."""
    if not isinstance(err, OSError) or err.errno not in PERSISTENT_STORAGE_ERRNOS:
        return None
    reason = os.strerror(err.errno) if err.errno else type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    return StorageStopError(f"the sweep stopped: {reason}{where} while {doing}. Committed blocks are intact; free "
                            "space or fix the store's permissions, then rerun the same command to resume.")


class CommitBuffer:
    """Manifest rows of finished blocks, committed every ``commit_every`` blocks (and at the end).

    With a lease, every commit first checks that this driver still owns the store and that the
    store is the generation it started with; if not, the rows are dropped (nothing more is
    committed) and StoreReplacedError is raised. The rows carry the generation the block writer
    stamped (``BlockWriter.write``, the one place that stamps it); workers check it before they
    return them. ``on_commit(rows, blocks)`` is called after each commit."""

    def __init__(self, url: str, commit_every: int, lease: Any = None,
                 on_commit: Callable[[list[dict[str, Any]], int], None] | None = None) -> None:
        self.url = url
        self.commit_every = commit_every
        self.lease = lease
        self.on_commit = on_commit
        self.rows: list[dict[str, Any]] = []
        self.blocks = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.blocks += 1

    def due(self) -> bool:
        return self.blocks >= self.commit_every

    def flush(self) -> None:
        if not self.rows:
            return
        if self.lease is not None:
            try:
                self.lease.check(read_generation(self.url))
            except StoreReplacedError:
                self.rows, self.blocks = [], 0
                raise
        try:
            commit(self.url, self.rows)
        except OSError as err:
            stop = storage_stop(err, f"committing {self.blocks} blocks to the manifest")
            if stop is None:
                raise
            raise stop from None
        rows, blocks = self.rows, self.blocks
        self.rows, self.blocks = [], 0
        if self.on_commit is not None:
            self.on_commit(rows, blocks)


class StopNow(BaseException):
    """Raised by the second Ctrl-C while the driver commits: skip the rest of the commit."""


class ShutdownGuard:
    """While the driver commits and stops Ray: a Ctrl-C skips what is left of the commit (those
    blocks rerun on the next run) but never interrupts the Ray shutdown, so no Ray process outlives
    the driver. ``interrupted()`` is called on each Ctrl-C; the sweep then ends as interrupted (exit 130)."""

    def __init__(self, interrupted: Callable[[], None], console: Console) -> None:
        self.interrupted, self.console = interrupted, console
        self.previous: Any = None
        self.committing = True
        self.interrupts = 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.interrupted()
        self.interrupts += 1
        if self.interrupts == 1:
            self.console.print("interrupted: stopping now without committing the finished blocks (they rerun "
                               "next time); shutting Ray down", highlight=False, markup=False)
        if self.committing:
            self.committing = False
            raise StopNow

    def __enter__(self) -> "ShutdownGuard":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
