"""Storage that does not answer: an object store's endpoint gone (an S3 outage, a network cut, a
DNS failure), a server busy or erroring. The one place that tells such a *transport* fault from
everything else, retries it, and turns it into one line and exit 4 when it lasts.

- ``is_transport_fault(err)``: the exception, or anything in its cause chain, is a transport
  fault -- botocore's connection and HTTP-client errors (``EndpointConnectionError`` is not an
  ``OSError``), aiohttp's client errors, the socket's ``ConnectionError``/``TimeoutError``, fsspec's
  timeout, and an object store's "busy / internal error / unavailable" answers (s3fs raises them as
  ``OSError`` with ``EBUSY``/``EREMOTEIO``). Not a missing object, a permission, a full disk: those
  are answers, not silence.
- ``retrying(what, fn, ...)``: call ``fn``, and while it fails with a transport fault call it again,
  with a backoff from 0.5 s doubling to 30 s, for up to ``patience`` seconds in all; then raise
  ``StorageUnreachableError`` (exit 4) naming what was being done, for how long, and the last error.
  Only for idempotent steps: a block's whole-region write, a manifest commit (a repeated commit is
  de-duplicated by readers), a store's creation (idempotent for one plan), reads.
- ``storage_patience()``: the default patience, ``LDAM_SWEEP_STORAGE_PATIENCE`` seconds (600). A sweep
  takes ``resources.storage_patience`` from its spec.
- ``request_deadline()``: no single request to an object store waits longer than
  ``LDAM_SWEEP_REQUEST_TIMEOUT`` seconds (300): one that does (a connection an outage left half open,
  which no socket timeout ends) is abandoned with a timeout, a transport fault, and retried like the
  others. ``StoreLocation`` applies it to its filesystem and to zarr's (``bound_requests``).

s3fs and botocore already retry each request a few times (about 8 s against a refused port); this
covers the minutes an outage lasts. A listing cache would also hide objects another process (or
another filesystem instance in this one: zarr's) wrote: ``StoreLocation`` opens object stores
without one.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ldam_sweep.errors import StorageUnreachableError

T = TypeVar("T")

PATIENCE_ENV = "LDAM_SWEEP_STORAGE_PATIENCE"
DEFAULT_PATIENCE = 600.0
REQUEST_TIMEOUT_ENV = "LDAM_SWEEP_REQUEST_TIMEOUT"
DEFAULT_REQUEST_TIMEOUT = 300.0  # one request to an object store; a block's whole sample array is one object
FIRST_DELAY, MAX_DELAY = 0.5, 30.0

# errno values an object store or a network stack uses for "not now" (s3fs: 503/SlowDown -> EBUSY, 500 -> EREMOTEIO)
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.ETIMEDOUT, errno.ECONNRESET,
                               errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                               errno.ENETDOWN, errno.EPIPE, errno.EAGAIN})


def _transport_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    try:
        import socket

        types.append(socket.gaierror)
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TYPES: tuple[type, ...] | None = None


def is_transport_fault(err: BaseException | None) -> bool:
    """True when ``err`` or an exception in its cause chain says the storage did not answer."""
    global _TYPES
    if _TYPES is None:
        _TYPES = _transport_types()
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _TYPES):
            return True
        if isinstance(err, OSError) and type(err) is OSError and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__ or getattr(err, "cause", None)
    return False


def storage_patience(value: float | None = None) -> float:
    """Seconds to keep retrying a store that does not answer: ``value``, else the environment, else 600."""
    if value is not None:
        return float(value)
    return float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE))


def request_deadline() -> float:
    """Seconds one object-store request may take before it is abandoned (and retried): the environment's
    ``LDAM_SWEEP_REQUEST_TIMEOUT``, else 300."""
    value = os.environ.get(REQUEST_TIMEOUT_ENV)
    try:
        seconds = float(value) if value else DEFAULT_REQUEST_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{REQUEST_TIMEOUT_ENV}={value!r}: give a positive number of seconds (default "
                         f"{DEFAULT_REQUEST_TIMEOUT:.0f})")
    return seconds


# the filesystem requests ldam-sweep makes on a store, directly and through zarr and pyarrow
_BOUNDED_CALLS = ("cat_file", "cat_ranges", "cat", "pipe_file", "pipe", "exists", "info", "ls", "find", "rm", "rm_file",
                  "makedirs", "mv", "copy", "isfile", "isdir", "call_s3")


def bound_requests(fs: Any) -> Any:
    """``fs`` (an fsspec filesystem) with a deadline of ``request_deadline()`` seconds on each request:
    for an async filesystem (s3fs, gcsfs, adlfs) the coroutines above run under ``asyncio.wait_for``,
    which cancels a request that runs over and raises TimeoutError (a transport fault: ``retrying``
    tries again), and a synchronous instance's blocking calls go through them. Zarr's store is made
    on such an instance (``StoreLocation.zarr_store``). A local filesystem is returned as it is."""
    import asyncio
    import inspect

    from fsspec.asyn import AsyncFileSystem, sync_wrapper

    if not isinstance(fs, AsyncFileSystem):
        return fs
    seconds = request_deadline()
    if getattr(fs, "_ldam_sweep_deadline", None) == seconds:  # fsspec caches instances: done once
        return fs
    for name in _BOUNDED_CALLS:
        method = getattr(type(fs), f"_{name}", None)  # the class's coroutine function: never wrapped twice
        if method is None or not inspect.iscoroutinefunction(method):
            continue

        async def call(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            return await asyncio.wait_for(_method(fs, *args, **kwargs), seconds)

        setattr(fs, f"_{name}", call)
        if not fs.asynchronous:
            setattr(fs, name, sync_wrapper(call, obj=fs))
    fs._ldam_sweep_deadline = seconds
    return fs


def describe(err: BaseException) -> str:
    """The fault in one line: the outermost exception's type and first line."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def retrying(what: str, fn: Callable[..., T], *args: Any, patience: float | None = None, where: str = "",
             log: Callable[[str], None] | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, called again while it fails with a transport fault (see the module
    doc), for up to ``patience`` seconds; then StorageUnreachableError. ``where``: the store's URL,
    for the message; ``log``: told once when the storage stops answering and once when it is back."""
    limit = storage_patience(patience)
    store = f"store {where}" if where else "the store"
    start = time.monotonic()
    delay = FIRST_DELAY
    failing = False
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if not is_transport_fault(err):
                raise
            waited = time.monotonic() - start
            if waited + delay > limit:
                raise unreachable(what, where, waited, err) from None
            if not failing and log is not None:
                log(f"{store} is not answering while {what} ({describe(err)}); retrying for up to {limit:.0f}s")
            failing = True
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            continue
        if failing and log is not None:
            log(f"{store} answers again: {what} done after {time.monotonic() - start:.0f}s")
        return result


def unreachable(what: str, where: str, waited: float, err: BaseException) -> StorageUnreachableError:
    store = f"store {where!r}" if where else "the store"
    return StorageUnreachableError(
        f"{store} did not answer for {waited:.0f}s while {what} ({describe(err)}); the sweep stopped. Committed "
        "blocks are intact: rerun the same command once the storage answers again.")


@dataclass(frozen=True)
class StoreIO:
    """``retrying`` bound to one store, patience and log: ``io("committing 3 blocks", commit, url, rows)``.
    Picklable (Ray ships it to workers, whose ``log`` is None)."""

    where: str = ""
    patience: float | None = None
    log: Callable[[str], None] | None = None

    def __call__(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return retrying(what, fn, *args, patience=self.patience, where=self.where, log=self.log, **kwargs)
