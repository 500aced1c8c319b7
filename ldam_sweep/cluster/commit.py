"""The driver's commit path: finished blocks' manifest rows are committed in batches, only while
this driver owns the store and the store is the generation it started with; storage errors no
retry can fix stop the sweep."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable

from ldam_sweep.errors import StorageStopError, StoreReplacedError
from ldam_sweep.store import commit
from ldam_sweep.store.layout import read_generation
from ldam_sweep.store.transport import StoreIO

# Storage errors that a retry cannot fix: the sweep stops instead of trying every block again.
PERSISTENT_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_stop(err: BaseException | None, doing: str) -> StorageStopError | None:
    """A StorageStopError when ``err`` is a storage error no retry can fix (disk full, quota,
    read-only, permission) or already one (a store that stopped answering), else None."""
    if isinstance(err, StorageStopError):
        return err
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
                 on_commit: Callable[[list[dict[str, Any]], int], None] | None = None, io: StoreIO | None = None) -> None:
        self.url = url
        self.commit_every = commit_every
        self.lease = lease
        self.on_commit = on_commit
        self.io = io or StoreIO(url, patience=0)  # how the store is reached: retried while it does not answer
        self.rows: list[dict[str, Any]] = []
        self.blocks = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.blocks += 1

    def due(self) -> bool:
        return self.blocks >= self.commit_every

    def flush(self, run: Callable[[Callable[[], None]], tuple[bool, Any]] | None = None) -> bool:
        """Commit the buffered rows. ``run(write)`` runs the storage step (the lease check and the
        commit) and says whether it ran (``StopSignals.finish``: a second Ctrl-C skips it); the
        ``on_commit`` callback is then called in this thread. False when skipped (rows kept)."""
        if not self.rows:
            return True
        done, _ = run(self._write) if run is not None else (True, self._write())
        if not done:
            return False
        rows, blocks = self.rows, self.blocks
        self.rows, self.blocks = [], 0
        if self.on_commit is not None:
            self.on_commit(rows, blocks)
        return True

    def _write(self) -> None:
        self.io(f"committing {self.blocks} blocks", self._write_once)

    def _write_once(self) -> None:
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
