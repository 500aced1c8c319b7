"""Where a store lives: a local directory or an object-store URL (``s3://bucket/prefix``, via fsspec).

The Zarr hierarchy is ``<root>/`` itself (``zarr.json`` at the top); the manifest is the
``<root>/manifest/`` folder of Parquet files beside ``layers/``.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

from ldam_sweep.errors import StoreError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def encode_name(name: str) -> str:
    """A layer name as a storage path segment: dotted module names pass unchanged, anything else
    (spaces, slashes, ``<script>``) is percent-encoded so it can never escape its folder."""
    if _SAFE_NAME.match(name) and not name.startswith("."):
        return name
    return urllib.parse.quote(name, safe="")


def decode_name(segment: str) -> str:
    return urllib.parse.unquote(segment)


@dataclass(frozen=True)
class StoreLocation:
    """A store's URL with the fsspec filesystem that reaches it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: "str | os.PathLike | StoreLocation", storage_options: dict[str, Any] | None = None) -> "StoreLocation":
        """The one place a store address is read: a path (``~`` and relative paths resolved), a
        ``file://`` or object-store URL; a StoreLocation passes through (``storage_options`` added)."""
        if isinstance(url, StoreLocation):
            return url if not storage_options else cls(url.url, {**url.storage_options, **storage_options})
        text = str(url)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)", text):
            raise StoreError(f"store URL {text!r} looks like a mistyped URL (one slash after the colon); "
                             "write e.g. s3://bucket/prefix")
        if "://" not in text or text.startswith("file://"):
            text = str(Path(text.removeprefix("file://")).expanduser().resolve())
        return cls(text.rstrip("/"), dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def options(self) -> dict[str, Any]:
        """The filesystem's options: the caller's, over no listing cache. A store is written by many
        processes (and, in one process, through zarr's filesystem instance as well as this one):
        a cached listing hides what they wrote (a new store's zarr.json, a fresh manifest part)."""
        return {"use_listings_cache": False, **self.storage_options}

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:
            return fsspec.filesystem("file")
        return self._remote()[0]

    def _remote(self, **extra: Any) -> tuple[Any, str]:
        """(the object store's fsspec filesystem, the store's path on it), with ``extra`` options
        (zarr's ``asynchronous``); no request on it waits longer than its deadline (a half-open
        connection after an outage: ``transport.bound_requests``)."""
        from ldam_sweep.store.transport import bound_requests

        try:
            fs, path = fsspec.url_to_fs(self.url, **{**extra, **self.options})
            return bound_requests(fs), path
        except (ValueError, ImportError) as err:
            raise StoreError(f"cannot reach store {self.url!r}: {err} (for s3:// install ldam-sweep[s3])") from None

    @property
    def root(self) -> str:
        """The store's path as the filesystem names it (no protocol for object stores)."""
        return self.url if self.is_local else self.url.split("://", 1)[1]

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def zarr_store(self, read_only: bool) -> zarr.abc.store.Store:
        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        fs, path = self._remote(asynchronous=True)  # as FsspecStore.from_url, with the requests' deadline
        return FsspecStore(fs=fs, path=path, read_only=read_only)

    def open_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace the file at ``path`` (a full path, e.g. from ``join``) whole: locally a temp file
        beside it, fsynced, then renamed over it (a failed write, a full disk, leaves nothing behind);
        on an object store one PUT (the object appears whole or not at all)."""
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)  # a record's own folder (integrity.sidecar_path)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic within one directory
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_writable(url: "str | StoreLocation") -> None:
    """Fail before any work when the store cannot be written (local paths: the nearest existing
    parent must be a writable directory)."""
    loc = StoreLocation.parse(url)
    if not loc.is_local:
        return
    p = Path(loc.url)
    while not p.exists():
        p = p.parent
    try:
        if not p.is_dir():
            raise NotADirectoryError(f"{str(p)!r} is not a directory")
        with tempfile.TemporaryFile(dir=p):  # a real write: os.access says yes to root on /proc
            pass
    except OSError as err:
        raise StoreError(f"store {loc.url!r} is not writable: cannot create files in {str(p)!r} ({err})") from None
