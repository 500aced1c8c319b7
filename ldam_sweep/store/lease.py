"""Ownership of a store: one driver at a time holds ``<store>/lease.json``.

The lease names its owner (host, pid, a uuid), when it was taken, its last heartbeat, how long
it may go without one (``stale_after``) and the store's generation. A driver takes it before it
touches the store, renews it from a heartbeat thread, checks it before every commit and deletes
it at the end. A second driver refuses while the lease is fresh; a lease whose heartbeat is older
than its ``stale_after`` (or whose holder is a dead process on this host) is taken over.

Atomic steps per backend:

- local disk: create with ``O_CREAT | O_EXCL``; renew by temp file + ``os.replace`` after checking
  the owner; take over by renaming the stale file aside (only one contender's rename succeeds),
  checking it is the lease judged stale, then an exclusive create.
- S3 (s3fs): conditional PUTs. Create with ``If-None-Match: *``; renew and take over with
  ``If-Match: <ETag read>`` (compare-and-swap); release with a conditional DELETE.
- any other fsspec filesystem: write, then read back and compare. Two drivers starting within the
  same instant may both believe they won; the generation and owner checks before each commit still
  stop the loser from committing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from ldam_sweep import failpoints
from ldam_sweep.errors import StoreOwnedError, StoreReplacedError
from ldam_sweep.store.location import StoreLocation
from ldam_sweep.store.transport import is_transport_fault, request_deadline

LEASE_FILE = "lease.json"
INTERVAL_ENV = "LDAM_SWEEP_LEASE_INTERVAL"  # seconds between heartbeats (default 10)
MISSED_ENV = "LDAM_SWEEP_LEASE_MISSED"  # missed heartbeats before the lease is stale (default 6)

DEFAULT_INTERVAL = 10.0
DEFAULT_MISSED = 6


class LeaseConflict(Exception):
    """The lease file is not what this process read or wrote last (someone else changed it)."""


def lease_timing() -> tuple[float, float]:
    """(heartbeat interval, stale after) in seconds, from the environment or the defaults."""
    interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    missed = int(os.environ.get(MISSED_ENV, DEFAULT_MISSED))
    if interval <= 0 or missed < 1:
        raise ValueError(f"{INTERVAL_ENV} must be > 0 and {MISSED_ENV} >= 1, got {interval} and {missed}")
    return interval, interval * missed


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease.json`` holds."""

    owner: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    stale_after: float
    generation: str

    @classmethod
    def new(cls, stale_after: float, generation: str = "") -> "LeaseRecord":
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, stale_after, generation)

    def to_bytes(self) -> bytes:
        doc = {**asdict(self), "acquired": _iso(self.acquired_at), "heartbeat": _iso(self.heartbeat_at)}
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, mtime: float | None) -> "LeaseRecord":
        """Parse a lease; a torn or empty one (a creator killed mid-write) counts as held by an
        unknown owner since the file's modification time, so it goes stale like any other."""
        try:
            doc = json.loads(data)
            return cls(str(doc["owner"]), str(doc["host"]), int(doc["pid"]), float(doc["acquired_at"]),
                       float(doc["heartbeat_at"]), float(doc["stale_after"]), str(doc.get("generation", "")))
        except (ValueError, KeyError, TypeError):
            t = mtime if mtime is not None else time.time()
            return cls("unknown", "unknown host", -1, t, t, lease_timing()[1], "")

    def stale(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.heartbeat_at > self.stale_after

    def holder_dead(self) -> bool:
        """True only when the holder ran on this host and its process is gone."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        ago = time.time() - self.heartbeat_at
        return (f"host {self.host} pid {self.pid} (owner {self.owner[:8]}), holding it since {_iso(self.acquired_at)}, "
                f"last heartbeat {_iso(self.heartbeat_at)} ({ago:.0f}s ago)")


# -- backends: one lease object, atomic create / compare-and-replace / delete ---------------------

class _LocalLeaseFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path)

    def read(self) -> tuple[bytes, Any, float] | None:
        try:
            with open(self.path, "rb") as f:
                return f.read(), None, os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def _write_new(self, path: str, data: bytes, flags: int) -> None:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError:  # a full disk: the file this call created goes, not a torn lease
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    def create(self, data: bytes) -> Any:
        os.makedirs(self.folder, exist_ok=True)
        self._write_new(self.path, data, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError if held
        return data

    def replace(self, data: bytes, token: Any, expect: bytes) -> Any:
        current = self.read()
        if current is None or current[0] != expect:
            raise LeaseConflict
        tmp = os.path.join(self.folder, f".{LEASE_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            self._write_new(tmp, data, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):  # a failed write (a full disk) leaves nothing behind
                os.remove(tmp)
        return data

    def take(self, data: bytes, token: Any, expect: bytes) -> Any:
        aside = os.path.join(self.folder, f".{LEASE_FILE}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)  # only one contender's rename of this file succeeds
        except FileNotFoundError:
            raise LeaseConflict from None
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != expect:  # another contender already took over: put its lease back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            raise LeaseConflict
        os.unlink(aside)
        try:
            return self.create(data)
        except FileExistsError:
            raise LeaseConflict from None

    def delete(self, token: Any, expect: bytes) -> None:
        current = self.read()
        if current is not None and current[0] == expect:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _S3LeaseFile:
    """Conditional PUT/DELETE through s3fs (``If-None-Match: *``, ``If-Match: <ETag>``)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key = path.split("/", 1)

    def _call(self, method: str, **kwargs: Any) -> dict:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self) -> tuple[bytes, Any, float] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str, float]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"], resp["LastModified"].timestamp()

        try:
            return sync(self.fs.loop, get, timeout=request_deadline())
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Any:
        return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]  # FileExistsError if held

    def replace(self, data: bytes, token: Any, expect: bytes) -> Any:
        try:
            return self._call("put_object", Body=data, IfMatch=token)["ETag"]
        except OSError as err:  # 412 precondition failed, or the object is gone; not a store that is busy
            if is_transport_fault(err):
                raise
            raise LeaseConflict from None

    take = replace

    def delete(self, token: Any, expect: bytes) -> None:
        try:
            self._call("delete_object", IfMatch=token)
        except OSError:
            pass  # someone else's lease now: leave it


class _CheckedLeaseFile:
    """Any other fsspec filesystem: write, then read back (no atomic create; see the module doc)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def read(self) -> tuple[bytes, Any, float] | None:
        try:
            self.fs.invalidate_cache(self.path)
            return self.fs.cat_file(self.path), None, None  # type: ignore[return-value]
        except FileNotFoundError:
            return None

    def _put(self, data: bytes) -> bytes:
        self.fs.pipe_file(self.path, data)
        got = self.read()
        if got is None or got[0] != data:
            raise LeaseConflict
        return data

    def create(self, data: bytes) -> Any:
        if self.read() is not None:
            raise FileExistsError(self.path)
        try:
            return self._put(data)
        except LeaseConflict:
            raise FileExistsError(self.path) from None

    def replace(self, data: bytes, token: Any, expect: bytes) -> Any:
        current = self.read()
        if current is None or current[0] != expect:
            raise LeaseConflict
        return self._put(data)

    take = replace

    def delete(self, token: Any, expect: bytes) -> None:
        current = self.read()
        if current is not None and current[0] == expect:
            self.fs.rm(self.path)


def _lease_file(loc: StoreLocation) -> Any:
    path = loc.join(LEASE_FILE)
    if loc.is_local:
        return _LocalLeaseFile(path)
    fs = loc.fs
    if type(fs).__module__.startswith("s3fs"):
        return _S3LeaseFile(fs, path)
    return _CheckedLeaseFile(fs, path)


def read_lease(url: str | StoreLocation) -> LeaseRecord | None:
    """The store's current lease, or None when nobody holds it."""
    loc = StoreLocation.parse(url)
    got = _lease_file(loc).read()
    return None if got is None else LeaseRecord.from_bytes(got[0], got[2])


def _refusal(loc: StoreLocation, held: LeaseRecord, doing: str) -> StoreOwnedError:
    return StoreOwnedError(
        f"store {loc.url!r} is owned by another driver: {held.describe()}. Refused ({doing}): nothing was "
        f"changed. Wait for that driver to finish, or stop it; if it died, its lease goes stale "
        f"{held.stale_after:.0f}s after its last heartbeat and the next run takes it over."
    )


class StoreLease:
    """This driver's lease on a store: acquire, heartbeat, check before commits, release."""

    def __init__(self, loc: StoreLocation, backend: Any, record: LeaseRecord, token: Any, interval: float,
                 log: Callable[[str], None]) -> None:
        self.loc = loc
        self.backend = backend
        self.record = record
        self.token = token
        self.interval = interval
        self.log = log
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, url: str | StoreLocation, *, doing: str = "this run",
                log: Callable[[str], None] = lambda _m: None) -> "StoreLease":
        """Take the store's lease: create it, or take over a stale one (with a message naming the
        previous owner). StoreOwnedError while another driver holds a fresh lease."""
        loc = StoreLocation.parse(url)
        backend = _lease_file(loc)
        interval, stale_after = lease_timing()
        record = LeaseRecord.new(stale_after)
        data = record.to_bytes()
        for _ in range(3):  # a lease released between our create and our read: try again
            try:
                return cls(loc, backend, record, backend.create(data), interval, log)
            except FileExistsError:
                pass
            got = backend.read()
            if got is None:
                continue
            held = LeaseRecord.from_bytes(got[0], got[2])
            if held.owner == record.owner:  # our own create landed, its answer was lost (a retried call)
                return cls(loc, backend, record, got[1] if got[1] is not None else got[0], interval, log)
            dead = held.holder_dead()
            if not dead and not held.stale():
                raise _refusal(loc, held, doing)
            why = "its process is gone" if dead else f"no heartbeat for more than {held.stale_after:.0f}s"
            try:
                token = backend.take(data, got[1], got[0])
            except LeaseConflict:
                current = read_lease(loc)
                if current is None:
                    continue
                raise _refusal(loc, current, doing) from None
            log(f"took over the lease of store {loc.url} from {held.describe()}: {why}")
            return cls(loc, backend, record, token, interval, log)
        raise StoreOwnedError(f"store {loc.url!r}: could not take its lease (it changed hands three times while "
                              "this driver tried); nothing was changed. Rerun the command.")

    # -- while held -------------------------------------------------------------------------------
    def _write(self, record: LeaseRecord) -> None:
        with self._lock:
            if self.lost.is_set():
                raise LeaseConflict
            data = record.to_bytes()
            try:
                self.token = self.backend.replace(data, self.token, self.record.to_bytes())
            except LeaseConflict:
                # a write that landed but whose answer was lost (a connection cut mid-request) leaves
                # our new bytes under a token we never saw: still ours, not a takeover
                got = self.backend.read()
                if got is None or got[0] != data:
                    self.lost.set()
                    raise
                self.token = got[1] if got[1] is not None else got[0]
            self.record = record

    def set_generation(self, generation: str) -> None:
        """Record the store's generation in the lease (after the store was created or checked)."""
        try:
            self._write(replace(self.record, generation=generation, heartbeat_at=time.time()))
        except LeaseConflict:
            raise self._replaced() from None

    def start_heartbeat(self) -> None:
        """Renew the lease every ``interval`` seconds from a daemon thread, until ``release``."""
        if failpoints.heartbeat_disabled():
            return
        self._thread = threading.Thread(target=self._beat, name="ldam-sweep-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.interval):
            try:
                self._write(replace(self.record, heartbeat_at=time.time()))
            except LeaseConflict:
                self.log(f"lost the lease of store {self.loc.url}: another driver took it over; "
                         "nothing more will be committed")
                return
            except Exception as err:  # the store not answering: try again at the next beat, said once
                if failing_since is None:
                    failing_since = time.monotonic()
                    first = (str(err).strip().splitlines() or [""])[0][:200]
                    self.log(f"lease heartbeat failed ({type(err).__name__}: {first}); retrying every "
                             f"{self.interval:.0f}s")
                continue
            if failing_since is not None:
                self.log(f"lease heartbeat works again after {time.monotonic() - failing_since:.0f}s")
                failing_since = None

    def _replaced(self) -> StoreReplacedError:
        current = read_lease(self.loc)
        who = "nobody holds its lease now" if current is None else f"its lease is held by {current.describe()}"
        return StoreReplacedError(
            f"store {self.loc.url!r} was replaced or taken over while this driver ran ({who}); nothing more was "
            "committed. Check who runs the store now; rerun only when no other driver uses it."
        )

    def check(self, generation: str | None) -> None:
        """Before a commit: this driver still holds the lease and the store's generation is the one
        it started with (``None``: the store has no root metadata any more). StoreReplacedError if not."""
        got = self.backend.read()
        ours = got is not None and LeaseRecord.from_bytes(got[0], got[2]).owner == self.record.owner
        if not ours or self.lost.is_set() or generation != self.record.generation:
            self.lost.set()
            raise self._replaced()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never another driver's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        with self._lock:
            try:
                self.backend.delete(self.token, self.record.to_bytes())
            except Exception as err:  # best effort: a full disk, a store that does not answer
                first = (str(err).strip().splitlines() or [""])[0][:200]
                self.log(f"could not delete the lease of store {self.loc.url} ({type(err).__name__}: {first}); the "
                         f"next run on this host takes it over at once, elsewhere it goes stale "
                         f"{self.record.stale_after:.0f}s after its last heartbeat")
